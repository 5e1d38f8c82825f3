#!/usr/bin/env python
"""Run every experiment of the reproduction and write output/REPORT.md.

Each experiment script runs in its own process (``--quick`` passes through); its whole
output goes to ``<out>/<experiment>/run.log`` and a heartbeat line (elapsed time and the
script's latest progress or log line) is printed every ``--heartbeat`` seconds. An
experiment whose data is missing is reported as skipped with the command that fetches
it; corrupt or unreadable data, or any other error, is a failure, and the others still
run. An experiment is "up to date" (not rerun, unless ``--force``) only when its last
successful run had the same code (a hash of the library and the script), the same
arguments and the same data files (size and modification time). ``--only`` reruns the
named experiments and keeps the other rows of REPORT.md.
Exit status: 0 if nothing failed (skips for missing data are not failures), 1 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name, datasets it needs, what it reproduces
EXPERIMENTS = [
    ("demo_digits", [], "Demo: influence vs LOO on scikit-learn's digits (always runs)"),
    ("fig1_components", ["mnist"], "Fig 1: components of influence (binary logistic regression, MNIST 1 vs 7)"),
    ("fig2_logreg_loo", ["mnist"], "Fig 2 (left, middle): logistic regression on MNIST, influence vs LOO"),
    ("fig2_cnn_loo", ["mnist"], "Fig 2 (right): all-convolutional CNN on 5.5k MNIST, influence vs LOO"),
    ("fig3_smooth_hinge", ["mnist"], "Fig 3: smooth-hinge SVM on MNIST 1 vs 7, influence vs LOO"),
    ("fig4_inception_vs_rbf", ["dogfish", "inception"],
     "Fig 4: Inception-feature model vs RBF SVM on dog vs fish: which training images each relies on"),
    ("fig5_training_set_attack", ["dogfish", "inception"],
     "Fig 5: training-set attacks through Inception with changes below half an 8-bit level"),
    ("sec53_hospital_readmission", ["hospital"], "Sec 5.3: debugging a domain mismatch (hospital readmission)"),
    ("fig6_spam_mislabel", ["spam"], "Fig 6: fixing mislabeled training data (Enron1 spam)"),
]


# the data behind each experiment, for the report (the dog-fish classes are a stand-in: data/README.md)
def data_used(name: str, m: dict) -> str:
    """What the report's data column says: the run's own record (data_source) where it has one."""
    source = m.get("metrics", {}).get("data_source") or m.get("config", {}).get("data_source")
    return source or STAND_IN.get(name, "original")


STAND_IN = {"fig4_inception_vs_rbf": "stand-in dog/fish classes (Imagenette tench vs springer)",
            "fig5_training_set_attack": "stand-in dog/fish classes (Imagenette tench vs springer)"}


def data_files(datasets: list[str], data_dir: str | None) -> list[Path]:
    """The files the experiment's datasets consist of (those that exist), from the manifest."""
    from influence.datasets.manifest import MANIFEST, resolve_data_dir

    root = resolve_data_dir(data_dir)
    files = []
    for name in datasets:
        folder = root / MANIFEST[name].folder if name in MANIFEST else root / name
        if folder.is_dir():
            files += sorted(p for p in folder.rglob("*") if p.is_file())
    return files


def run_key(script: Path, cmd_args: list[str], datasets: list[str], data_dir: str | None) -> dict:
    """What a result depends on: the code (hash of the library and the script), the arguments
    and the data files (path, size, modification time)."""
    h = hashlib.sha256()
    for path in sorted([script, *(REPO / "influence").rglob("*.py"), *(REPO / "inception").rglob("*.py")]):
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    data = [[str(p), p.stat().st_size, int(p.stat().st_mtime)] for p in data_files(datasets, data_dir)]
    return {"code": h.hexdigest(), "args": cmd_args, "data": data}


def is_up_to_date(out: Path, key: dict) -> bool:
    """True when ``out`` holds a successful run (metrics.json) made with the same ``key``."""
    try:
        return (out / "metrics.json").is_file() and json.loads((out / "run_key.json").read_text()) == key
    except (OSError, json.JSONDecodeError):
        return False


def run_with_heartbeat(name: str, cmd: list[str], log_path: Path, every: float) -> tuple[int, str]:
    """Run ``cmd``, writing its output to ``log_path`` and printing a heartbeat every ``every``
    seconds; returns (exit status, the output's last 20 lines)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    last = {"line": "", "tail": []}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def pump():
        with open(log_path, "wb") as log:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                log.write(chunk)
                log.flush()
                lines = [ln.strip() for ln in re.split(r"[\r\n]+", chunk.decode(errors="replace")) if ln.strip()]
                if lines:
                    last["line"] = lines[-1]
                    last["tail"] = (last["tail"] + lines)[-20:]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    t0 = time.perf_counter()
    while True:
        try:
            proc.wait(timeout=every)
            break
        except subprocess.TimeoutExpired:
            print(f"[{name}] {time.perf_counter() - t0:6.0f} s: {last['line'][:150]}", flush=True)
    reader.join()
    return proc.returncode, "\n".join(last["tail"])


def check_target(value, target: str | None, metrics: dict | None = None):
    """Pass/fail of ``value`` against a target such as ">= 0.8", ">= other_metric" or "true (...)"."""
    if target is None or value is None:
        return None
    text = str(target).strip()
    if isinstance(value, bool) and not text.lower().startswith(("true", "false")):
        value = int(value)  # e.g. "== 1"
    elif isinstance(value, bool) or text.lower().startswith(("true", "false")):
        word = text.split()[0].lower() if text else ""
        return value is (word == "true") if word in ("true", "false") else None
    m = re.fullmatch(r"(>=|<=|>|<|==)\s*(\S+)(\s.*)?", text)
    if not m:
        return None
    op, ref = m.group(1), m.group(2)
    try:
        ref = float(ref)
    except ValueError:
        ref = (metrics or {}).get(ref)
        if not isinstance(ref, (int, float)):
            return None
    return {">=": value >= ref, "<=": value <= ref, ">": value > ref, "<": value < ref, "==": value == ref}[op]


def is_table(v) -> bool:
    """A metric that is a list of flat records (rendered as a table)."""
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def fmt(v):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):  # nested metrics (per split, per bin): compact, rounded
        def rounded(x):
            if isinstance(x, float):
                return float(f"{x:.4g}")
            if isinstance(x, dict):
                return {k: rounded(y) for k, y in x.items()}
            return [rounded(y) for y in x] if isinstance(x, list) else x
        return json.dumps(rounded(v))
    return str(v)


# each experiment's headline metric (metrics.json may name its own under "headline")
HEADLINE = {"demo_digits": "loo_pearson_cg", "fig2_logreg_loo": "pearson_cg", "fig2_cnn_loo": "pearson",
            "fig3_smooth_hinge": "pearson_t0.001", "fig4_inception_vs_rbf": "rbf_more_distance_driven",
            "fig5_training_set_attack": "flip_rate_1", "sec53_hospital_readmission": "top4_are_children",
            "fig6_spam_mislabel": "influence_ge_loss_at_every_fraction"}


def headline(name: str, m: dict) -> tuple[str | None, str]:
    """(metric, verdict) for the report's main table: meets / short / not comparable in quick
    mode / no target."""
    metrics, targets = m.get("metrics", {}), m.get("targets", {})
    key = m.get("headline") or HEADLINE.get(name)
    if key not in metrics:
        key = next((k for k in metrics if k in targets), next((k for k in metrics if k in m.get("paper", {})),
                                                            next(iter(metrics), None)))
    if key is None:
        return None, "–"
    if m.get("quick"):
        return key, "not comparable (quick mode)"
    ok = check_target(metrics[key], targets.get(key), metrics)
    return key, {True: "meets", False: "**short**", None: "no target"}[ok]


def write_report(path: Path, rows: list[dict], args) -> None:
    from influence.experiment import software_versions
    from influence.utils import atomic_path

    lines = ["# Reproduction report: Koh & Liang (2017), influence functions", "",
             f"Mode: {'quick' if args.quick else 'full'}; seed {args.seed}; data directory "
             f"`{args.data_dir or os.environ.get('INFLUENCE_DATA_DIR') or 'data'}`; "
             f"written {time.strftime('%Y-%m-%d %H:%M:%S')}"
             + (f" (rows of {', '.join(args.only)} updated; the others kept from earlier runs)" if args.only else "")
             + ".", "",
             "| experiment | status | headline metric | paper | ours | target | verdict | wall time (s) | data |",
             "|---|---|---|---|---|---|---|---|---|"]
    loaded = {}
    for r in rows:
        metrics_path = Path(r["out"]) / "metrics.json"
        m = json.loads(metrics_path.read_text()) if r["status"] == "ok" and metrics_path.is_file() else None
        loaded[r["name"]] = m
        if m is None:
            lines.append(f"| {r['name']} | {r['status']} | – | – | – | – | – | {fmt(r.get('wall_time_s'))} | "
                         f"{'missing' if 'missing' in r['status'] else '–'} |")
            continue
        key, verdict = headline(r["name"], m)
        lines.append(f"| {r['name']} | {r['status']} | {key or '–'} | {fmt(m.get('paper', {}).get(key))} | "
                     f"{fmt(m['metrics'].get(key))} | {fmt(m.get('targets', {}).get(key))} | {verdict} | "
                     f"{fmt(r.get('wall_time_s'))} | {data_used(r['name'], m)} |")
    for r in rows:
        lines += ["", f"## {r['name']}", "", r["description"], ""]
        m = loaded[r["name"]]
        if m is None:
            lines += [f"**{r['status']}**", "", "```", r.get("message", "").strip()[-3000:], "```"]
            continue
        if m.get("quick"):
            lines += ["Quick mode: reduced samples, not comparable with the paper's numbers.", ""]
        lines += ["| metric | paper | ours | target | pass |", "|---|---|---|---|---|"]
        for key, val in m["metrics"].items():
            target = m.get("targets", {}).get(key)
            ok = check_target(val, target, m["metrics"])
            if key in m.get("paper", {}) or target is not None:
                lines.append(f"| {key} | {fmt(m['paper'].get(key))} | {fmt(val)} | {fmt(target)} | "
                             f"{'–' if ok is None else ('yes' if ok else '**no**')} |")
        tables = {k: v for k, v in m["metrics"].items() if is_table(v)}
        others = {k: v for k, v in m["metrics"].items() if k not in m.get("paper", {}) and k not in m.get("targets", {})
                  and k not in tables}
        if others:
            lines += ["", "Other numbers: " + ", ".join(f"{k} = {fmt(v)}" for k, v in others.items())]
        for key, rows_ in tables.items():  # e.g. Fig 5's flip rates per confidence decile
            cols = list(dict.fromkeys(c for row in rows_ for c in row))
            lines += ["", f"{key}:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for row in rows_]
        if m.get("notes"):
            lines += ["", m["notes"]]
        for png in sorted(Path(r["out"]).glob("*.png")):
            lines += ["", f"![{r['name']}]({os.path.relpath(png, path.parent)})"]
    board = path.parent / "benchmark_estimators" / "ESTIMATORS.md"
    lines += ["", "## Estimator leaderboard (scripts/benchmark_estimators.py)", ""]
    if board.is_file():  # written by its own run (hours in full); shown here as it stands
        lines += [f"From `{os.path.relpath(board, path.parent)}` (written "
                  f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(board.stat().st_mtime))}):", ""]
        lines += ["#" + ln if ln.startswith("#") else ln for ln in board.read_text().splitlines()
                  if not ln.startswith("# ")]
    else:
        lines += ["Not run yet: `.venv/bin/python scripts/benchmark_estimators.py` (add `--quick` for a "
                  "minutes-long check) writes it; it reuses the figure scripts' re-fits from this folder."]
    lines += ["", "## Software", ""] + [f"- {k} {v}" for k, v in software_versions().items()] + [""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def main(argv=None) -> int:
    from influence.utils import write_json

    parser = argparse.ArgumentParser(prog="scripts/reproduce_all.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced runs (minutes each)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the datasets (default: $INFLUENCE_DATA_DIR or ./data)")
    parser.add_argument("--out", default="output",
                        help="root of the experiments' output folders and REPORT.md (default: output)")
    parser.add_argument("--seed", type=int, default=0, help="seed passed to every experiment (default: 0)")
    parser.add_argument("--force", action="store_true", help="rerun experiments that are up to date")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these experiments; the other rows of REPORT.md are kept")
    parser.add_argument("--jobs", type=int, default=None,
                        help="experiments run side by side (default: 2 with --quick, where much of each run is "
                             "start-up and single-threaded work, else 1)")
    parser.add_argument("--heartbeat", type=float, default=30.0,
                        help="seconds between progress lines of a running experiment (default: 30)")
    args = parser.parse_args(argv)
    out_root = Path(args.out)
    known = [e[0] for e in EXPERIMENTS]
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; known: {known}")
    rows_path = out_root / "report_rows.json"
    kept = {}
    if args.only and rows_path.is_file():
        kept = {r["name"]: r for r in json.loads(rows_path.read_text())}
    todo = [e for e in EXPERIMENTS if not args.only or e[0] in args.only]

    def run_one(name, datasets, description) -> dict:
        script = REPO / "scripts" / f"{name}.py"
        out = out_root / name
        row = {"name": name, "description": description, "out": str(out)}
        cmd_args = ["--seed", str(args.seed)] + (["--quick"] if args.quick else []) + \
            (["--data-dir", args.data_dir] if args.data_dir else [])
        key = run_key(script, cmd_args, datasets, args.data_dir)
        if not args.force and is_up_to_date(out, key):
            row.update(status="ok", message="up to date (use --force to rerun)")
            row["wall_time_s"] = json.loads((out / "metrics.json").read_text()).get("wall_time_s")
            print(f"[{name}] up to date", flush=True)
            return row
        (out / "run_key.json").unlink(missing_ok=True)
        cmd = [sys.executable, str(script), "--out", str(out), *cmd_args]
        print(f"[{name}] running: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        code, tail = run_with_heartbeat(name, cmd, out / "run.log", args.heartbeat)
        row["wall_time_s"] = round(time.perf_counter() - t0, 1)
        if code == 0:
            row["status"] = "ok"
            write_json(out / "run_key.json", key)
        elif code == 2 and "data missing" in tail:
            row["status"] = "skipped (data missing)"
            row["message"] = next((ln for ln in reversed(tail.splitlines()) if "data missing" in ln), tail)
        else:
            row["status"] = f"FAILED (exit {code})"
            row["message"] = tail
        if row["status"] != "ok" and not any(p.name != "run.log" for p in out.iterdir()):
            (out / "run.log").unlink()  # nothing but the log: keep its tail in the report, not an empty folder
            out.rmdir()
        print(f"[{name}] {row['status']} in {row['wall_time_s']} s"
              + (f": {row.get('message', '').strip().splitlines()[-1]}" if row["status"] != "ok" else ""), flush=True)
        return row

    jobs = args.jobs or (2 if args.quick else 1)
    if jobs > 1:  # experiments side by side (each its own process); rows keep the table's order
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            done = dict(zip([e[0] for e in todo], pool.map(lambda e: run_one(*e), todo)))
    else:
        done = {e[0]: run_one(*e) for e in todo}
    rows = [done[name] if name in done else kept[name] for name, _, _ in EXPERIMENTS
            if name in done or name in kept]
    write_json(rows_path, rows)
    report = out_root / "REPORT.md"
    write_report(report, rows, args)
    print(f"wrote {report}")
    return 1 if any(r["status"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

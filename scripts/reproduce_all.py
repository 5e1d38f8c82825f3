#!/usr/bin/env python
"""Run every experiment of the reproduction and write output/REPORT.md.

Each experiment script runs in its own process (``--quick`` passes through). An
experiment whose data is missing is reported as skipped with the command that fetches
it; a failing experiment is reported and the others still run. An experiment whose
``metrics.json`` is newer than its script and the library is skipped unless ``--force``.
Exit status: 0 if nothing failed (skips for missing data are not failures), 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
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


def is_up_to_date(out: Path, script: Path, quick: bool) -> bool:
    metrics = out / "metrics.json"
    if not metrics.is_file():
        return False
    try:
        if json.loads(metrics.read_text()).get("quick") != quick:
            return False
    except json.JSONDecodeError:
        return False
    code = [script, *(REPO / "influence").rglob("*.py"), *(REPO / "inception").rglob("*.py")]
    newest_code = max(p.stat().st_mtime for p in code)
    return metrics.stat().st_mtime > newest_code


def check_target(value, target: str | None, metrics: dict | None = None):
    """Pass/fail of ``value`` against a target such as ">= 0.8", ">= other_metric" or "true (...)"."""
    if target is None or value is None:
        return None
    text = str(target).strip()
    if isinstance(value, bool) or text.lower().startswith(("true", "false")):
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


def write_report(path: Path, rows: list[dict], args) -> None:
    from influence.experiment import software_versions
    from influence.utils import atomic_path

    lines = ["# Reproduction report: Koh & Liang (2017), influence functions", "",
             f"Mode: {'quick' if args.quick else 'full'}; seed {args.seed}; data directory "
             f"`{args.data_dir or os.environ.get('INFLUENCE_DATA_DIR') or 'data'}`; "
             f"written {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
             "| experiment | status | wall time (s) |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['status']} | {fmt(r.get('wall_time_s'))} |")
    for r in rows:
        lines += ["", f"## {r['name']}", "", r["description"], ""]
        if r["status"] != "ok":
            lines += [f"**{r['status']}**", "", "```", r.get("message", "").strip()[-3000:], "```"]
            continue
        m = json.loads((r["out"] / "metrics.json").read_text())
        lines += ["| metric | paper | ours | target | pass |", "|---|---|---|---|---|"]
        for key, val in m["metrics"].items():
            target = m.get("targets", {}).get(key)
            ok = check_target(val, target, m["metrics"])
            if key in m.get("paper", {}) or target is not None:
                lines.append(f"| {key} | {fmt(m['paper'].get(key))} | {fmt(val)} | {fmt(target)} | "
                             f"{'–' if ok is None else ('yes' if ok else '**no**')} |")
        others = {k: v for k, v in m["metrics"].items() if k not in m.get("paper", {}) and k not in m.get("targets", {})}
        if others:
            lines += ["", "Other numbers: " + ", ".join(f"{k} = {fmt(v)}" for k, v in others.items())]
        if m.get("notes"):
            lines += ["", m["notes"]]
        for png in sorted(r["out"].glob("*.png")):
            lines += ["", f"![{r['name']}]({os.path.relpath(png, path.parent)})"]
    lines += ["", "## Software", ""] + [f"- {k} {v}" for k, v in software_versions().items()] + [""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/reproduce_all.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced runs (minutes each)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the datasets (default: $INFLUENCE_DATA_DIR or ./data)")
    parser.add_argument("--out", default="output",
                        help="root of the experiments' output folders and REPORT.md (default: output)")
    parser.add_argument("--seed", type=int, default=0, help="seed passed to every experiment (default: 0)")
    parser.add_argument("--force", action="store_true", help="rerun experiments that are up to date")
    parser.add_argument("--only", nargs="*", default=None, help="run only these experiments")
    args = parser.parse_args(argv)
    out_root = Path(args.out)
    rows = []
    for name, datasets, description in EXPERIMENTS:
        if args.only and name not in args.only:
            continue
        script = REPO / "scripts" / f"{name}.py"
        out = out_root / name
        row = {"name": name, "description": description, "out": out}
        if not args.force and is_up_to_date(out, script, args.quick):
            row.update(status="ok", message="up to date (use --force to rerun)")
            row["wall_time_s"] = json.loads((out / "metrics.json").read_text()).get("wall_time_s")
            print(f"[{name}] up to date", flush=True)
            rows.append(row)
            continue
        cmd = [sys.executable, str(script), "--out", str(out), "--seed", str(args.seed)]
        if args.quick:
            cmd.append("--quick")
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        print(f"[{name}] running: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row["wall_time_s"] = round(time.perf_counter() - t0, 1)
        if proc.returncode == 0:
            row["status"] = "ok"
        elif proc.returncode == 2 and "data missing" in proc.stderr:
            row["status"] = "skipped (data missing)"
            row["message"] = proc.stderr.strip().splitlines()[-1]
        else:
            row["status"] = f"FAILED (exit {proc.returncode})"
            row["message"] = proc.stderr
        print(f"[{name}] {row['status']} in {row['wall_time_s']} s"
              + (f": {row.get('message', '').strip().splitlines()[-1]}" if row["status"] != "ok" else ""), flush=True)
        rows.append(row)
    report = out_root / "REPORT.md"
    write_report(report, rows, args)
    print(f"wrote {report}")
    return 1 if any(r["status"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

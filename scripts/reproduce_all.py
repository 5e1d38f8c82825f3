#!/usr/bin/env python
"""Run every experiment of the reproduction and write output/REPORT.md.

Each experiment script runs in its own process (``--quick`` passes through); its whole
output goes to ``<out>/<experiment>/run.log`` and a heartbeat line (elapsed time and the
script's latest progress or log line) is printed every ``--heartbeat`` seconds. An
experiment whose data is missing is reported as skipped with the command that fetches
it; corrupt or unreadable data, or any other error, is a failure, and the others still
run. An experiment is "up to date" (not rerun, unless ``--force``) only when its last
successful run had the same code (a hash of the library and the script), the same
arguments and the same data files (size and content hash). Each experiment runs in a
process group of its own that ends with this driver, even a killed one. ``--only`` reruns the
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

from influence.report import (HEADLINE, STAND_IN, check_target, data_used, fmt, headline, is_table,  # noqa: F401
                              write_report)

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


def content_hash(path: Path, cache: dict | None = None) -> str:
    """SHA-256 of a file's bytes, remembered in ``cache`` under its path, size, modification and
    change times and inode (a file rewritten in place, even with its mtime restored, has a new
    ctime: hashed again)."""
    st = path.stat()
    ident = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    if cache is not None and ident in cache:
        return cache[ident]
    from influence.utils import sha256_file

    digest = sha256_file(path)
    if cache is not None:
        cache[ident] = digest
    return digest


def run_key(script: Path, cmd_args: list[str], datasets: list[str], data_dir: str | None,
            hashes: dict | None = None) -> dict:
    """What a result depends on: the code (hash of the library and the script), the arguments
    and the data files (path, size, content hash; ``hashes`` caches the hashes)."""
    h = hashlib.sha256()
    for path in sorted([script, *(REPO / "influence").rglob("*.py"), *(REPO / "inception").rglob("*.py")]):
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    data = [[str(p), p.stat().st_size, content_hash(p, hashes)] for p in data_files(datasets, data_dir)]
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
    # in a process group of its own that ends with this driver (even a SIGKILL'd one): no orphans
    guard = [sys.executable, str(REPO / "influence" / "process_group.py"), "--"]
    proc = subprocess.Popen(guard + cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

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
    hashes_path = out_root / ".data_hashes.json"  # content hashes of the data files, computed once per version
    try:
        hashes = json.loads(hashes_path.read_text())
    except (OSError, ValueError):
        hashes = {}

    def run_one(name, datasets, description) -> dict:
        script = REPO / "scripts" / f"{name}.py"
        out = out_root / name
        row = {"name": name, "description": description, "out": str(out)}
        cmd_args = ["--seed", str(args.seed)] + (["--quick"] if args.quick else []) + \
            (["--data-dir", args.data_dir] if args.data_dir else [])
        key = run_key(script, cmd_args, datasets, args.data_dir, hashes)
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
    write_json(hashes_path, hashes)
    rows = [done[name] if name in done else kept[name] for name, _, _ in EXPERIMENTS
            if name in done or name in kept]
    write_json(rows_path, rows)
    report = out_root / "REPORT.md"
    write_report(report, rows, args)
    print(f"wrote {report}")
    return 1 if any(r["status"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

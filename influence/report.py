"""The reproduction's report (``output/REPORT.md``): each experiment's headline metric beside
the paper's value with a verdict (meets / short / not comparable in quick mode), then every
metric, table and figure, the leaderboard as it stands, and the software versions.
``scripts/reproduce_all.py`` runs the experiments and calls :func:`write_report`."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path


# the data behind each experiment, for the report (the dog-fish classes are a stand-in: data/README.md)
def data_used(name: str, m: dict) -> str:
    """What the report's data column says: the run's own record (data_source) where it has one."""
    source = m.get("metrics", {}).get("data_source") or m.get("config", {}).get("data_source")
    return source or STAND_IN.get(name, "original")


STAND_IN = {"fig4_inception_vs_rbf": "stand-in dog/fish classes (Imagenette tench vs springer)",
            "fig5_training_set_attack": "stand-in dog/fish classes (Imagenette tench vs springer)"}


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

"""reproduce_all: verdicts, a cache keyed by code, arguments and data, --only keeping rows,
missing vs corrupt data, and world-readable outputs."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import reproduce_all  # noqa: E402


def test_verdicts():
    full = {"quick": False, "metrics": {"pearson": 0.9, "top4_are_children": True, "flip_rate_1": 0.0,
                                        "flip_rate_2": 0.01},
            "paper": {"pearson": 0.86}, "targets": {"pearson": ">= 0.80", "top4_are_children": "== 1",
                                                    "flip_rate_1": ">= 0.3", "flip_rate_2": ">= flip_rate_1"}}
    assert reproduce_all.headline("fig2_cnn_loo", full) == ("pearson", "meets")
    assert reproduce_all.headline("sec53_hospital_readmission", full) == ("top4_are_children", "meets")  # boolean
    assert reproduce_all.headline("fig5_training_set_attack", full) == ("flip_rate_1", "**short**")
    assert reproduce_all.headline("x", {**full, "headline": "flip_rate_2"}) == ("flip_rate_2", "meets")  # relative
    assert reproduce_all.headline("fig2_cnn_loo", {**full, "quick": True})[1] == "not comparable (quick mode)"
    assert reproduce_all.check_target(False, "== 1") is False and reproduce_all.check_target(True, "== 1") is True


def test_cache_key_follows_arguments_data_and_code(tmp_path):
    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    f = data / "mnist" / "train-images-idx3-ubyte.gz"
    f.write_bytes(b"x")
    script = REPO / "scripts" / "fig2_logreg_loo.py"
    key = reproduce_all.run_key(script, ["--seed", "0"], ["mnist"], str(data))
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "run_key.json").write_text(json.dumps(key))
    assert reproduce_all.is_up_to_date(out, reproduce_all.run_key(script, ["--seed", "0"], ["mnist"], str(data)))
    assert not reproduce_all.is_up_to_date(out, reproduce_all.run_key(script, ["--seed", "1"], ["mnist"], str(data)))
    other = tmp_path / "other"
    (other / "mnist").mkdir(parents=True)
    assert not reproduce_all.is_up_to_date(out, reproduce_all.run_key(script, ["--seed", "0"], ["mnist"], str(other)))
    (out / "run_key.json").write_text(json.dumps(reproduce_all.run_key(script, ["--seed", "0"], ["mnist"], str(data))))
    f.write_bytes(b"xy")  # the data changed
    assert not reproduce_all.is_up_to_date(out, reproduce_all.run_key(script, ["--seed", "0"], ["mnist"], str(data)))
    assert not reproduce_all.is_up_to_date(out, dict(key, code="0" * 64))  # another version of the code


def run_all(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce_all.py"), "--heartbeat", "5", *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def test_corrupt_data_fails_and_missing_data_skips_keeping_other_rows(tmp_path):
    out = tmp_path / "out"
    # an earlier row (as a previous run would have left it) that --only must keep
    demo = out / "demo_digits"
    demo.mkdir(parents=True)
    (demo / "metrics.json").write_text(json.dumps({"quick": True, "metrics": {"loo_pearson_cg": 0.99}, "paper": {},
                                                   "targets": {"loo_pearson_cg": ">= 0.95"}}))
    (out / "report_rows.json").write_text(json.dumps([{"name": "demo_digits", "description": "demo", "out": str(demo),
                                                        "status": "ok", "wall_time_s": 1.0}]))
    corrupt = tmp_path / "corrupt"
    (corrupt / "mnist").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (corrupt / "mnist" / name).write_bytes(gzip.compress(b"not an idx file at all")[:10])  # truncated
    bad = run_all("--quick", "--out", str(out), "--only", "fig2_logreg_loo", "--data-dir", str(corrupt))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    report = (out / "REPORT.md").read_text()
    assert "| fig2_logreg_loo | FAILED (exit 3) |" in report and "python -m influence.datasets fetch mnist" in report
    assert "| demo_digits | ok | loo_pearson_cg |" in report  # kept
    assert not (out / "fig2_logreg_loo").exists()  # a failed run leaves no (nearly) empty folder
    missing = run_all("--quick", "--out", str(out), "--only", "fig2_logreg_loo", "--data-dir", str(tmp_path / "none"))
    assert missing.returncode == 0, missing.stdout + missing.stderr
    report = (out / "REPORT.md").read_text()
    assert "| fig2_logreg_loo | skipped (data missing) |" in report and "| demo_digits | ok |" in report
    assert oct(os.stat(out / "REPORT.md").st_mode & 0o777) == "0o644"


def test_unknown_experiment_is_refused(tmp_path):
    proc = run_all("--only", "fig9", "--out", str(tmp_path))
    assert proc.returncode == 2 and "unknown experiment" in proc.stderr


@pytest.mark.parametrize("writer", ["json", "npz"])
def test_outputs_are_world_readable(tmp_path, writer):
    from influence.utils import save_npz, write_json

    path = tmp_path / f"x.{writer}"
    write_json(path, {"a": 1}) if writer == "json" else save_npz(path, a=[1, 2])
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_report_tables_data_source_and_leaderboard(tmp_path):
    import argparse

    fig5 = tmp_path / "fig5_training_set_attack"
    fig5.mkdir()
    deciles = [{"decile": 1, "n": 10, "log_odds_median": 1.25, "flip_rate_1": 0.6},
               {"decile": 2, "n": 10, "log_odds_median": 3.5, "flip_rate_1": 0.2}]
    (fig5 / "metrics.json").write_text(json.dumps({
        "quick": False, "metrics": {"flip_rate_1": 0.08, "flip_rates_by_decile": deciles,
                                    "data_source": "original release (dataset_dog-fish_train-900_test-300.npz)"},
        "paper": {"flip_rate_1": 0.57}, "targets": {"flip_rate_1": ">= 0.3"}}))
    args = argparse.Namespace(quick=False, seed=0, data_dir="d", only=None)
    rows = [{"name": "fig5_training_set_attack", "description": "Fig 5", "out": str(fig5), "status": "ok",
             "wall_time_s": 3.0}]
    reproduce_all.write_report(tmp_path / "REPORT.md", rows, args)
    report = (tmp_path / "REPORT.md").read_text()
    assert "| flip_rate_1 | 0.57 | 0.08 | >= 0.3 | **short** | 3 | original release" in report  # its own record
    assert "| decile | n | log_odds_median | flip_rate_1 |" in report and "| 1 | 10 | 1.25 | 0.6 |" in report
    assert "Not run yet: `.venv/bin/python scripts/benchmark_estimators.py`" in report
    board = tmp_path / "benchmark_estimators"
    board.mkdir()
    (board / "ESTIMATORS.md").write_text("# Estimator leaderboard\n\n## fig2_lr\n\n| estimator | LDS |\n|---|---|\n"
                                         "| exact | 0.97 |\n")
    reproduce_all.write_report(tmp_path / "REPORT.md", rows, args)
    report = (tmp_path / "REPORT.md").read_text()
    assert "### fig2_lr" in report and "| exact | 0.97 |" in report and "Not run yet" not in report

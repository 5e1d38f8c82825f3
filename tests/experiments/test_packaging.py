"""The Dockerfile, the experiment contract and the report writer."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["demo_digits", "fig1_components", "fig2_logreg_loo", "fig2_cnn_loo", "fig3_smooth_hinge",
           "sec53_hospital_readmission", "fig6_spam_mislabel", "fig4_inception_vs_rbf", "fig5_training_set_attack"]


def test_dockerfile_copies_existing_files_and_runs_an_existing_command():
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    copies = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY")]
    assert copies
    for sources in copies:
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    cmd = [ln for ln in lines if ln.startswith("CMD")]
    assert len(cmd) == 1
    argv = json.loads(cmd[0][3:].strip())
    assert argv[0] == "python" and (REPO / argv[1]).is_file()
    assert lines[0] == "ARG BASE_IMAGE=python:3.11-slim" and lines[1] == "FROM ${BASE_IMAGE}"  # Python 3.11 by default
    script = REPO / "tests" / "docker" / "check_image.sh"
    assert os.access(script, os.X_OK) and "--build-arg BASE_IMAGE" in script.read_text()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest" in readme and ".venv/bin/python -m pytest" in ci


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_follow_the_contract(name):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), "--help"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for flag in ("--data-dir", "--out", "--seed", "--quick"):
        assert flag in out.stdout


def test_missing_data_exits_2_with_fetch_hint(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "fig2_logreg_loo.py"), "--quick", "--data-dir",
                          str(tmp_path / "none"), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2
    assert "python -m influence.datasets fetch mnist" in out.stderr
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_reproduce_all_runs_demo_and_writes_report(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "reproduce_all.py"), "--quick", "--out", str(tmp_path),
           "--only", "demo_digits", "fig2_logreg_loo", "--data-dir", str(tmp_path / "no-data")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    report = (tmp_path / "REPORT.md").read_text()
    assert "| demo_digits | ok |" in report and "skipped (data missing)" in report
    assert "loo_pearson_cg" in report and "![demo_digits]" in report
    metrics = json.loads((tmp_path / "demo_digits" / "metrics.json").read_text())
    assert metrics["metrics"]["loo_pearson_cg"] >= 0.95
    for f in ("arrays.npz", "demo_digits.png", "demo_digits.pdf"):
        assert (tmp_path / "demo_digits" / f).is_file()
    # a second run finds it up to date
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert "[demo_digits] up to date" in again.stdout


def test_report_checks_targets():
    sys.path.insert(0, str(REPO / "scripts"))
    from reproduce_all import check_target

    assert check_target(0.85, ">= 0.80") is True and check_target(0.5, ">= 0.80") is False
    assert check_target(0.4, "<= 0.5") is True
    assert check_target(True, "true (RBF more distance-driven)") is True
    assert check_target(False, "true") is False
    assert check_target(0.5, ">= flip_rate_1", {"flip_rate_1": 0.6}) is False
    assert check_target(0.7, ">= flip_rate_1", {"flip_rate_1": 0.6}) is True
    assert check_target(0.7, "about right") is None and check_target(None, ">= 1") is None


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS[1:])
def test_experiment_quick_end_to_end(name, tmp_path):
    from conftest import shared_data_dir

    data = shared_data_dir()
    if data is None:
        pytest.skip(reason="no data directory (set INFLUENCE_DATA_DIR)")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), "--quick", "--data-dir", str(data),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["quick"] is True and m["metrics"]
    sys.path.insert(0, str(REPO / "scripts"))
    from reproduce_all import check_target

    for metric, target in m["targets"].items():
        assert check_target(m["metrics"][metric], target, m["metrics"]) is not False, (metric, target)


def test_readme_usage_snippet_runs_as_a_plain_script(tmp_path):
    """The README's "own model" code, pasted at a script's top level (no __main__ guard),
    runs on the digits: its LOO check agrees with the influence predictions, and the Keras
    example gives an influence matrix of the right shape."""
    section = (REPO / "README.md").read_text().split("## Using it on your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2  # the built-in model with LOO, then the user's own Keras model
    code = "\n".join(blocks)
    prelude = ("from sklearn.datasets import load_digits\n"
               "X, y = load_digits(return_X_y=True)\n"
               "X_train, y_train, x_test, y_test = X[:300] / 16.0, y[:300], X[300:301] / 16.0, y[300:301]\n")
    epilogue = ("\nimport json\nprint(json.dumps({'pearson': loo.pearson, 'residual': float(res.residual), "
                "'scores_shape': list(scores.shape), 'scores_finite': bool(np.isfinite(scores).all()), "
                "'helpful': ranked.helpful.tolist(), 'harmful': ranked.harmful.tolist(), "
                "'top_helpful': int(np.argmax(pred)), 'top_harmful': int(np.argmin(pred)), "
                "'keras_pearson': float(kloo.pearson), 'keras_drift': float(kloo.info['control_drift'])}))\n")
    script = tmp_path / "snippet.py"
    script.write_text(prelude + code + epilogue)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["pearson"] > 0.99
    assert out["residual"] < 1e-6
    assert out["scores_shape"] == [5, 300] and out["scores_finite"]
    assert len(out["helpful"]) == len(out["harmful"]) == 5
    assert out["helpful"][0] == out["top_helpful"] and out["harmful"][0] == out["top_harmful"]
    assert np.isfinite(out["keras_pearson"]) and np.isfinite(out["keras_drift"])  # LOO by continued training

"""dattri's MNIST benchmark: the LDS against a direct Spearman loop, reproducible subsets and
models, and a tiny quick-mode run of the script that writes the table with dattri's column."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from influence.evaluation.attribution_benchmark import (PUBLISHED, build_network, draw_subsets, lds_per_test,  # noqa: E402
                                                        summarize)

ROOT = Path(__file__).resolve().parents[2]


def test_lds_equals_a_direct_spearman_loop_with_ties_and_a_constant_column():
    rng = np.random.default_rng(0)
    n_train, n_test, S = 40, 6, 12
    scores = rng.standard_normal((n_test, n_train))
    scores[2] = np.round(scores[2])  # ties in the predictions
    masks = draw_subsets(n_train, S, seed=3)
    targets = rng.standard_normal((S, n_test))
    targets[:, 4] = np.round(targets[:, 4] * 2)  # ties in the target
    targets[:, 5] = 1.0  # a constant target: undefined correlation
    got = lds_per_test(scores, masks, targets)
    for t in range(n_test):
        pred = [scores[t, masks[s]].sum() for s in range(S)]
        if t == 5:
            assert np.isnan(got[t])
        else:
            assert got[t] == pytest.approx(scipy.stats.spearmanr(pred, targets[:, t])[0], abs=1e-12)
    mean, half = summarize(got)
    finite = got[np.isfinite(got)]
    assert mean == pytest.approx(finite.mean()) and half == pytest.approx(1.96 * finite.std(ddof=1) / np.sqrt(5))
    # a perfect additive model scores 1 whatever the scale
    exact = masks.astype(float) @ scores.T
    assert np.allclose(lds_per_test(3 * scores, masks, exact), 1.0)


def test_subsets_and_model_initialisation_are_reproducible():
    a, b, c = draw_subsets(100, 7, seed=1), draw_subsets(100, 7, seed=1), draw_subsets(100, 7, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert (a.sum(axis=1) == 50).all() and len({r.tobytes() for r in a}) == 7
    w1 = build_network("mlp", 5).get_weights()
    w2 = build_network("mlp", 5).get_weights()
    w3 = build_network("mlp", 6).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(w1, w2)) and not np.array_equal(w1[0], w3[0])
    # PyTorch nn.Linear's initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernel and bias
    assert [w.shape for w in w1] == [(784, 128), (128,), (128, 64), (64,), (64, 10), (10,)]
    assert np.abs(w1[0]).max() <= 1 / np.sqrt(784) and np.abs(w1[3]).max() <= 1 / np.sqrt(128)
    assert np.abs(w1[0]).max() > 0.9 / np.sqrt(784)


def _quick_run(out, data_dir):
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark_attribution.py"), "--quick", "--out", str(out),
           "--data-dir", str(data_dir), "--n-train", "150", "--n-test", "12", "--n-val", "8", "--n-subsets", "6",
           "--n-val-subsets", "4", "--epochs", "1", "--n-jobs", "1",
           "--methods", "grad-dot", "IF EK-FAC", "TRAK-1", "TRAK-2", "random"]
    env = {**os.environ, "INFLUENCE_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _data_dir():
    from conftest import shared_data_dir

    data_dir = shared_data_dir()
    if data_dir is None:
        pytest.skip(reason="no data directory (set INFLUENCE_DATA_DIR)")
    return data_dir


def test_quick_run_writes_the_table_with_the_published_column(tmp_path):
    out = tmp_path / "bench"
    proc = _quick_run(out, _data_dir())
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "TABLE.md").read_text()
    assert "dattri published" in table and "dattri 0.3.0" in table
    rows = [ln for ln in table.splitlines() if ln.startswith("| LR |")]
    assert [r.split("|")[2].strip() for r in rows] == ["IF EK-FAC", "grad-dot", "TRAK-1", "random", "TRAK-2"]
    for name in ("TRAK-1", "grad-dot"):
        row = next(r for r in rows if f"| {name} |" in r)
        assert row.rstrip(" |").endswith(f"{PUBLISHED['lr'][name]:.2f}")
    assert next(r for r in rows if "| random |" in r).rstrip(" |").endswith("–")  # no published number
    m = json.loads((out / "metrics.json").read_text())
    assert m["paper"]["lr/TRAK-1"] == PUBLISHED["lr"]["TRAK-1"] and "lr/random" not in m["paper"]
    for r in m["metrics"].values():
        assert -1 <= r["lds"] <= 1 and r["models"] >= 1
    assert m["metrics"]["lr/TRAK-2"]["models"] == 2
    assert m["metrics"]["lr/IF EK-FAC"]["picked"] in (0.1, 0.01)  # from the quick grid, on validation
    assert (out / "benchmark_attribution.png").is_file() and (out / "benchmark_attribution.pdf").is_file()


@pytest.mark.slow
def test_a_second_run_trains_nothing_and_reuses_the_journaled_scores(tmp_path):
    out = tmp_path / "bench"
    data = _data_dir()
    first = _quick_run(out, data)
    assert first.returncode == 0, first.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    again = _quick_run(out, data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training lr" not in again.stderr and again.stderr.count("from the journal") == 6  # 5 rows, EK-FAC x2
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["metrics"] == m["metrics"]

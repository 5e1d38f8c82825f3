"""influence.evaluation: the fit record round trip, stored-run readers, and the leaderboard's
scoring and tables on a small convex model (LOO against exact re-fits)."""
import json

import numpy as np
import pytest

from influence import LogisticRegression
from influence.evaluation import fit_record, leaderboard, stored_runs


class AdamLike:
    """A model whose fit leaves the state the fit record keeps (theta, Adam moments, step, lr)."""

    def __init__(self, seed=0):
        self.seed = seed
        self.fits = 0

    def cache_identity(self):
        return {"class": "AdamLike", "seed": self.seed}

    def fit(self, X, y):
        self.fits += 1
        self.theta_ = np.arange(4.0) + self.seed
        self.adam_state_ = (np.ones(4), 2 * np.ones(4), 7)
        self.final_learning_rate_ = 1e-3
        return self

    def set_training_data(self, X, y):
        return self

    def set_theta(self, theta):
        self.theta_ = np.asarray(theta)
        return self

    def gradient(self):
        return np.zeros(4)

    def restore_fit(self, X, y, theta, adam_state=None, final_learning_rate=None):
        self.set_training_data(X, y).set_theta(theta)
        self.adam_state_, self.final_learning_rate_ = adam_state, final_learning_rate
        self.grad_norm_ = float(np.linalg.norm(self.gradient()))
        return self


def test_fit_record_restores_the_fit_and_its_reader_finds_the_state(tmp_path):
    X, y = np.zeros((3, 2)), np.zeros(3)
    first = AdamLike()
    fit_record.fit_from_journal(first, X, y, tmp_path / "fit.jsonl")
    again = AdamLike()
    fit_record.fit_from_journal(again, X, y, tmp_path / "fit.jsonl")
    assert first.fits == 1 and again.fits == 0  # restored, not re-trained
    np.testing.assert_array_equal(again.theta_, first.theta_)
    assert again.adam_state_[2] == 7 and again.final_learning_rate_ == 1e-3
    (m, v, t), lr = fit_record.fitted_state(tmp_path, first.theta_)
    np.testing.assert_array_equal(v, 2 * np.ones(4))
    assert t == 7 and lr == 1e-3
    assert fit_record.fitted_state(tmp_path, first.theta_ + 1) is None  # another theta: not this fit
    other = AdamLike(seed=1)  # another configuration: its own entry, the first one untouched
    fit_record.fit_from_journal(other, X, y, tmp_path / "fit.jsonl")
    assert other.fits == 1


def test_read_run_needs_both_files(tmp_path):
    assert stored_runs.read_run(tmp_path) is None
    np.savez(tmp_path / "arrays.npz", a=np.arange(3))
    assert stored_runs.read_run(tmp_path) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"metrics": {"x": 1}}))
    arrays, metrics = stored_runs.read_run(tmp_path)
    np.testing.assert_array_equal(arrays["a"], np.arange(3)) and metrics["metrics"]["x"] == 1


@pytest.fixture(scope="module")
def board(digits):
    X, y = digits
    model = LogisticRegression(weight_decay=0.05).fit(X[:150], y[:150])
    point = (X[200:201], y[200:201])
    removed, actual, _ = leaderboard.own_loo(model, *point, k=6, n_jobs=1)
    return model, leaderboard.convex_board(model, X[200:260], y[200:260], quick=True, lds_tests=2, lds_subsets=4,
                                           n_jobs=1, loo=(removed, actual), loo_point=point)


def test_convex_board_scores_every_estimator_against_the_same_refits(board):
    model, b = board
    labels = set(b.rows)
    assert {"exact", "CG", "Arnoldi rank 50, fill = wd", "K-FAC", "EK-FAC", "TRAK (proj 2048, 1 model)",
            "grad dot", "random"} <= labels
    assert b.rows["exact"]["loo_pearson"] > 0.95 and b.rows["CG"]["loo_pearson"] > 0.95  # exact re-fits
    assert abs(b.rows["exact"]["loo_pearson"] - b.rows["CG"]["loo_pearson"]) < 1e-4
    for row in b.rows.values():
        assert {"seconds", "lds", "lds_min", "loo_pearson"} <= set(row) and -1 <= row["lds"] <= 1


def test_markdown_tables_carry_every_row_and_the_loo_source(board):
    _, b = board
    b.source = "six re-fits made here"
    lines, metrics = leaderboard.markdown({"small": b}, ["a note"])
    text = "\n".join(lines)
    assert "## small" in text and "LOO: six re-fits made here" in text and "- a note" in text
    for label, row in b.rows.items():
        assert any(line.startswith(f"| {label} | {row['loo_pearson']:.3f}") for line in lines), label
        assert metrics[f"small.{label}.lds"] == row["lds"]

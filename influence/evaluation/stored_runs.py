"""Readers of the figure scripts' stored outputs, shared by the benchmarks and the leaderboard.

An experiment's output folder holds ``arrays.npz`` and ``metrics.json``
(:mod:`influence.experiment`); the Fig 2 CNN's also its fit record
(:mod:`influence.evaluation.fit_record`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def read_run(path):
    """``(arrays, metrics)`` of an experiment's output folder, or None where either file is absent."""
    path = Path(path)
    if not (path / "arrays.npz").is_file() or not (path / "metrics.json").is_file():
        return None
    with np.load(path / "arrays.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads((path / "metrics.json").read_text())


@dataclass
class StoredCNN:
    """The Fig 2 CNN of a stored ``fig2_cnn_loo`` run, rebuilt at its theta on its training subset."""

    model: object
    arrays: dict
    metrics: dict
    data: object          # the MNIST splits (images)
    folder: Path

    @property
    def config(self) -> dict:
        return self.metrics["config"]

    @property
    def test_point(self):
        t = self.config["test_idx"]
        return self.data.test.x[t:t + 1], self.data.test.y[t:t + 1]

    @property
    def removed(self) -> np.ndarray:
        return self.arrays["removed_indices"]

    @property
    def actual(self) -> np.ndarray:
        return self.arrays["actual_loss_diffs"]

    @property
    def damping_used(self) -> float:
        """The damping of the figure's CG solve on H (raised past a negative eigenvalue)."""
        return self.metrics["metrics"].get("damping_used", self.config["damping"])


def stored_cnn(folder, data_dir, with_refit_settings: bool = False) -> StoredCNN | None:
    """The stored Fig 2 CNN of ``folder`` (None: no stored run there). ``with_refit_settings``:
    configured to re-fit as the figure did (Adam continued for its retrain steps)."""
    from ..datasets.mnist import load_mnist
    from ..models.all_cnn import AllCNN

    st = read_run(folder)
    if st is None:
        return None
    arrays, metrics = st
    cfg = metrics["config"]
    d = load_mnist(data_dir, flatten=False)
    sub = arrays["train_subset"]
    extra = {}
    if with_refit_settings:
        extra = dict(train_batch_size=500, retrain="adam", retrain_steps=cfg["retrain_steps"],
                     retrain_learning_rate=cfg["retrain_learning_rate"], seed=metrics.get("seed", 0))
    model = AllCNN(weight_decay=0.001, dtype=cfg.get("dtype", "float64"), **extra)
    model.set_training_data(d.train.x[sub], d.train.y[sub]).set_theta(arrays["theta"])
    return StoredCNN(model, arrays, metrics, d, Path(folder))


def replayed_checkpoints(cfg, seed, X, y, theta, out, k=10):
    """TracIn's checkpoints for the figure's CNN, whose fit kept none: the fit run again with the
    figure's configuration, data and seed, recording ``(theta, learning rate)`` k times
    (journaled in ``<out>/cnn_tracin_checkpoints.jsonl``: once per stored fit). Returns the
    checkpoints and ``max |theta_end - theta_stored|`` (0 where the replay is bit for bit)."""
    from ..models.all_cnn import AllCNN
    from ..result_store import Journal
    from ..utils import hash_arrays

    model = AllCNN(weight_decay=0.001, learning_rate=cfg["learning_rate"], adam_steps=cfg["adam_steps"],
                   train_batch_size=500, decay_fractions=tuple(cfg["decay_fractions"]), lbfgs_iter=cfg["lbfgs_iter"],
                   dtype=cfg.get("dtype", "float64"), seed=seed, checkpoints=k, progress=True)
    book = Journal(Path(out) / "cnn_tracin_checkpoints.jsonl",
                   {"what": "fig2 CNN fit replayed for TracIn", "model": model.cache_identity(),
                    "data": hash_arrays(np.asarray(X), np.asarray(y)), "theta": hash_arrays(theta)})
    saved = book.arrays("checkpoints") if "checkpoints" in book else None
    if saved is None:
        logger.info("TracIn: running the figure's fit again to record %d checkpoints", k)
        model.fit(X, y)
        saved = {"thetas": np.stack([th for th, _ in model.checkpoints_]),
                 "lrs": np.array([lr for _, lr in model.checkpoints_], dtype=float)}
        book.add("checkpoints", {"max_abs_theta_diff": float(np.max(np.abs(model.theta_ - theta)))}, arrays=saved)
    diff = book.get("checkpoints")["max_abs_theta_diff"]
    return [(th, float(lr)) for th, lr in zip(saved["thetas"], saved["lrs"])], diff

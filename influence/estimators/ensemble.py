"""Ensembles of any estimator: scores averaged over independently trained models or checkpoints.

    A_ens(t, i) = (1/M) sum_m A(t, i; model_m)

with ``A`` any estimator's ``I_up,loss``-signed scores (influence by any solver on H or G, the
gradient index, TracIn, ...), each computed on its own member. Members must hold the same
training points in the same order (the scores are averaged per training point): networks
trained with other seeds, other checkpoints of one run (:meth:`Ensemble.from_checkpoints`), or
trained on other data and then given the full training set with ``set_training_data``. For a
non-convex network the members' own seed noise is what the average removes; it is the
ensembling of TRAK (Park et al. 2023) applied to influence functions.
"""
from __future__ import annotations

import numpy as np

from ..model_kernels import quiet_member_traces
from .base import Estimator


class Ensemble(Estimator):
    """``Ensemble(estimator, models, **options)``: estimator ``estimator`` (a registry name, e.g.
    ``"influence"``, ``"index"``, with ``options``; or a callable ``() -> Estimator``) made afresh
    for each member of ``models`` (fitted models holding one training set) and its scores averaged.
    ``fit(model)`` names the model whose training set is scored (it may be one of the members;
    ``models=None``: it alone)."""

    name = "ensemble"

    def __init__(self, estimator="influence", models: list | None = None, **options):
        super().__init__()
        if isinstance(estimator, Estimator):
            raise ValueError("Ensemble(estimator=...): give the estimator's registry name and its options, or a "
                             "callable that makes a fresh estimator (each member gets its own: estimators hold "
                             "per-model state)")
        if not (isinstance(estimator, str) or callable(estimator)):
            raise ValueError(f"Ensemble(estimator=...) must be a registry name or a callable, got {estimator!r}")
        if isinstance(estimator, str) and estimator == "ensemble":
            raise ValueError("Ensemble(estimator='ensemble'): nest ensembles by listing all members in one")
        if models is not None and not list(models):
            raise ValueError("Ensemble(models=[]): give at least one fitted model (None: the fitted model alone)")
        self.estimator = estimator
        self.options = dict(options)
        self._models = None if models is None else list(models)
        for m in self._models or []:
            m.require_fit()
        self.make()  # options checked now, before any work

    @classmethod
    def from_checkpoints(cls, model, checkpoints, estimator="influence", **options) -> "Ensemble":
        """Members at each checkpoint's theta (``(theta, lr)`` pairs or bare thetas) of one run of ``model``."""
        thetas = [c[0] if isinstance(c, tuple) else c for c in checkpoints]
        return cls(estimator, [model.at_theta(np.asarray(t)) for t in thetas], **options)

    def make(self) -> Estimator:
        """A fresh estimator for one member."""
        if callable(self.estimator) and not isinstance(self.estimator, str):
            est = self.estimator()
            if not isinstance(est, Estimator):
                raise ValueError(f"Ensemble(estimator=callable) must return an Estimator, got {type(est).__name__}")
            return est
        from . import get_estimator

        return get_estimator(self.estimator, **self.options)

    @property
    def _members(self) -> list:
        return self._models if self._models is not None else [self.model_]

    def fit(self, model) -> "Ensemble":
        super().fit(model)
        for k, m in enumerate(self._members):
            if m.n_train_ != model.n_train_ or m.data_fingerprint_ != model.data_fingerprint_:
                raise ValueError(f"Ensemble: member {k} ({type(m).__name__}) holds other training points than the "
                                 f"fitted model (n = {m.n_train_} vs {model.n_train_}, data fingerprint "
                                 f"{m.data_fingerprint_[:12]} vs {model.data_fingerprint_[:12]})")
        return self

    def _influence_matrix(self, X_test, y_test, indices=None) -> np.ndarray:
        total = None
        with quiet_member_traces():  # one compiled kernel per member
            for m in self._members:
                A = np.asarray(self.make().fit(m).influence_matrix(X_test, y_test, indices=indices), dtype=np.float64)
                total = A if total is None else total + A
        return total / len(self._members)

    def _self_scores(self) -> np.ndarray:
        with quiet_member_traces():
            return np.mean([self.make().fit(m).self_scores() for m in self._members], axis=0)

    def config(self) -> dict:
        return {"estimator": self.name, "base": self.estimator if isinstance(self.estimator, str) else "callable",
                "options": self.options, "members": len(self._members)}

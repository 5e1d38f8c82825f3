"""Baselines without curvature: gradient dot product and cosine at the fitted parameters, random scores."""
from __future__ import annotations

import numpy as np

from ..validation import check_number

from .base import Estimator, squared_gradient_norms, test_and_train_gradients


class _IndexServed(Estimator):
    """``index``: a :class:`~influence.index.GradientIndex` (built on ``fit`` unless it already
    holds this model) that serves the scores from its projected gradients: one pass over the
    training set, then a matrix product per query, instead of every training gradient per call."""

    cosine = False

    def __init__(self, index=None):
        super().__init__()
        if index is not None and not hasattr(index, "gradient_similarity"):
            raise ValueError(f"index must be a GradientIndex (influence.index), got {type(index).__name__}")
        self.index = index

    def fit(self, model) -> "Estimator":
        super().fit(model)
        if self.index is not None and not self._index_holds(model):
            self.index.fit(model)
        return self

    def _index_holds(self, model) -> bool:
        try:
            return self.index.model_ is model
        except RuntimeError:  # not fitted yet
            return False

    def _influence_matrix(self, X_test, y_test, indices=None) -> np.ndarray:
        if self.index is not None:
            return self.index.gradient_similarity(X_test, y_test, cosine=self.cosine, indices=indices)
        return self._exact_matrix(X_test, y_test, indices)


class GradientDot(_IndexServed):
    """``-grad L(z_test) . g(z_i)``: influence with the identity for ``H`` (``g`` includes the
    regulariser's gradient, as ``I_up,loss`` does). ``index=GradientIndex(...)``: from projected
    gradients (:class:`_IndexServed`)."""

    name = "grad_dot"

    def _exact_matrix(self, X_test, y_test, indices=None) -> np.ndarray:
        G_test, idx, chunks = test_and_train_gradients(self.model_, X_test, y_test, indices)
        out = np.empty((len(G_test), len(idx)))
        for sl, G in chunks:
            out[:, sl] = -G_test @ G.T
        return out

    def _self_scores(self) -> np.ndarray:
        return -squared_gradient_norms(self.model_, include_regularizer=True)


class GradientCosine(_IndexServed):
    """``-cos(grad L(z_test), g(z_i))``: the dot product with both gradients normalised
    (``index=``: from projected gradients)."""

    name = "grad_cos"
    cosine = True

    def _exact_matrix(self, X_test, y_test, indices=None) -> np.ndarray:
        G_test, idx, chunks = test_and_train_gradients(self.model_, X_test, y_test, indices)
        G_test = G_test / np.maximum(np.linalg.norm(G_test, axis=1, keepdims=True), 1e-300)
        out = np.empty((len(G_test), len(idx)))
        for sl, G in chunks:
            out[:, sl] = -G_test @ (G / np.maximum(np.linalg.norm(G, axis=1, keepdims=True), 1e-300)).T
        return out

    def _self_scores(self) -> np.ndarray:
        return -np.ones(self.model_.n_train_)  # every gradient's cosine with itself


class RandomScores(Estimator):
    """Seeded standard-normal scores: what an estimator must beat."""

    name = "random"

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = check_number("seed", seed, low=0, integer=True)

    def _influence_matrix(self, X_test, y_test, indices=None) -> np.ndarray:
        model = self.model_
        X_test, _ = model.as_batch(X_test, y_test)
        return np.random.default_rng(self.seed).standard_normal((len(X_test), len(model.check_indices(indices))))

    def _self_scores(self) -> np.ndarray:
        return np.random.default_rng(self.seed).standard_normal(self.model_.n_train_)

"""TRAK (Park et al. 2023): attribution from randomly projected gradients of the model's margin.

For each training point ``i`` and test point ``t``, with ``m`` the model output function
(the log-odds of the true label: a binary model's signed logit ``(2y - 1) z``, a
multiclass model's ``log p_y - log(1 - p_y)``; the smooth-hinge SVM's margin ``y z``)::

    phi_i = P^T grad m(z_i; theta)          (P: p x proj_dim, seeded Gaussian, entries N(0, 1/proj_dim);
                                              the identity when proj_dim >= p)
    tau(t, i) = phi_t^T (Phi^T Phi + damping I)^-1 phi_i * Q_i,   Q_i = -dL/dm(z_i)  (= 1 - p_i, logistic)

(a pseudo-inverse where ``Phi^T Phi`` is singular, e.g. pixels that are always 0)

averaged over an ensemble of models trained from different seeds (one model for convex
models, whose optimum does not depend on the seed). ``tau > 0`` marks a training point
that supports the test prediction (helpful), so the estimator returns ``-tau``, in
``I_up,loss``'s convention. Gradients are projected chunk by chunk: no n x p matrix.
"""
from __future__ import annotations

import numpy as np

from ..validation import check_number
from .base import Estimator


def gaussian_projection(p: int, proj_dim: int, seed: int = 0) -> np.ndarray | None:
    """The (p, proj_dim) projection with N(0, 1/proj_dim) entries (``E[P P^T] = I``), or None
    (the identity) when ``proj_dim >= p``."""
    if proj_dim >= p:
        return None
    return np.random.default_rng(seed).standard_normal((p, proj_dim)) / np.sqrt(proj_dim)


def margin_kernel(model):
    """tf.function ``(theta, x, y) -> (margins (b,), Q (b,), margin gradients (b, p))`` of one model
    (a new one per call: :class:`TRAK` keeps one per ensemble member). The margin is the model's
    own (``model.margin_function()``, e.g. the smooth-hinge SVM's ``y z``) or the log-odds of its
    predictive distribution."""
    import tensorflow as tf

    from ..model_kernels import quiet_vectorized_map

    own = model.margin_function()
    if own is not None:
        margin, weight = own
    elif model.predictive == "sigmoid":
        def margin(out, y):
            return (2 * tf.cast(y, out.dtype) - 1) * tf.reshape(out, [-1])

        def weight(m):
            return 1 - tf.sigmoid(m)
    elif model.predictive == "softmax":
        def margin(out, y):
            y = tf.cast(y, tf.int32)
            z_y = tf.gather(out, y, batch_dims=1)
            is_y = tf.one_hot(y, tf.shape(out)[1], dtype=out.dtype) > 0
            others = tf.where(is_y, tf.constant(-np.inf, out.dtype), out)
            return z_y - tf.reduce_logsumexp(others, axis=1)

        def weight(m):
            return 1 - tf.sigmoid(m)
    else:
        raise ValueError(f"TRAK needs a classifier (softmax or sigmoid outputs, or the smooth-hinge SVM); "
                         f"{type(model).__name__} has predictive={model.predictive!r}")

    def kernel(theta, x, y):
        def one(args):
            xi, yi = args
            with tf.GradientTape() as tape:
                tape.watch(theta)
                m = margin(model.forward(model.unflatten(theta), xi[None]), yi[None])[0]
            return m, tape.gradient(m, theta)
        m, g = quiet_vectorized_map(one, (x, y))
        return m, weight(m), g

    return tf.function(kernel, reduce_retracing=True)


def projected_margin_gradients(model, X, y_encoded, P, chunk: int | None = None, kernel=None):
    """``(phi (n, d), Q (n,))`` for examples ``X`` with encoded labels, projected by ``P`` chunk by chunk."""
    import tensorflow as tf

    kernel = margin_kernel(model) if kernel is None else kernel
    th = model.theta_tensor()
    c = chunk or max(1, min(model.batch_size, model.rows_per_chunk()))
    phis, qs = [], []
    for j in range(0, len(X), c):
        _, q, g = kernel(th, tf.constant(X[j:j + c]), tf.constant(y_encoded[j:j + c]))
        g = g.numpy()
        phis.append(g if P is None else g @ P)
        qs.append(q.numpy())
    return np.concatenate(phis), np.concatenate(qs)


class TRAK(Estimator):
    """TRAK scores (module docstring). ``proj_dim`` (default 2048; the identity when >= p),
    ``damping`` (added to ``Phi^T Phi``), ``seed`` (the projection; model ``k`` of an
    ensemble uses ``seed + k``), ``models`` (an ensemble of fitted models on the same
    training set; default: the model passed in)."""

    name = "trak"

    def __init__(self, proj_dim: int = 2048, damping: float = 0.0, seed: int = 0, models: list | None = None):
        super().__init__()
        self.proj_dim = check_number("proj_dim", proj_dim, low=1, integer=True)
        self.damping = check_number("damping", damping, low=0.0)
        self.seed = check_number("seed", seed, low=0, integer=True)
        self._models = None if models is None else list(models)
        self._kernels = {}  # id(member) -> (member, its compiled margin kernel)

    def _kernel(self, m):
        hit = self._kernels.get(id(m))
        if hit is None or hit[0] is not m:
            hit = self._kernels[id(m)] = (m, margin_kernel(m))
        return hit[1]

    def _ensemble(self) -> list:
        """The members, each checked to hold the training set of the model the estimator is
        fitted on (same points, same order: the scores are summed per training point)."""
        model = self.model_
        ensemble = list(self._models) if self._models else [model]
        for k, m in enumerate(ensemble):
            m.require_fit()
            if m.n_train_ != model.n_train_ or m.data_fingerprint_ != model.data_fingerprint_:
                raise ValueError(f"TRAK(models=...): member {k} ({type(m).__name__}) holds other training points "
                                 f"than the fitted model (n = {m.n_train_} vs {model.n_train_}, data fingerprint "
                                 f"{m.data_fingerprint_[:12]} vs {model.data_fingerprint_[:12]}); every member must "
                                 f"hold the same training set, in the same order")
        return ensemble

    def _features(self, m, k):
        """``(P, Phi, Q, (Phi^T Phi + damping I)^+ as (U, inv))`` of ensemble member ``k``."""
        P = gaussian_projection(m.n_params, self.proj_dim, self.seed + k)
        Phi, Q = projected_margin_gradients(m, m.X_train_np_, m.y_train_.numpy(), P, kernel=self._kernel(m))
        w, U = np.linalg.eigh(Phi.T @ Phi + self.damping * np.eye(Phi.shape[1]))
        inv = np.where(w > 1e-12 * max(w.max(), 1e-300), 1 / np.where(w > 0, w, 1), 0.0)  # pseudo-inverse
        return P, Phi, Q, U, inv

    def _self_scores(self) -> np.ndarray:
        """``-tau(i, i) = -phi_i^T (Phi^T Phi + damping I)^+ phi_i Q_i``, averaged over the ensemble."""
        ensemble = self._ensemble()
        total = 0.0
        for k, m in enumerate(ensemble):
            _, Phi, Q, U, inv = self._features(m, k)
            total = total + np.sum(((Phi @ U) * inv) * (Phi @ U), axis=1) * Q
        return -total / len(ensemble)

    def _influence_matrix(self, X_test, y_test, indices=None) -> np.ndarray:
        model = self.model_
        ensemble = self._ensemble()
        X_test, y_test = model.as_batch(X_test, y_test)
        idx = model.check_indices(indices)
        total = np.zeros((len(X_test), len(idx)))
        for k, m in enumerate(ensemble):
            P, Phi, Q, U, inv = self._features(m, k)
            Xt, yt = m.check_xy(X_test, y_test, "X_test")
            phi_t, _ = projected_margin_gradients(m, Xt, yt, P, kernel=self._kernel(m))
            total += (((phi_t @ U) * inv) @ (U.T @ Phi[idx].T)) * Q[idx]
        return -total / len(ensemble)

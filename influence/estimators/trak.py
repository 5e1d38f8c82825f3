"""TRAK (Park et al. 2023): attribution from randomly projected gradients of the model's margin.

For each training point ``i`` and test point ``t``, with ``m`` the model output function
(the log-odds of the true label: a binary model's signed logit ``(2y - 1) z``, a
multiclass model's ``log p_y - log(1 - p_y)``; the smooth-hinge SVM's margin ``y z``)::

    phi_i = P^T grad m(z_i; theta)          (P: p x proj_dim, entries of variance 1/proj_dim, seeded;
                                              the identity when proj_dim >= p)
    tau(t, i) = phi_t^T (Phi^T Phi + damping I)^-1 phi_i * Q_i,   Q_i = -dL/dm(z_i)  (= 1 - p_i, logistic)

(a pseudo-inverse where ``Phi^T Phi`` is singular, e.g. pixels that are always 0)

For an ensemble of models (other seeds, checkpoints or training subsets) the kernel term
``phi_t^T (Phi^T Phi + damping I)^-1 phi_i`` is averaged over the members and multiplied by
the members' mean ``Q_i``, as TRAK does (one model suffices for a convex model, whose optimum
does not depend on the seed). ``P``: for softmax / sigmoid classifiers built of Dense and
Conv2D layers the gradient index's Kronecker (LoGra) projection of the *loss* gradients,
``P^T grad L = -Q P^T grad m``, divided by ``-Q`` (no (p, proj_dim) matrix is formed);
otherwise a dense seeded Gaussian in float32. ``tau > 0`` marks a training point
that supports the test prediction (helpful), so the estimator returns ``-tau``, in
``I_up,loss``'s convention. Gradients are projected chunk by chunk: no n x p matrix.
"""
from __future__ import annotations

import numpy as np

from ..validation import check_choice, check_number
from .base import Estimator


def gaussian_projection(p: int, proj_dim: int, seed: int = 0) -> np.ndarray | None:
    """The (p, proj_dim) projection with N(0, 1/proj_dim) entries (``E[P P^T] = I``), or None
    (the identity) when ``proj_dim >= p``."""
    if proj_dim >= p:
        return None
    return (np.random.default_rng(seed).standard_normal((p, proj_dim), dtype=np.float32)
            / np.float32(np.sqrt(proj_dim)))


class BlockGaussian:
    """The (p, k) Gaussian projection (entries N(0, 1/k)) applied to rows ``G`` (m, p) as ``G P``,
    its rows generated ``block`` at a time from ``(seed, first row)`` and never held whole:
    memory O(block k), the same ``P`` on every call."""

    def __init__(self, p: int, k: int, seed: int = 0, block: int = 4096):
        self.p, self.k, self.seed, self.block = int(p), int(k), int(seed), int(block)

    def __call__(self, G: np.ndarray) -> np.ndarray:
        G = np.asarray(G)
        out = np.zeros((len(G), self.k), dtype=np.float64)
        scale = np.float32(1 / np.sqrt(self.k))
        for a in range(0, self.p, self.block):
            b = min(a + self.block, self.p)
            P = np.random.default_rng([self.seed, a]).standard_normal((b - a, self.k), dtype=np.float32) * scale
            out += G[:, a:b] @ P
        return out


#: TRAK's ``projection="auto"``: a Gaussian up to this many entries of P (p * proj_dim), else
#: the Kronecker projection (generating a larger P for every block of examples costs more than
#: the gradients)
GAUSSIAN_MAX_ENTRIES = 2 ** 25


def _margin_fns(model):
    """``(margin(outputs, y), weight(margin))`` of ``model`` (its own, or the log-odds of its predictive)."""
    import tensorflow as tf

    own = model.margin_function()
    if own is not None:
        return own
    if model.predictive == "sigmoid":
        def margin(out, y):
            return (2 * tf.cast(y, out.dtype) - 1) * tf.reshape(out, [-1])
    elif model.predictive == "softmax":
        def margin(out, y):
            y = tf.cast(y, tf.int32)
            z_y = tf.gather(out, y, batch_dims=1)
            is_y = tf.one_hot(y, tf.shape(out)[1], dtype=out.dtype) > 0
            others = tf.where(is_y, tf.constant(-np.inf, out.dtype), out)
            return z_y - tf.reduce_logsumexp(others, axis=1)
    else:
        raise ValueError(f"TRAK needs a classifier (softmax or sigmoid outputs, or the smooth-hinge SVM); "
                         f"{type(model).__name__} has predictive={model.predictive!r}")

    def weight(m):
        return 1 - tf.sigmoid(m)
    return margin, weight


def margin_weights(model):
    """tf.function ``(theta, x, y) -> Q (b,)``: TRAK's ``Q_i = -dL/dm`` at each example (float64)."""
    import tensorflow as tf

    margin, weight = _margin_fns(model)

    def run(theta, x, y):
        m = tf.cast(margin(model.forward(model.unflatten(theta), x), y), tf.float64)
        return weight(m)
    return tf.function(run, reduce_retracing=True)


def margin_kernel(model):
    """tf.function ``(theta, x, y) -> (margins (b,), Q (b,), margin gradients (b, p))`` of one model
    (a new one per call: :class:`TRAK` keeps one per ensemble member). The margin is the model's
    own (``model.margin_function()``, e.g. the smooth-hinge SVM's ``y z``) or the log-odds of its
    predictive distribution."""
    import tensorflow as tf

    from ..model_kernels import quiet_vectorized_map

    margin, weight = _margin_fns(model)

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
    """``(phi (n, d), Q (n,))`` for examples ``X`` with encoded labels, projected by ``P`` (None: the
    identity; an array; or a callable ``G -> G P`` such as :class:`BlockGaussian`, given blocks of
    up to ~2^26 gradient entries) chunk by chunk."""
    import tensorflow as tf

    kernel = margin_kernel(model) if kernel is None else kernel
    th = model.theta_tensor()
    c = chunk or max(1, min(model.batch_size, model.rows_per_chunk()))
    project = (lambda G: G) if P is None else (P if callable(P) else (lambda G: G @ P))
    rows_per_block = max(c, 2 ** 26 // max(model.n_params, 1))
    phis, qs, pending = [], [], []

    def flush():
        if pending:
            phis.append(np.asarray(project(np.concatenate(pending)), dtype=np.float64))
            pending.clear()
    for j in range(0, len(X), c):
        _, q, g = kernel(th, tf.constant(X[j:j + c]), tf.constant(y_encoded[j:j + c]))
        pending.append(g.numpy())
        qs.append(q.numpy())
        if sum(len(x) for x in pending) >= rows_per_block:
            flush()
    flush()
    return np.concatenate(phis), np.concatenate(qs)


class TRAK(Estimator):
    """TRAK scores (module docstring).

    Parameters
    ----------
    proj_dim : int
        The projected dimension (default 2048; the identity when >= p).
    damping : float
        Added to ``Phi^T Phi`` (default 0: a pseudo-inverse).
    seed : int
        The projection's seed; ensemble member ``k`` uses ``seed + k``.
    models : list of fitted models or None
        TRAK's ensemble: models that hold the same training points in the same order (the
        scores are summed per training point), each trained independently -- other seeds,
        other checkpoints of one run, or, as in TRAK's paper, other random subsets of the
        training data (fit each member's wrapper with the full training set afterwards:
        ``set_training_data``). Default: the model passed to ``fit``.
    projection : {"auto", "kronecker", "gaussian"}
        "kronecker": the gradient index's LoGra projection of the loss gradients (no (p, k)
        matrix; softmax / sigmoid classifiers with Dense / Conv2D layers), divided by
        ``-Q_i`` to give the margin gradients (``grad L = -Q grad m`` for the log-odds margin);
        "gaussian": TRAK's own seeded Gaussian (p, proj_dim) projection, generated in blocks of
        rows and never held whole (:class:`BlockGaussian`; float32); "auto": gaussian while
        ``p * proj_dim <= GAUSSIAN_MAX_ENTRIES`` (2^25) or where kronecker does not apply, else
        kronecker.
    """

    name = "trak"

    def __init__(self, proj_dim: int = 2048, damping: float = 0.0, seed: int = 0, models: list | None = None,
                 projection: str = "auto"):
        super().__init__()
        self.proj_dim = check_number("proj_dim", proj_dim, low=1, integer=True)
        self.damping = check_number("damping", damping, low=0.0)
        self.seed = check_number("seed", seed, low=0, integer=True)
        self.projection = check_choice("projection", projection, ("auto", "kronecker", "gaussian"))
        self._models = None if models is None else list(models)
        self._kernels = {}  # id(member) -> (member, its compiled kernel(s))

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
                                 f"hold the same training set, in the same order (train it on any subset, then "
                                 f"set_training_data with the full one)")
        return ensemble

    def _route(self, m) -> str:
        """"kronecker" or "gaussian" for member ``m`` (option ``projection``)."""
        usable = m.margin_function() is None and m.predictive in ("softmax", "sigmoid")
        small = m.n_params * min(self.proj_dim, m.n_params) <= GAUSSIAN_MAX_ENTRIES
        if self.projection == "gaussian" or (self.projection == "auto" and (not usable or small)):
            return "gaussian"
        if not usable:
            raise ValueError(f"TRAK(projection='kronecker') needs a softmax or sigmoid classifier whose margin is "
                             f"the log-odds; {type(m).__name__} has predictive={m.predictive!r}: use "
                             f"projection='gaussian'")
        from ..index.projection import KroneckerProjection, make_projection  # the index sits on this floor

        proj = make_projection(m, self.proj_dim, "auto" if self.projection == "auto" else "kronecker", self.seed)
        if self.projection == "auto" and not isinstance(proj, KroneckerProjection) and self.proj_dim < m.n_params:
            return "gaussian"
        return "kronecker"

    def _project(self, m, k, X, y_enc):
        """``(phi (n, d), Q (n,))`` of member ``k`` for examples ``(X, y_enc)``."""
        import tensorflow as tf

        if self._route(m) == "gaussian":
            P = None if self.proj_dim >= m.n_params else BlockGaussian(m.n_params, self.proj_dim, self.seed + k)
            return projected_margin_gradients(m, X, y_enc, P, kernel=self._kernel(m))
        from ..index.gradient_index import project_gradients, row_kernel
        from ..index.projection import make_projection

        key = ("kron", id(m), k)
        hit = self._kernels.get(key)
        if hit is None or hit[0] is not m:
            proj = make_projection(m, self.proj_dim, "auto", self.seed + k)
            hit = self._kernels[key] = (m, (proj, row_kernel(m, proj), margin_weights(m)))
        proj, rows, weights = hit[1]
        G = project_gradients(m, proj, X, y_enc, kernel=rows).astype(np.float64)
        th = m.theta_tensor()
        Q = np.concatenate([weights(th, tf.constant(X[j:j + 1024]), tf.constant(y_enc[j:j + 1024])).numpy()
                            for j in range(0, len(X), 1024)]).astype(np.float64)
        return -G / np.maximum(Q, np.finfo(np.float64).tiny)[:, None], Q

    def _features(self, m, k):
        """``(Phi, Q, U, inv)``: member ``k``'s training features and ``(Phi^T Phi + damping I)^+``."""
        Phi, Q = self._project(m, k, m.X_train_np_, m.y_train_.numpy())
        w, U = np.linalg.eigh(Phi.T @ Phi + self.damping * np.eye(Phi.shape[1]))
        inv = np.where(w > 1e-12 * max(w.max(), 1e-300), 1 / np.where(w > 0, w, 1), 0.0)  # pseudo-inverse
        return Phi, Q, U, inv

    def _self_scores(self) -> np.ndarray:
        """``-tau(i, i)``: the ensemble's mean of ``phi_i^T (Phi^T Phi + damping I)^+ phi_i`` times its mean ``Q_i``."""
        from ..model_kernels import quiet_member_traces

        ensemble = self._ensemble()
        kern, qs = 0.0, 0.0
        with quiet_member_traces():
            for k, m in enumerate(ensemble):
                Phi, Q, U, inv = self._features(m, k)
                kern = kern + np.sum(((Phi @ U) * inv) * (Phi @ U), axis=1)
                qs = qs + Q
        return -(kern / len(ensemble)) * (qs / len(ensemble))

    def _influence_matrix(self, X_test, y_test, indices=None) -> np.ndarray:
        """``-tau``: TRAK's ensemble average of the kernel term, times the ensemble's mean ``Q_i``."""
        from ..model_kernels import quiet_member_traces

        model = self.model_
        ensemble = self._ensemble()
        X_test, y_test = model.as_batch(X_test, y_test)
        idx = model.check_indices(indices)
        kern, qs = np.zeros((len(X_test), len(idx))), 0.0
        with quiet_member_traces():
            for k, m in enumerate(ensemble):
                Phi, Q, U, inv = self._features(m, k)
                Xt, yt = m.check_xy(X_test, y_test, "X_test")
                phi_t, _ = self._project(m, k, Xt, yt)
                kern += ((phi_t @ U) * inv) @ (U.T @ Phi[idx].T)
                qs = qs + Q[idx]
        return -(kern / len(ensemble)) * (qs / len(ensemble))

    def config(self) -> dict:
        return {"estimator": self.name, "proj_dim": self.proj_dim, "damping": self.damping, "seed": self.seed,
                "projection": self.projection, "models": None if self._models is None else len(self._models)}

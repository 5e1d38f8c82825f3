"""LiSSA: the stochastic Neumann series for ``(H + damping I)^-1 v`` (Agarwal et al. 2017).

``H^-1 = (1/scale) sum_j (I - H/scale)^j`` for ``scale > lambda_max(H)``, each term's ``H``
replaced by a minibatch Hessian; the original code's solver for large models.
"""
from __future__ import annotations

import logging

import numpy as np

from ..validation import check_number
from .base import InverseHVPSolver, LissaDivergenceError, SolveResult, relative_residual

logger = logging.getLogger(__name__)


AUTO_SCALE_RESTARTS = 3  # scale="auto": how often the scale is raised (x4) after a divergence
AUTO_SCALE_GROWTH = 4.0


def series_loop(operator):
    """The compiled LiSSA loop over ``operator``'s minibatch products (one per operator)::

        repeat: est <- V + est - (C_B est + damping est) / scale   (C_B: the batch's curvature)

    for the k columns of V (p, k) at once, on the same minibatches ``idx`` (depth, b);
    stops early when any column's norm leaves its limit (the caller then raises). Built once
    and held by the operator (:meth:`CurvatureOperator.owned`).
    """
    return operator.owned("lissa_series_loop", lambda: _build_series_loop(operator))


def _build_series_loop(operator):
    import tensorflow as tf

    model = operator.model
    dt = model.tf_dtype
    mask = tf.constant(model.decay_mask_, dtype=dt)
    wd = tf.constant(model.weight_decay, dtype=dt)

    def lissa_loop_many(theta, X, Y, V, idx, scale, damping, limits):
        depth = tf.shape(idx)[0]
        b = tf.cast(tf.shape(idx)[1], dt)

        def cond(j, est, ratio):
            return (j < depth) & tf.math.is_finite(ratio) & (ratio < 1)

        def body(j, est, ratio):
            xb = tf.gather(X, idx[j])
            yb = tf.gather(Y, idx[j])
            hv = operator.batch_sum_many(theta, xb, yb, est) / b + wd * mask[:, None] * est + damping * est
            est = V + est - hv / scale
            return j + 1, est, tf.reduce_max(tf.norm(est, axis=0) / limits)

        return tf.while_loop(cond, body, (tf.constant(0), V, tf.reduce_max(tf.norm(V, axis=0) / limits)))

    return tf.function(lissa_loop_many, reduce_retracing=True)


class LissaSolver(InverseHVPSolver):
    """LiSSA: the stochastic Neumann-series estimate of Agarwal et al. (2017).

    For each of ``num_samples`` independent samples, starting from ``est = v``::

        repeat depth times:  est <- v + est - (H_B + damping I) est / scale

    where ``H_B`` is the Hessian of the objective on a minibatch ``B`` of ``batch_size``
    training points drawn uniformly with replacement (seeded). Then ``x ~= est / scale``,
    averaged over samples. The series converges when ``scale`` exceeds the largest
    eigenvalue of every ``H_B + damping I`` it draws.

    ``scale="auto"`` bounds exactly that: with ``c_i`` the largest eigenvalue of training
    point ``i``'s loss Hessian (all points, one vectorised pass:
    :meth:`~influence.curvature.CurvatureOperator.per_example_curvature`), Weyl's inequality
    gives ``lambda_max(H_B) <= mean_{i in B} c_i + wd``, and the scale is ``safety`` times
    the largest such bound over the very minibatches the samples will draw (+ damping).
    The bound is exact for models whose outputs are linear in theta and for the
    Gauss-Newton curvature; for other models ``c_i`` comes from the Gauss-Newton part
    scaled by power iterations on the most curved points. Full batches (``batch_size``
    None or >= n) use power iteration on the full matrix. Should the series still
    diverge, the scale is raised ``AUTO_SCALE_GROWTH``-fold and the solve restarted, at
    most ``AUTO_SCALE_RESTARTS`` times (``info["scale_restarts"]``).
    A NaN/inf or exploding estimate raises :class:`LissaDivergenceError`.
    """

    name = "lissa"

    approximate = True

    def __init__(self, damping: float = 0.0, scale: float | str = 10.0, depth: int = 5000,
                 num_samples: int = 1, batch_size: int | None = 1, seed: int = 0, safety: float = 1.5,
                 divergence_factor: float = 1e10):
        super().__init__(damping)
        if scale != "auto":
            if isinstance(scale, str):
                raise ValueError(f"scale must be a number > 0 or 'auto', got {scale!r}")
            scale = check_number("scale", scale, low=0.0, low_open=True)
        self.scale = scale
        self.depth = check_number("depth", depth, low=1, integer=True)
        self.num_samples = check_number("num_samples", num_samples, low=1, integer=True)
        self.batch_size = check_number("batch_size", batch_size, low=1, integer=True, allow_none=True)
        self.seed = check_number("seed", seed, low=0, integer=True)
        self.safety = check_number("safety", safety, low=1.0)
        self.divergence_factor = check_number("divergence_factor", divergence_factor, low=1.0, low_open=True)

    def _batch(self, model) -> int:
        return min(int(self.batch_size or model.n_train_), model.n_train_)

    def _draw_batches(self, rng, n: int, b: int) -> np.ndarray:
        """One sample's minibatches, (depth, b); the solve and the scale bound draw the same ones."""
        return rng.integers(0, n, size=(self.depth, b)).astype(np.int32)

    def estimate_scale(self, operator=None) -> tuple[float, dict]:
        """``safety`` times an upper bound on ``lambda_max(H_B + damping I)`` over every minibatch
        ``B`` this solve will draw (class docstring), and how it was obtained."""
        op = self.operator_ if operator is None else operator
        model = op.model
        n, b = model.n_train_, self._batch(model)
        damping = float(self.damping)
        if b >= n:  # one deterministic series on the full matrix
            rng = np.random.default_rng(self.seed)
            u = rng.standard_normal(model.n_params)
            u /= np.linalg.norm(u)
            for _ in range(30):
                w = op.hvp(u) + damping * u
                est = float(np.linalg.norm(w))
                u = w / max(est, 1e-300)
            return self.safety * est, {"scale_bound": est, "scale_bound_kind": "power iteration on the full matrix"}
        curv = op.per_example_curvature()
        rng = np.random.default_rng(self.seed)
        worst = max(float(curv[self._draw_batches(rng, n, b)].mean(axis=1).max()) for _ in range(self.num_samples))
        reg = model.weight_decay if np.any(model.decay_mask_) else 0.0
        bound = worst + reg + damping
        exact = model.linear_outputs or op.kind == "gauss-newton"
        return self.safety * bound, {
            "scale_bound": bound, "largest_example_curvature": float(curv.max()),
            "median_example_curvature": float(np.median(curv)),
            "scale_bound_kind": "per-example curvature, exact" if exact else
                                "per-example Gauss-Newton curvature, scaled by power iterations"}

    def _solve(self, v):
        model = self.operator_.model
        if self.scale != "auto":
            return self._series(model, v, float(self.scale), {})
        scale, info = self.estimate_scale()
        first, restarts = scale, 0
        while True:
            try:
                res = self._series(model, v, scale, info)
                break
            except LissaDivergenceError as exc:
                if restarts >= AUTO_SCALE_RESTARTS:
                    raise LissaDivergenceError(
                        f"LiSSA diverged with scale='auto' (estimated {first:.4g}, raised to {scale:.4g} in "
                        f"{restarts} restart(s)), batch_size={self._batch(model)}: {exc.args[0]} The curvature bound did not "
                        f"hold (a non-convex model?); add damping, pass an explicit scale above {scale:.4g}, or "
                        f"use solver='cg'.") from None
                restarts += 1
                scale *= AUTO_SCALE_GROWTH
                logger.warning("LiSSA diverged with scale %.4g; restarting with scale %.4g (%d of %d)",
                               scale / AUTO_SCALE_GROWTH, scale, restarts, AUTO_SCALE_RESTARTS)
        res.info.update(scale_auto=True, scale_estimate=first, scale_restarts=restarts)
        return res

    def _series(self, model, v, scale: float, info: dict) -> SolveResult:
        """The Neumann series for every column and sample at a fixed ``scale``."""
        import tensorflow as tf

        rng = np.random.default_rng(self.seed)
        cols = v if v.ndim == 2 else v[:, None]
        n, b = model.n_train_, self._batch(model)
        estimates = np.empty((self.num_samples, *cols.shape))
        th = model.theta_tensor()
        op = self.operator_
        step = op.columns_per_pass()
        loop = series_loop(op) if b < n else None
        for s in range(self.num_samples):
            idx = self._draw_batches(rng, n, b) if b < n else None
            for k0 in range(0, cols.shape[1], step):  # a block of columns on the same minibatches
                vk = cols[:, k0:k0 + step]
                limit = self.divergence_factor * np.maximum(np.linalg.norm(vk, axis=0), 1e-300) * max(scale, 1.0)
                if idx is not None:  # in one compiled loop
                    j, est, ratio = loop(
                        th, model.X_train_, model.y_train_, tf.constant(vk, model.tf_dtype), tf.constant(idx),
                        tf.constant(scale, model.tf_dtype), tf.constant(self.damping, model.tf_dtype),
                        tf.constant(limit, model.tf_dtype))
                    j, est, ratio = int(j), est.numpy(), float(ratio)
                else:  # full-batch: deterministic series
                    est, j = vk.copy(), 0
                    ratio = float(np.max(np.linalg.norm(est, axis=0) / limit))
                    while j < self.depth and np.isfinite(ratio) and ratio < 1:
                        est = vk + est - (op.hvp(est) + self.damping * est) / scale
                        j, ratio = j + 1, float(np.max(np.linalg.norm(est, axis=0) / limit))
                norm = float(np.max(np.linalg.norm(est, axis=0)))
                if not np.isfinite(ratio) or ratio >= 1:
                    what = (f"scale={scale:.4g}, batch_size={b}" + ("" if b < n else " (full batch)"))
                    advice = ("" if self.scale == "auto" else
                              " Pass scale='auto' (bounded from every training point's curvature), a larger scale,"
                              " or add damping.")
                    raise LissaDivergenceError(
                        f"LiSSA diverged after {j} of {self.depth} steps (norm {norm:.3g}) with {what}: the scale "
                        f"must exceed the largest eigenvalue of every minibatch Hessian (+ damping).{advice}")
                estimates[s, :, k0:k0 + est.shape[1]] = est / scale
        x = estimates.mean(axis=0)
        spread = 0.0
        if self.num_samples > 1:
            spread = float(np.max(np.linalg.norm(estimates.std(axis=0, ddof=1), axis=0)
                                  / np.maximum(np.linalg.norm(x, axis=0), 1e-300)))
        x = x if v.ndim == 2 else x[:, 0]
        res = relative_residual(op, x, v, self.damping)
        if res > 0.5:
            logger.warning("LiSSA estimate has relative residual %.2f: raise depth, or check scale (%.4g)",
                           res, scale)
        return SolveResult(x=x, solver=self.name, iterations=self.depth * self.num_samples, residual=res,
                           converged=res < 0.1, damping=self.damping, spread=spread, info={"scale": scale, **info})

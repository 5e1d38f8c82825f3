"""LiSSA: the stochastic Neumann series for ``(H + damping I)^-1 v`` (Agarwal et al. 2017).

``H^-1 = (1/scale) sum_j (I - H/scale)^j`` for ``scale > lambda_max(H)``, each term's ``H``
replaced by a minibatch Hessian; the original code's solver for large models.
"""
from __future__ import annotations

import logging

import numpy as np

from .base import InverseHVPSolver, LissaDivergenceError, SolveResult, relative_residual

logger = logging.getLogger(__name__)


class LissaSolver(InverseHVPSolver):
    """LiSSA: the stochastic Neumann-series estimate of Agarwal et al. (2017).

    For each of ``num_samples`` independent samples, starting from ``est = v``::

        repeat depth times:  est <- v + est - (H_B + damping I) est / scale

    where ``H_B`` is the Hessian of the objective on a minibatch ``B`` of ``batch_size``
    training points drawn uniformly with replacement (seeded). Then ``x ~= est / scale``,
    averaged over samples. The series converges when ``scale`` exceeds the largest
    eigenvalue of every ``H_B + damping I``; ``scale="auto"`` sets it to
    ``safety * lambda_max`` estimated by power iteration on sampled minibatch Hessians.
    A NaN/inf or exploding estimate raises :class:`LissaDivergenceError`.
    """

    name = "lissa"

    def __init__(self, damping: float = 0.0, scale: float | str = 10.0, depth: int = 5000,
                 num_samples: int = 1, batch_size: int | None = 1, seed: int = 0, safety: float = 1.5,
                 divergence_factor: float = 1e10):
        super().__init__(damping)
        if not (scale == "auto" or float(scale) > 0):
            raise ValueError("scale must be positive or 'auto'")
        self.scale = scale
        self.depth = int(depth)
        self.num_samples = int(num_samples)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.safety = float(safety)
        self.divergence_factor = float(divergence_factor)

    def estimate_scale(self, model, rng) -> float:
        """``safety * max lambda_max(H_B + damping I)`` over a few sampled minibatches."""
        n, b = model.n_train_, self.batch_size or model.n_train_
        lam = 0.0
        for _ in range(1 if b >= n else 8):
            idx = None if b >= n else rng.integers(0, n, size=b)
            u = rng.standard_normal(model.n_params)
            u /= np.linalg.norm(u)
            for _ in range(30):
                w = model.hvp(u, indices=idx) + self.damping * u
                est = float(np.linalg.norm(w))
                u = w / max(est, 1e-300)
            lam = max(lam, est)
        return self.safety * lam

    def _solve(self, model, v):
        import tensorflow as tf

        rng = np.random.default_rng(self.seed)
        scale = self.estimate_scale(model, rng) if self.scale == "auto" else float(self.scale)
        cols = v if v.ndim == 2 else v[:, None]
        n, b = model.n_train_, self.batch_size or model.n_train_
        estimates = np.empty((self.num_samples, *cols.shape))
        th = model._theta_tf()
        for s in range(self.num_samples):
            idx = rng.integers(0, n, size=(self.depth, b)).astype(np.int32) if b < n else None
            for k in range(cols.shape[1]):
                vk = cols[:, k]
                limit = self.divergence_factor * max(np.linalg.norm(vk), 1e-300) * max(scale, 1.0)
                if idx is not None:
                    j, est, norm = model._tf_lissa_loop(th, model.X_train_, model.y_train_, tf.constant(vk), tf.constant(idx),
                                                        tf.constant(scale, model.tf_dtype),
                                                        tf.constant(self.damping, model.tf_dtype),
                                                        tf.constant(limit, model.tf_dtype),
                                                        model.curvature == "gauss-newton")
                    j, est, norm = int(j), est.numpy(), float(norm)
                else:  # full-batch: deterministic series
                    est, j, norm = vk.copy(), 0, np.linalg.norm(vk)
                    while j < self.depth and np.isfinite(norm) and norm < limit:
                        est = vk + est - (model.hvp(est) + self.damping * est) / scale
                        j, norm = j + 1, np.linalg.norm(est)
                if not np.isfinite(norm) or norm >= limit:
                    raise LissaDivergenceError(
                        f"LiSSA diverged after {j} of {self.depth} steps (norm {norm:.3g}) with scale={scale:.4g}: "
                        f"scale must exceed the largest eigenvalue of the minibatch Hessians. Raise `scale` "
                        f"(or pass scale='auto'), or add damping.")
                estimates[s, :, k] = est / scale
        x = estimates.mean(axis=0)
        spread = 0.0
        if self.num_samples > 1:
            spread = float(np.max(np.linalg.norm(estimates.std(axis=0, ddof=1), axis=0)
                                  / np.maximum(np.linalg.norm(x, axis=0), 1e-300)))
        x = x if v.ndim == 2 else x[:, 0]
        res = relative_residual(model, x, v, self.damping)
        if res > 0.5:
            logger.warning("LiSSA estimate has relative residual %.2f: raise depth, or check scale (%.4g)",
                           res, scale)
        return SolveResult(x=x, solver=self.name, iterations=self.depth * self.num_samples, residual=res,
                           converged=res < 0.1, damping=self.damping, spread=spread, info={"scale": scale})

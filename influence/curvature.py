"""Curvature of the training objective: HVPs, the explicit Hessian and its extreme eigenvalues.

``hvp`` gives ``H v = (1/n) sum_i nabla^2 L(z_i) v + wd * mask * v`` (or, with
``curvature="gauss-newton"``, ``G v``, see :mod:`influence.generic_neural_net`) from
batched double backprop over the training set; everything the solvers need.
"""
from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from .utils import hash_arrays, progress

logger = logging.getLogger(__name__)

CURVATURES = ("hessian", "gauss-newton")


def check_curvature(curvature: str) -> str:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    return curvature


class CurvatureMixin:
    """``hvp``, ``hessian``, ``hessian_eigenvalue_bounds`` and ``per_example_curvature`` for
    :class:`GenericNeuralNet`."""

    #: the outputs are linear in theta (then H = G, and per-example curvatures are exact)
    linear_outputs = False
    #: most columns one batched HVP pass carries (``hvp`` splits a wider V): a many-column
    #: HVP vectorises over the columns and holds one copy of the batch's activations per
    #: column (100 columns through the Fig 2 CNN exhausted 24 GB). None: 1024 for models
    #: whose outputs are linear in theta (no activations to copy), else 8.
    hvp_max_columns: int | None = None

    def _hvp_columns_per_pass(self) -> int:
        if self.hvp_max_columns is not None:
            if int(self.hvp_max_columns) < 1:
                raise ValueError(f"hvp_max_columns must be >= 1, got {self.hvp_max_columns}")
            return int(self.hvp_max_columns)
        return 1024 if self.linear_outputs else 8

    def hvp(self, v: np.ndarray, indices=None) -> np.ndarray:
        """``H v`` (or ``H V`` for a (p, k) matrix), H = Hessian of the objective.

        With ``curvature="gauss-newton"``: ``G v`` (module docstring). With ``indices``, the
        loss part is averaged over those training points only (a sub-sampled Hessian, as
        LiSSA uses); the regulariser is always included. A V wider than
        ``hvp_max_columns`` is done a block of columns at a time.
        """
        self._require_fit()
        v = np.asarray(v, dtype=self.dtype)
        if v.shape[0] != self.n_params or v.ndim not in (1, 2):
            raise ValueError(f"v must have shape ({self.n_params},) or ({self.n_params}, k), got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("v contains NaN or infinite values")
        step = self._hvp_columns_per_pass()
        if v.ndim == 2 and v.shape[1] > step:  # bounded memory: a few columns per pass over the data
            return np.concatenate([self.hvp(v[:, j:j + step], indices) for j in range(0, v.shape[1], step)], axis=1)
        th = self._theta_tf()
        vt = tf.constant(v)
        if check_curvature(self.curvature) == "gauss-newton":
            kernel = self._tf_gnvp_sum if v.ndim == 1 else self._tf_gnvp_sum_many
        else:
            kernel = self._tf_hvp_sum if v.ndim == 1 else self._tf_hvp_sum_many
        idx = None if indices is None else self._check_indices(indices)
        n = self.n_train_ if idx is None else len(idx)
        out = self._map_train(kernel, th, vt, indices=idx)
        mask = self.decay_mask_ if v.ndim == 1 else self.decay_mask_[:, None]
        return out / n + self.weight_decay * mask * v

    def hessian(self) -> np.ndarray:
        """Explicit (p, p) Hessian of the objective, built from batched HVPs (cached per theta).

        With ``curvature="gauss-newton"``: the Gauss-Newton matrix ``G`` instead.
        """
        self._check_hessian_size()
        key = hash_arrays(self.theta_, self.curvature)
        if self._hessian_cache is not None and self._hessian_cache[0] == key:
            return self._hessian_cache[1]
        p = self.n_params
        chunk = min(p, 128)  # columns per batched HVP
        H = np.empty((p, p))
        for j in progress(range(0, p, chunk), total=-(-p // chunk), desc="Hessian", enabled=self.progress):
            E = np.zeros((p, min(chunk, p - j)))
            E[np.arange(j, j + E.shape[1]), np.arange(E.shape[1])] = 1.0
            H[:, j:j + E.shape[1]] = self.hvp(E)
        H = 0.5 * (H + H.T)
        self._hessian_cache = (key, H)
        return H

    def _check_hessian_size(self):
        self._require_fit()
        if self.n_params > self.max_hessian_params:
            raise ValueError(f"explicit Hessian refused for p = {self.n_params} > max_hessian_params = "
                             f"{self.max_hessian_params}; use the 'cg' or 'lissa' solver")

    def hessian_eigenvalue_bounds(self, tol: float = 1e-4, maxiter: int | None = None) -> tuple[float, float]:
        """(smallest, largest) eigenvalue of H (or G, see ``curvature``) by Lanczos (ARPACK) on HVPs.

        A negative smallest eigenvalue means H is not positive definite at theta
        (non-convex model or not at a minimum): use damping at least its magnitude. Both
        come from ``eigsh`` at tolerance ``tol``, so the smallest is good only to about
        ``tol * largest`` in absolute terms: a small positive value does not prove H
        positive definite (``damping="auto"`` allows for this).
        """
        import scipy.sparse.linalg as spla

        self._require_fit()
        p = self.n_params
        if p <= 2:
            w = np.linalg.eigvalsh(self.hessian())
            return float(w[0]), float(w[-1])
        op = spla.LinearOperator((p, p), matvec=lambda v: self.hvp(np.ravel(v)), dtype=np.float64)
        v0 = np.random.default_rng(self.seed).standard_normal(p)
        maxiter = maxiter or max(100, 10 * p)
        lmax = spla.eigsh(op, k=1, which="LA", tol=tol, v0=v0, maxiter=maxiter, return_eigenvectors=False)[0]
        # smallest via the largest of (lmax I - H), which converges faster than which="SA"
        shifted = spla.LinearOperator((p, p), matvec=lambda v: lmax * np.ravel(v) - self.hvp(np.ravel(v)),
                                      dtype=np.float64)
        top = spla.eigsh(shifted, k=1, which="LA", tol=tol, v0=v0, maxiter=maxiter, return_eigenvectors=False)[0]
        lmin = float(lmax - top)
        if lmin < 0 and self.curvature == "hessian":
            logger.warning("Hessian has a negative eigenvalue (%.3g): the objective is not convex at theta; "
                           "use damping of at least %.3g for CG or LiSSA, or curvature='gauss-newton'", lmin, -lmin)
        elif lmin < 0:
            logger.warning("Gauss-Newton matrix has a negative eigenvalue (%.3g), which only round-off can give "
                           "(or a loss that is not convex in the outputs)", lmin)
        return lmin, float(lmax)

    def per_example_curvature(self, refine: int = 8) -> np.ndarray:
        """Largest eigenvalue of each training point's loss Hessian ``nabla^2 L(z_i)`` (no regulariser), (n,).

        One vectorised pass: for each point, the largest eigenvalue of ``J_i^T S_i J_i``
        (``J_i``: Jacobian of the outputs, ``S_i = d^2 L / d f^2``) from a (k, k)
        eigenproblem. That is the point's exact curvature when the outputs are linear in
        theta (``linear_outputs``) or the model's ``curvature`` is "gauss-newton". Otherwise
        it is only the Gauss-Newton part: the ``refine`` points with the largest values get
        30 power iterations on their own Hessian, and every value is scaled by the largest
        ratio found (at least 1). Cached for the current theta, data and curvature.
        """
        self._require_fit()
        key = (*self.state_key_, int(refine))
        cached = getattr(self, "_example_curvature_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        k = int(np.prod(self.outputs(self.X_train_np_[:1]).shape[1:]))
        bs = max(1, min(self.batch_size, self._rows_per_chunk() // max(k, 1)))
        lam = self._map_train(self._tf_per_example_gn_eigmax, self._theta_tf(), reduce="concat", batch_size=bs,
                              desc="per-example curvature")
        lam = np.maximum(lam, 0.0)
        if not (self.linear_outputs or self.curvature == "gauss-newton") and refine > 0:
            ratio = 1.0
            rng = np.random.default_rng(self.seed)
            for i in np.argsort(-lam)[:int(refine)]:
                u = rng.standard_normal(self.n_params)
                u /= np.linalg.norm(u)
                for _ in range(30):
                    w = self.hvp(u, indices=[i])
                    est = float(np.linalg.norm(w))
                    u = w / max(est, 1e-300)
                if lam[i] > 0:
                    ratio = max(ratio, est / lam[i])
            logger.info("per-example curvature: Gauss-Newton part scaled by %.3g from power iterations on the %d "
                        "largest", ratio, refine)
            lam = lam * ratio
        self._example_curvature_cache = (key, lam)
        return lam

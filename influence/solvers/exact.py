"""Exact inverse-HVPs: a Cholesky factorisation of the explicit Hessian (p up to ~10k).

``x = (H + damping I)^-1 v`` by two triangular solves with the cached factor of ``H + damping I``.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from .base import InverseHVPSolver, NotPositiveDefiniteError, SolveResult, relative_residual


class ExactSolver(InverseHVPSolver):
    """Cholesky factorisation of the explicit Hessian (models with up to ~10k parameters).

    The factorisation is cached on the model for the current theta and damping, so later
    solves cost only two triangular solves.
    """

    name = "exact"

    def eigenvalue_bounds(self, model) -> tuple[float, float, float]:
        w = np.linalg.eigvalsh(model.hessian())
        return float(w[0]), float(w[-1]), 1e-12 * abs(float(w[-1]))

    def _solve(self, model, v):
        key = (*model.state_key_, self.damping)
        cached = getattr(model, "_cholesky_cache", None)
        if cached is None or cached[0] != key:
            H = model.hessian() + self.damping * np.eye(model.n_params)
            try:
                factor = scipy.linalg.cho_factor(H, lower=True)
            except np.linalg.LinAlgError as exc:
                lmin = float(np.linalg.eigvalsh(H)[0])
                raise NotPositiveDefiniteError(
                    f"H + {self.damping} I is not positive definite (smallest eigenvalue {lmin:.3g}); "
                    f"add damping > {-lmin:.3g}") from exc
            model._cholesky_cache = (key, factor)
        x = scipy.linalg.cho_solve(model._cholesky_cache[1], v)
        return SolveResult(x=x, solver=self.name, iterations=1, converged=True, damping=self.damping,
                           residual=relative_residual(model, x, v, self.damping))

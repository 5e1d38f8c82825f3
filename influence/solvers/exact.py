"""Exact inverse-HVPs: a Cholesky factorisation of the explicit matrix (p up to ~10k).

``x = (C + damping I)^-1 v`` by two triangular solves with the factor of ``C + damping I``,
computed once per operator state and damping and held by the solver.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from .base import InverseHVPSolver, NotPositiveDefiniteError, SolveResult, relative_residual


class ExactSolver(InverseHVPSolver):
    """Cholesky factorisation of the explicit matrix (models with up to ~10k parameters).

    Parameters
    ----------
    damping : float >= 0, "auto" or AutoDamping
        Added to the diagonal ("auto": from the explicit matrix's smallest eigenvalue).
    """

    name = "exact"

    def _auto_eigenvalues(self, auto):
        return auto.eigenvalues(self.operator_, dense=True)

    def factor(self):
        """The Cholesky factor of ``C + damping I`` (cached per operator state and damping)."""
        op = self.operator_

        def compute():
            H = op.dense() + self.damping * np.eye(op.n_params)
            try:
                return scipy.linalg.cho_factor(H, lower=True)
            except np.linalg.LinAlgError as exc:
                lmin = float(np.linalg.eigvalsh(H)[0])
                raise NotPositiveDefiniteError(
                    f"H + {self.damping} I is not positive definite (smallest eigenvalue {lmin:.3g}); "
                    f"add damping > {-lmin:.3g}") from exc

        return self._memo(f"cholesky-{self.damping!r}", op.state_key(), compute)

    def _solve(self, v):
        x = scipy.linalg.cho_solve(self.factor(), v)
        return SolveResult(x=x, solver=self.name, iterations=1, converged=True, damping=self.damping,
                           residual=relative_residual(self.operator_, x, v, self.damping))

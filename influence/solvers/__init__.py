"""Inverse Hessian-vector product solvers: one module per method, one interface (:mod:`.base`).

``get_solver("exact" | "cg" | "lissa" | "arnoldi", **options)`` builds one by name.

Each solves ``(H + damping I) x = v`` for one or many right-hand sides and returns a
:class:`SolveResult` with its diagnostics::

    get_solver("exact")                       # Cholesky of the explicit Hessian
    get_solver("cg", tol=1e-10)               # conjugate gradients on HVPs (block CG for many columns)
    get_solver("lissa", scale=25, depth=5000) # stochastic Neumann series (Agarwal et al. 2017)
    get_solver("arnoldi", rank=50)            # top eigenpairs by Lanczos (Schioppa et al. 2022)
    get_solver("ekfac", damping=1e-3)         # Kronecker-factored curvature (K-FAC, EK-FAC)
"""
from __future__ import annotations

from .arnoldi import ArnoldiSolver
from .base import (AUTO_DAMPING_FACTOR, AUTO_DAMPING_LANCZOS_TOL, AUTO_DAMPING_RETRIES, InverseHVPSolver,
                   LissaDivergenceError, NotPositiveDefiniteError, SolveResult, column_residuals,
                   relative_residual)
from .block_cg import block_conjugate_gradient
from .cg import CGSolver, conjugate_gradient
from .exact import ExactSolver
from .kfac import EKFACSolver, KFACSolver
from .lissa import LissaSolver

__all__ = ["ArnoldiSolver", "CGSolver", "EKFACSolver", "ExactSolver", "KFACSolver", "InverseHVPSolver", "LissaDivergenceError", "LissaSolver",
           "NotPositiveDefiniteError", "SOLVERS", "SolveResult", "block_conjugate_gradient", "column_residuals",
           "conjugate_gradient", "get_solver", "relative_residual", "AUTO_DAMPING_FACTOR", "AUTO_DAMPING_LANCZOS_TOL", "AUTO_DAMPING_RETRIES"]

SOLVERS = {cls.name: cls for cls in (ExactSolver, CGSolver, LissaSolver, ArnoldiSolver, KFACSolver, EKFACSolver)}


def get_solver(solver: str | InverseHVPSolver = "cg", **options) -> InverseHVPSolver:
    """A solver instance from a name (``exact``, ``cg``, ``lissa``, ``arnoldi``, ``kfac``, ``ekfac``) and its options."""
    if isinstance(solver, InverseHVPSolver):
        if options:
            raise ValueError("pass options either to the solver instance or here, not both")
        return solver
    try:
        cls = SOLVERS[solver]
    except KeyError:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}") from None
    return cls(**options)

"""Inverse Hessian-vector product solvers: one module per method, one interface (:mod:`.base`).

Each is fitted on a curvature operator and solves ``(C + damping I) x = v`` for one or
many right-hand sides, returning a :class:`SolveResult` with its diagnostics::

    ExactSolver()                              # Cholesky of the explicit matrix
    CGSolver(tol=1e-10)                        # conjugate gradients on HVPs (block CG for many columns)
    CGSolver(preconditioner="nystrom")         # ... preconditioned by the top eigenpairs (Frangella et al. 2023)
    CGSolver(preconditioner="gauss-newton")    # ... by the explicit Gauss-Newton matrix (p up to ~10k)
    CGSolver(preconditioner="gauss-newton-float32")  # ... formed in float32: cheaper, one more iteration
    LissaSolver(scale=25, depth=5000)          # stochastic Neumann series (Agarwal et al. 2017)
    ArnoldiSolver(rank=50)                     # top eigenpairs by Lanczos (Schioppa et al. 2022)
    EKFACSolver(damping=1e-3)                  # Kronecker-factored curvature (K-FAC, EK-FAC)

``get_solver("cg", tol=1e-10)`` builds one by name (the command line's way; :data:`SOLVERS`).
"""
from __future__ import annotations

from ..registry import Registry
from .arnoldi import ArnoldiSolver
from .base import (AUTO_DAMPING_FACTOR, AUTO_DAMPING_LANCZOS_TOL, AUTO_DAMPING_RETRIES, InverseHVPSolver,
                   LissaDivergenceError, NotPositiveDefiniteError, SolveFailedError, SolveResult, column_residuals,
                   relative_residual)
from .block_cg import block_conjugate_gradient
from .cg import CGSolver, conjugate_gradient
from .damping import AutoDamping
from .exact import ExactSolver
from .kfac import EKFACSolver, KFACSolver
from .lissa import LissaSolver
from .preconditioners import (CallablePreconditioner, GaussNewtonPreconditioner, KroneckerPreconditioner, NystromPreconditioner,
                              Preconditioner, make_preconditioner, nystrom_inverse)

__all__ = ["ArnoldiSolver", "CallablePreconditioner", "GaussNewtonPreconditioner", "KroneckerPreconditioner", "NystromPreconditioner",
           "Preconditioner", "make_preconditioner", "nystrom_inverse", "AutoDamping", "CGSolver", "EKFACSolver", "ExactSolver", "KFACSolver",
           "InverseHVPSolver", "LissaDivergenceError", "LissaSolver", "NotPositiveDefiniteError", "SOLVERS", "SolveFailedError",
           "SolveResult", "block_conjugate_gradient", "column_residuals", "conjugate_gradient", "get_solver",
           "relative_residual", "AUTO_DAMPING_FACTOR", "AUTO_DAMPING_LANCZOS_TOL", "AUTO_DAMPING_RETRIES"]

SOLVERS = Registry("solver", InverseHVPSolver)
for _cls in (ExactSolver, CGSolver, LissaSolver, ArnoldiSolver, KFACSolver, EKFACSolver):
    SOLVERS.register(_cls)


def get_solver(solver: str | InverseHVPSolver = "cg", **options) -> InverseHVPSolver:
    """A solver instance from a name (``exact``, ``cg``, ``lissa``, ``arnoldi``, ``kfac``, ``ekfac``) and its options."""
    return SOLVERS.create(solver, **options)

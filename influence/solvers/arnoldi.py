"""Low-rank inverse-HVPs from the top eigenpairs of ``H`` by Lanczos (Schioppa et al. 2022).

``H^-1 v ~= V diag(1/(lambda + damping)) V^T v`` with ``V`` the ``rank`` leading eigenvectors,
found once per fitted model; each later solve costs two (p, rank) products.
"""
from __future__ import annotations

import logging

import numpy as np

from ..validation import check_number
from .base import AutoDamping, InverseHVPSolver, NotPositiveDefiniteError, SolveResult, relative_residual

logger = logging.getLogger(__name__)


class ArnoldiSolver(InverseHVPSolver):
    """Low-rank inverse from the top eigenpairs of ``H`` (Schioppa et al. 2022).

    Lanczos iteration (the symmetric case of Arnoldi's; ARPACK's ``eigsh`` driven by HVPs)
    finds the ``rank`` largest eigenvalues ``lambda`` of ``H`` (or ``G``) and their
    orthonormal eigenvectors ``V`` (p, rank); then::

        x = V diag(1 / (lambda + damping)) V^T v  +  (I - V V^T) v / (fill + damping)

    ``fill`` says what the remaining eigenvalues are taken to be. ``"auto"`` (the default): 0
    where ``damping > 0`` -- the exact inverse of the rank-``rank`` approximation plus
    ``damping I``, which keeps the part of ``v`` outside the top eigenspace (scaled by
    ``1/damping``) -- and, at ``damping = 0``, None. None drops the second term (Schioppa et
    al.: ``v`` projected onto the top eigenspace); that discards most of a gradient whose mass
    lies outside a few eigenvectors, and ranks far worse (dattri's MNIST LR: LDS 0.31 dropped
    vs 0.68 with fill 0, docs/leaderboard.md). A number assumes every remaining eigenvalue
    equals ``fill``, e.g. the weight decay, the floor of an L2-regularised convex model's
    spectrum. The decomposition is held by the solver, keyed by the
    operator's theta, training data and curvature, so every later solve, for any number of
    right-hand sides, costs two (p, rank) products and one HVP for the residual.
    Exact (up to ``tol``) when ``rank = p``; otherwise an approximation whose error the
    returned residual shows. For ``rank >= p - 1`` (ARPACK needs rank < p) the explicit
    Hessian's eigendecomposition is used.
    """

    name = "arnoldi"
    approximate = True

    def __init__(self, damping: float = 0.0, rank: int = 50, fill: float | str | None = "auto", tol: float = 1e-6,
                 maxiter: int | None = None, seed: int = 0):
        super().__init__(damping)
        self.rank = check_number("rank", rank, low=1, integer=True)
        if isinstance(fill, str):
            if fill != "auto":
                raise ValueError(f"fill must be 'auto', None or a number >= 0, got {fill!r}")
            self.fill = fill
        else:
            self.fill = check_number("fill", fill, low=0.0, allow_none=True)
        if self.fill not in (None, "auto") and not isinstance(self.damping, AutoDamping) and self.fill + self.damping <= 0:
            raise ValueError("fill + damping must be > 0 (the complement would be divided by zero)")
        self.tol = check_number("tol", tol, low=0.0)
        self.maxiter = check_number("maxiter", maxiter, low=1, integer=True, allow_none=True)
        self.seed = check_number("seed", seed, low=0, integer=True)

    def fill_value(self) -> float | None:
        """The fill used: ``fill``, or for ``"auto"`` 0 where ``damping > 0``, else None (dropped)."""
        if self.fill == "auto":
            return 0.0 if float(self.damping) > 0 else None
        return self.fill

    def eigenpairs(self, operator=None) -> tuple[np.ndarray, np.ndarray]:
        """``(lambda, V)``: the ``rank`` largest eigenvalues (descending) and eigenvectors of the
        operator (cached by the operator: :meth:`~influence.curvature.CurvatureOperator.top_eigenpairs`,
        shared with the Nystrom preconditioner of CG)."""
        op = self.operator_ if operator is None else operator
        return op.top_eigenpairs(self.rank, tol=self.tol, seed=self.seed, maxiter=self.maxiter)

    def _solve(self, v):
        lam, V = self.eigenpairs()
        shifted = lam + self.damping
        if np.any(shifted <= 0):
            raise NotPositiveDefiniteError(
                f"eigenvalue {lam.min():.3g} of the kept {len(lam)}: H + {self.damping} I is not positive definite "
                f"there; lower the rank, add damping > {-lam.min():.3g}, or use curvature='gauss-newton'")
        coef = V.T @ v
        x = V @ (coef / (shifted if v.ndim == 1 else shifted[:, None]))
        fill = self.fill_value()
        if fill is not None:
            if fill + self.damping <= 0:
                raise ValueError("fill + damping must be > 0 (the complement would be divided by zero)")
            x = x + (v - V @ coef) / (fill + self.damping)
        res = relative_residual(self.operator_, x, v, self.damping)
        return SolveResult(x=x, solver=self.name, iterations=len(lam), residual=res, converged=res <= 1e-6,
                           damping=self.damping, info={"rank": len(lam), "fill": fill, "eigenvalue_min": float(lam[-1]),
                                                       "eigenvalue_max": float(lam[0])})

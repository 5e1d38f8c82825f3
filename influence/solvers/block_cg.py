"""Block conjugate gradients: many right-hand sides that share one matrix (O'Leary 1980).

For ``A X = B`` with ``B`` of shape (p, k), every iteration searches a block of up to
``k`` directions ``P`` at once, so each column's Krylov space holds every other column's
residuals too and far fewer iterations are needed than ``k`` independent CG runs::

    alpha = (P^T A P)^-1 P^T R          X += P alpha,   R -= A P alpha
    Z = M^-1 R,  beta = -(P^T A P)^-1 (A P)^T Z,   P <- orth(Z + P beta)

This is the breakdown-free variant (Ji & Li 2017): ``orth`` keeps an orthonormal basis of
the new directions and drops those that are (numerically) linearly dependent, so
duplicated, zero or early-converged columns shrink the block instead of making
``P^T A P`` singular. Converged columns leave the block (deflation) and keep their
solution. ``P^T A P`` that is not positive definite means ``A`` is not, on that block:
the iteration stops there and reports negative curvature, as single-vector CG does.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.linalg


def orthonormal_basis(W: np.ndarray, rank_tol: float = 1e-10) -> np.ndarray:
    """An orthonormal basis (p, r) of the span of ``W``'s columns, ``r <= k``.

    Columns are scaled to unit length first (so a small residual counts as much as a large
    one), then QR with column pivoting drops directions whose pivot falls below
    ``rank_tol`` times the largest: duplicated, zero or numerically dependent columns.
    """
    norms = np.linalg.norm(W, axis=0)
    W = W[:, norms > 0] / norms[norms > 0]
    if W.shape[1] == 0:
        return W
    Q, R, _ = scipy.linalg.qr(W, mode="economic", pivoting=True)
    d = np.abs(np.diag(R))
    return Q[:, :int(np.sum(d > rank_tol * d[0]))]


def block_conjugate_gradient(matvec: Callable[[np.ndarray], np.ndarray], B: np.ndarray, tol: float | np.ndarray = 1e-10,
                             maxiter: int = 1000,
                             preconditioner: Callable[[np.ndarray], np.ndarray] | None = None,
                             rank_tol: float = 1e-10, callback: Callable[[int, float], None] | None = None,
                             state: dict | None = None):
    """Breakdown-free block CG for ``A X = B`` (``A`` symmetric positive definite, ``B`` (p, k)).

    ``matvec(P)`` returns ``A P`` for a (p, r) block; ``preconditioner(R)`` returns
    ``M^-1 R`` for a symmetric positive definite ``M``. Stops when every column has
    ``||r_k|| <= tol * ||b_k||`` (``tol`` a number or one per column; zero columns: at once,
    solution 0), after ``maxiter`` (``callback(iterations, largest relative residual)`` after each)
    block iterations, or on negative curvature.
    Returns ``(X, iterations, negative_curvature_seen, block_sizes)`` with the number of
    directions searched at each iteration; ``state`` (a dict), if given, receives the final
    recursive residual ``R`` (after one iteration it is the true one: ``X = P alpha`` and
    ``R = B - (A P) alpha``).
    """
    B = np.asarray(B, dtype=np.float64)
    if B.ndim != 2:
        raise ValueError(f"B must have shape (p, k), got {B.shape}")
    X = np.zeros_like(B)
    R = B.copy()
    target = np.asarray(tol, dtype=np.float64) * np.linalg.norm(B, axis=0)
    active = np.linalg.norm(R, axis=0) > target
    pc = preconditioner if preconditioner is not None else (lambda M: M)
    negative, it, sizes = False, 0, []
    P = orthonormal_basis(pc(R[:, active]), rank_tol) if active.any() else B[:, :0]
    while it < maxiter and active.any() and P.shape[1] > 0:
        Q = matvec(P)
        PQ = P.T @ Q
        PQ = 0.5 * (PQ + PQ.T)
        try:
            factor = scipy.linalg.cho_factor(PQ, lower=True)
        except np.linalg.LinAlgError:
            negative = True  # A is not positive definite on span(P): stop where we are
            break
        cols = np.flatnonzero(active)
        alpha = scipy.linalg.cho_solve(factor, P.T @ R[:, cols])
        X[:, cols] += P @ alpha
        R[:, cols] -= Q @ alpha
        sizes.append(P.shape[1])
        it += 1
        if callback is not None:  # iterations so far, largest relative residual of the active columns
            callback(it, float(np.max(np.linalg.norm(R, axis=0) / np.where(target > 0, target, 1.0) * np.asarray(tol))))
        active &= np.linalg.norm(R, axis=0) > target
        if not active.any():
            break
        Z = pc(R[:, active])
        beta = -scipy.linalg.cho_solve(factor, Q.T @ Z)
        P = orthonormal_basis(Z + P @ beta, rank_tol)
    if state is not None:
        state["residual"] = R
    return X, it, negative, sizes

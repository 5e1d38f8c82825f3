"""Conjugate gradients on ``H + damping I`` with full-data HVPs (Koh & Liang's main solver).

Krylov iterations ``x_{k+1} = x_k + alpha_k p_k`` that minimise ``x^T (H + damping I) x / 2 - v^T x``;
each iteration costs one HVP over the training set. Several right-hand sides are solved
by block CG (:mod:`.block_cg`), which shares one Krylov space among them.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from .base import InverseHVPSolver, SolveResult, column_residuals
from ..utils import bar, progress_on
from ..validation import check_choice, check_number
from .base import SolveFailedError
from .block_cg import block_conjugate_gradient
from .preconditioners import make_preconditioner

logger = logging.getLogger(__name__)

DEFAULT_TOL = {"float64": 1e-10, "float32": 1e-5}  # tol=None: what each dtype's HVPs let CG reach


def conjugate_gradient(matvec: Callable[[np.ndarray], np.ndarray], b: np.ndarray, tol: float = 1e-10,
                       maxiter: int = 1000, x0: np.ndarray | None = None,
                       preconditioner: Callable[[np.ndarray], np.ndarray] | None = None,
                       callback: Callable[[int, float], None] | None = None):
    """Conjugate gradients for a symmetric positive definite operator, one or many columns.

    Columns of ``b`` are solved independently but share every ``matvec`` call (one
    batched HVP per iteration). Stops when each ``||r_k|| <= tol * ||b_k||``.
    ``preconditioner``: an optional symmetric positive definite ``M^-1`` (applied to the
    residual columns, shape like ``b``); with ``M`` close to the operator, e.g. the
    Cholesky factor of a nearby Hessian, a few iterations suffice.
    Returns ``(x, iterations, negative_curvature_seen)``.
    """
    B = b if b.ndim == 2 else b[:, None]
    X = np.zeros_like(B) if x0 is None else (x0 if x0.ndim == 2 else x0[:, None]).copy()
    mv = (lambda M: matvec(M)) if b.ndim == 2 else (lambda M: matvec(M[:, 0])[:, None])
    if preconditioner is None:
        pc = None
    else:
        pc = (lambda M: preconditioner(M)) if b.ndim == 2 else (lambda M: preconditioner(M[:, 0])[:, None])
    R = B - mv(X) if x0 is not None else B.copy()
    Z = R if pc is None else pc(R)
    P = Z.copy()
    rz = np.sum(R * Z, axis=0)
    rr = np.sum(R * R, axis=0)
    target = (tol * np.linalg.norm(B, axis=0)) ** 2
    active = rr > target
    negative = False
    it = 0
    while it < maxiter and np.any(active):
        AP = mv(P)
        pAp = np.sum(P * AP, axis=0)
        bad = active & (pAp <= 0)
        if np.any(bad):
            negative = True
            active &= ~bad  # negative curvature: stop those columns where they are
        alpha = np.where(active, rz / np.where(pAp > 0, pAp, 1.0), 0.0)
        X += alpha * P
        R -= alpha * AP
        Z = R if pc is None else pc(R)
        rz_new = np.sum(R * Z, axis=0)
        beta = np.where(active, rz_new / np.where(rz > 0, rz, 1.0), 0.0)
        P = Z + beta * P
        rz = rz_new
        rr = np.sum(R * R, axis=0)
        active &= rr > target
        it += 1
        if callback is not None:  # iterations so far, largest relative residual
            callback(it, float(np.sqrt(np.max(rr / np.where(target > 0, target, 1.0))) * tol))
    return (X if b.ndim == 2 else X[:, 0]), it, negative


class CGSolver(InverseHVPSolver):
    """Conjugate gradients on ``H + damping I`` with full-data HVPs.

    Parameters: ``tol`` (relative residual target per column; None: what the model's dtype
    can reach, 1e-10 in float64, 1e-5 in float32), ``maxiter`` (iterations;
    default ``min(p, 1000)``), ``preconditioner`` (an SPD ``M^-1 ~ (C + damping I)^-1`` applied
    to the residuals, :mod:`.preconditioners`: ``"nystrom"`` from the operator's top
    ``preconditioner_rank`` eigenpairs (default 30; computed once per model state and
    curvature, shared with ``solver="arnoldi"``), ``"gauss-newton"`` (the explicit Gauss-Newton
    matrix's Cholesky factor: one iteration on G) or ``"gauss-newton-float32"`` (the same in
    single precision: two iterations, less set-up), ``"kfac"`` / ``"ekfac"`` (damping > 0), a
    :class:`~.preconditioners.Preconditioner`, or a callable ``R -> M^-1 R`` on (p,) or (p, k)
    arrays; it changes the iteration count, not the answer, so it is not part of the cache
    key; ``info`` records ``preconditioner``, ``rank``, ``setup_hvps``, ``setup_s``), ``block``
    (several right-hand sides: True, the default, solves them by block CG in one shared
    Krylov space; False iterates each column on its own, sharing only the batched HVPs).
    ``info`` holds ``negative_curvature``, and for several columns ``residuals`` (each
    column's relative residual) and, for block CG, ``block_sizes`` (directions searched
    per iteration), ``hvp_columns`` (their sum: the iterations' HVP work) and
    ``check_columns`` (the columns of the true-residual products on top). ``on_failure``: a solve that
    met negative curvature or ended above its residual threshold (``max(10 tol, 1e-6)``)
    raises :class:`SolveFailedError` ("raise", the default: its ``result`` holds the failed
    solve) or only warns ("warn"). ``precision="mixed"`` (opt-in, float64 models that can be
    rebuilt in float32): iterative refinement, each correction solved by CG on a float32 twin
    of the operator to ``inner_tol`` (default 1e-4), each residual in float64, to the same
    ``tol``; ``info`` records ``refinements`` and ``inner_iterations``.
    """

    name = "cg"
    REFINEMENTS = 3  # block CG: restarts on the true residual when the recursive one drifted
    TRUSTED_ITERATIONS = 2  # block CG: up to this many iterations the recursive residual is the true one

    def __init__(self, damping: float | str = 0.0, tol: float | None = None, maxiter: int | None = None,
                 preconditioner=None, preconditioner_rank: int | None = None, block: bool = True,
                 on_failure: str = "raise", precision: str = "full", inner_tol: float = 1e-4):
        super().__init__(damping)
        self._precision = check_choice("precision", precision, ("full", "mixed"))  # same answer: not in the key
        self._inner_tol = check_number("inner_tol", inner_tol, low=0.0, low_open=True, high=1.0, high_open=True)
        self.tol = check_number("tol", tol, low=0.0, low_open=True, high=1.0, high_open=True, allow_none=True)
        self.on_failure = check_choice("on_failure", on_failure, ("raise", "warn"))
        self.maxiter = check_number("maxiter", maxiter, low=1, integer=True, allow_none=True)
        self._preconditioner = make_preconditioner(preconditioner, preconditioner_rank)
        self._block = bool(block)  # the same answer either way: not part of the cache key

    def target_tol(self, operator=None) -> float:
        """The relative residual target: ``tol``, or the model's dtype's (1e-10 float64, 1e-5 float32)."""
        op = self.operator_ if operator is None else operator
        return self.tol if self.tol is not None else DEFAULT_TOL.get(op.model.dtype, 1e-10)

    def check_result(self, res) -> None:
        if res.converged and not res.info.get("negative_curvature"):
            return
        why = ("met negative curvature (H + damping I is not positive definite there)"
               if res.info.get("negative_curvature") else
               f"stopped after {res.iterations} iterations above its residual threshold")
        msg = (f"CG {why}: relative residual {res.residual:.3g} at damping {res.damping:.3g}; its answer is not "
               f"s_test. Add damping (damping='auto'), use curvature='gauss-newton' or raise maxiter")
        if self.on_failure == "raise":
            raise SolveFailedError(msg + ", or pass on_failure='warn' to keep the failed solve", res)
        logger.warning(msg + " (on_failure='warn': the failed solve is kept and used; InfluenceFunction's "
                             "solve_results_ / converged_ record it)")

    def _solve(self, v):
        op = self.operator_
        tol = self.target_tol()
        maxiter = self.maxiter or min(op.n_params, 1000)
        matvec = lambda u: op.hvp(u) + self.damping * u  # noqa: E731
        block = v.ndim == 2 and v.shape[1] > 1 and self._block
        if self._precision == "mixed" and op.model.dtype == "float64":
            return self._mixed_solve(op, v, tol, maxiter, block, matvec)
        pc, pc_info = None, {}
        if self._preconditioner is not None:
            pc = self._preconditioner.fit(op, self.damping).apply
            pc_info = dict(self._preconditioner.setup)
        shown = bar(total=maxiter, desc=("block CG" if block else "CG") + (f" ({pc_info['preconditioner']})"
                                                                           if pc_info else ""),
                    enabled=progress_on(op.model.progress))

        def tick(_it, residual):
            shown.set_postfix_str(f"residual {residual:.1e}", refresh=False)
            shown.update(1)

        try:
            x, it, negative, info = self._iterate(matvec, v, tol, maxiter, block, tick, pc)
        finally:
            shown.close()
        info.update(pc_info)
        return self._result(op, x, it, negative, info, v, tol)

    def _mixed_solve(self, op, v, tol, maxiter, block, matvec):
        """Iterative refinement: the correction ``(C32 + d I) e = r`` by (block) CG on the float32
        twin to ``inner_tol`` (its products cheaper: docs/solvers.md), the residual ``r = v - (C + d I) x`` in
        float64, until ``||r|| <= tol ||v||``; the preconditioner is built on the twin."""
        low = op.low_precision()
        low_mv = lambda u: low.hvp(u).astype(np.float64) + self.damping * u  # noqa: E731
        pc, pc_info = None, {}
        if self._preconditioner is not None:
            pc = self._preconditioner.fit(low, self.damping).apply
            pc_info = dict(self._preconditioner.setup)
        shown = bar(total=None, desc=("block CG" if block else "CG") + " (mixed precision)",
                    enabled=progress_on(op.model.progress))

        def tick(_it, residual):
            shown.set_postfix_str(f"inner residual {residual:.1e}", refresh=False)
            shown.update(1)

        x = np.zeros_like(v)
        r = v.copy()
        vnorm = np.linalg.norm(v, axis=0)
        it, negative, outer, inner_iterations, hvp_columns = 0, False, 0, [], 0
        try:
            while outer < 12:  # each correction may take up to maxiter iterations
                rnorm = np.linalg.norm(r, axis=0)
                if np.all(rnorm <= tol * vnorm):
                    break
                if block:
                    d, k, negative, sizes = block_conjugate_gradient(low_mv, r, self._inner_tol, maxiter,
                                                                     preconditioner=pc, callback=tick)
                    hvp_columns += int(sum(sizes))
                else:
                    d, k, negative = conjugate_gradient(low_mv, r, self._inner_tol, maxiter, preconditioner=pc,
                                                        callback=tick)
                x, it, outer = x + d, it + k, outer + 1
                inner_iterations.append(int(k))
                if negative:
                    break
                r = v - matvec(x)
        finally:
            shown.close()
        info = {"precision": "mixed", "refinements": outer, "inner_iterations": inner_iterations,
                "inner_tol": self._inner_tol, **pc_info}
        if block:
            info.update(block=True, hvp_columns=hvp_columns)
        return self._result(op, x, it, negative, info, v, tol)

    def _iterate(self, matvec, v, tol, maxiter, block, tick, pc=None):
        info, residuals = {}, None
        if block:
            state = {}
            x, it, negative, sizes = block_conjugate_gradient(matvec, v, tol, maxiter,
                                                              preconditioner=pc, callback=tick, state=state)
            # the recursive residual drifts from the true one over many block iterations:
            # refine on the true residual until every column meets tol (at most REFINEMENTS times).
            # After one or two iterations (a near-exact preconditioner) there is no drift to speak
            # of: the residual v - (A P1) a1 - (A P2) a2 came from the operator's own products and
            # differs from v - A x by the rounding of two updates (~1e-16 times A's condition number,
            # relative to ||v||: 1e-14 for the Fig 2 models), so it is kept and no product is spent
            # checking it (the tests recompute it).
            vnorm = np.linalg.norm(v, axis=0)
            refinements, checks = 0, 0
            if it <= self.TRUSTED_ITERATIONS and not negative and "residual" in state:
                rnorm = np.linalg.norm(state["residual"], axis=0)
                if np.all(rnorm <= tol * vnorm):
                    residuals = rnorm / np.where(vnorm > 0, vnorm, 1.0)
            while residuals is None and not negative and it < maxiter and refinements < self.REFINEMENTS:
                r = v - matvec(x)
                checks += x.shape[1]
                rnorm = np.linalg.norm(r, axis=0)
                if np.all(rnorm <= tol * vnorm):
                    residuals = rnorm / np.where(vnorm > 0, vnorm, 1.0)  # of this x: no second HVP
                    break
                dx, it2, negative, sizes2 = block_conjugate_gradient(
                    matvec, r, tol * vnorm / np.where(rnorm > 0, rnorm, 1.0), maxiter - it,
                    preconditioner=pc, callback=tick)
                x, it, sizes, refinements = x + dx, it + it2, sizes + sizes2, refinements + 1
            info.update(block=True, block_sizes=sizes, hvp_columns=int(sum(sizes)), refinements=refinements,
                        check_columns=checks)
        else:
            x, it, negative = conjugate_gradient(matvec, v, tol, maxiter, preconditioner=pc,
                                                 callback=tick)
        if residuals is not None:
            info["_residuals"] = residuals
        return x, it, negative, info

    def _result(self, op, x, it, negative, info, v, tol):
        residuals = info.pop("_residuals", None)
        dtype = op.model.dtype
        if negative:
            hint = (" (or round-off: this model computes in %s; float64 gives the tightest solves)" % dtype
                    if dtype != "float64" else "")
            logger.warning("CG met negative curvature: H + %g I is not positive definite; raise damping, or use "
                           "curvature='gauss-newton' (positive semi-definite)%s", self.damping, hint)
        if residuals is None:
            residuals = column_residuals(op, x, v, self.damping)
            if "check_columns" in info:
                info["check_columns"] += 1 if v.ndim == 1 else v.shape[1]
        res = float(np.max(residuals))
        if v.ndim == 2:
            info["residuals"] = residuals.tolist()
        converged = res <= max(10 * tol, 1e-6)
        if not converged:
            logger.warning("CG stopped after %d iterations at relative residual %.2e", it, res)
        return SolveResult(x=x, solver=self.name, iterations=it, residual=res, converged=converged,
                           damping=self.damping, info={"negative_curvature": negative, "tol": tol, **info})

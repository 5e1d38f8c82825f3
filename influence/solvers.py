"""Inverse Hessian-vector product solvers behind one interface.

Each solver solves ``(H + damping * I) x = v`` for one right-hand side ``v`` of shape
(p,) or several at once (shape (p, k)), where ``H`` is a model's Hessian (its
Gauss-Newton matrix when the model's ``curvature`` is "gauss-newton"), and returns a
:class:`SolveResult` with the solution and its diagnostics. Select one by name::

    get_solver("exact")                       # Cholesky of the explicit Hessian
    get_solver("cg", tol=1e-10)               # conjugate gradients on HVPs
    get_solver("lissa", scale=25, depth=5000) # stochastic Neumann series (Agarwal et al. 2017)
    get_solver("arnoldi", rank=50)            # top eigenpairs by Lanczos (Schioppa et al. 2022)

``damping`` means the same thing for every solver. (The original code's LiSSA
``damping`` d corresponds to ``damping = d * scale`` here.) ``damping="auto"`` follows
Koh's rule for non-convex models (influence-release #6): no damping where ``H`` is
positive definite, else 1.5 times the magnitude of its smallest eigenvalue (Lanczos on
HVPs, good to about 1e-4 of the largest eigenvalue, which is the least damping used
where the smallest is not clearly positive; the explicit Hessian's eigenvalues for the
exact solver), tripled up to ``AUTO_DAMPING_RETRIES`` times while CG still meets
negative curvature. The value used is ``SolveResult.damping``.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import scipy.linalg

logger = logging.getLogger(__name__)


class LissaDivergenceError(RuntimeError):
    """The LiSSA recursion blew up (NaN/inf or a growing norm)."""


class NotPositiveDefiniteError(np.linalg.LinAlgError):
    """H + damping I is not positive definite."""


@dataclass
class SolveResult:
    """Solution ``x`` of ``(H + damping I) x = v`` and how it was obtained.

    ``residual`` is the relative residual ``||(H + damping I) x - v|| / ||v||``, computed
    afresh with full HVPs (for several right-hand sides: the largest over columns).
    """

    x: np.ndarray
    solver: str
    iterations: int
    residual: float
    converged: bool
    damping: float = 0.0
    time_s: float = 0.0
    spread: float | None = None  # LiSSA: ||std over samples|| / ||mean||
    info: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def relative_residual(model, x: np.ndarray, v: np.ndarray, damping: float) -> float:
    """``max_k ||(H + damping I) x_k - v_k|| / ||v_k||``."""
    r = model.hvp(x) + damping * x - v
    num = np.linalg.norm(r, axis=0)
    den = np.linalg.norm(v, axis=0)
    return float(np.max(num / np.where(den > 0, den, 1.0)))


def conjugate_gradient(matvec: Callable[[np.ndarray], np.ndarray], b: np.ndarray, tol: float = 1e-10,
                       maxiter: int = 1000, x0: np.ndarray | None = None,
                       preconditioner: Callable[[np.ndarray], np.ndarray] | None = None):
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
    return (X if b.ndim == 2 else X[:, 0]), it, negative


AUTO_DAMPING_FACTOR = 1.5   # damping="auto": this times |smallest eigenvalue| where it is negative
AUTO_DAMPING_RETRIES = 4    # ... tripled at most this often while CG meets negative curvature
AUTO_DAMPING_LANCZOS_TOL = 1e-4  # Lanczos tolerance: eigenvalues good to about this times lambda_max


class InverseHVPSolver:
    """Interface: ``solve(model, v) -> SolveResult`` for ``(H + damping I) x = v``."""

    name = "base"

    def __init__(self, damping: float | str = 0.0):
        if isinstance(damping, str):
            if damping != "auto":
                raise ValueError(f"damping must be a number >= 0 or 'auto', got {damping!r}")
            self.damping = damping
        elif not float(damping) >= 0:
            raise ValueError("damping must be >= 0")
        else:
            self.damping = float(damping)

    def eigenvalue_bounds(self, model) -> tuple[float, float, float]:
        """(smallest, largest) eigenvalue of H and the absolute accuracy of the smallest,
        for ``damping="auto"``: Lanczos on HVPs, good to about ``tol * lambda_max``."""
        lmin, lmax = model.hessian_eigenvalue_bounds(tol=AUTO_DAMPING_LANCZOS_TOL)
        return lmin, lmax, AUTO_DAMPING_LANCZOS_TOL * abs(lmax)

    def _solve_auto_damping(self, model, v) -> SolveResult:
        """Koh's rule: damping 0 where H is surely positive definite (smallest eigenvalue
        above the estimate's accuracy), else 1.5 |smallest eigenvalue| but at least that
        accuracy; raised 3x while CG still meets negative curvature. The eigenvalues are
        cached on the model for the current theta, data and curvature."""
        key = (*model.state_key_, self.name == "exact")
        cached = getattr(model, "_eigenvalue_bounds_cache", None)
        if cached is None or cached[0] != key:
            model._eigenvalue_bounds_cache = (key, self.eigenvalue_bounds(model))
        lmin, lmax, accuracy = model._eigenvalue_bounds_cache[1]
        solver = copy.copy(self)
        solver.damping = 0.0 if lmin > accuracy else max(AUTO_DAMPING_FACTOR * -lmin, accuracy)
        logger.info("damping='auto': smallest eigenvalue %.3g (+- %.2g), damping %.3g", lmin, accuracy,
                    solver.damping)
        res = solver._solve(model, v)
        retries = 0
        while res.info.get("negative_curvature") and retries < AUTO_DAMPING_RETRIES:
            solver.damping = max(3 * solver.damping, accuracy)
            retries += 1
            logger.warning("damping='auto': CG met negative curvature, damping raised to %.3g", solver.damping)
            res = solver._solve(model, v)
        res.info.update(damping_auto=True, damping_retries=retries, smallest_eigenvalue=lmin,
                        largest_eigenvalue=lmax)
        return res

    def config(self) -> dict:
        """Settings that determine the result (used in cache keys)."""
        return {"solver": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def solve(self, model, v: np.ndarray) -> SolveResult:
        v = np.asarray(v, dtype=np.float64)
        if v.ndim not in (1, 2) or v.shape[0] != model.n_params:
            raise ValueError(f"v must have shape ({model.n_params},) or ({model.n_params}, k); got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("v contains NaN or infinite values")
        t0 = time.perf_counter()
        res = self._solve_auto_damping(model, v) if self.damping == "auto" else self._solve(model, v)
        res.time_s = time.perf_counter() - t0
        logger.info("%s solve: %d iterations, relative residual %.2e, %.2fs", self.name, res.iterations,
                    res.residual, res.time_s)
        return res

    def _solve(self, model, v):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items() if k != 'solver')})"


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


class CGSolver(InverseHVPSolver):
    """Conjugate gradients on ``H + damping I`` with full-data HVPs.

    Parameters: ``tol`` (relative residual target), ``maxiter`` (default ``min(p, 1000)``),
    ``preconditioner`` (optional callable ``r -> M^-1 r`` for a symmetric positive definite
    ``M`` close to ``H + damping I``, e.g. a Cholesky solve with the Hessian of a nearby
    model; it changes the iteration count, not the answer, so it is not part of the cache key).
    Several right-hand sides share each batched HVP.
    """

    name = "cg"

    def __init__(self, damping: float = 0.0, tol: float = 1e-10, maxiter: int | None = None, preconditioner=None):
        super().__init__(damping)
        self.tol = float(tol)
        self.maxiter = maxiter
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError("preconditioner must be a callable r -> M^-1 r")
        self._preconditioner = preconditioner

    def _solve(self, model, v):
        maxiter = self.maxiter or min(model.n_params, 1000)
        x, it, negative = conjugate_gradient(lambda u: model.hvp(u) + self.damping * u, v, self.tol, maxiter,
                                             preconditioner=self._preconditioner)
        if negative:
            hint = (" (or round-off: this model computes in %s; float64 gives the tightest solves)" % model.dtype
                    if model.dtype != "float64" else "")
            logger.warning("CG met negative curvature: H + %g I is not positive definite; raise damping, or use "
                           "the model's curvature='gauss-newton' (positive semi-definite)%s", self.damping, hint)
        res = relative_residual(model, x, v, self.damping)
        converged = res <= max(10 * self.tol, 1e-6)
        if not converged:
            logger.warning("CG stopped after %d iterations at relative residual %.2e", it, res)
        return SolveResult(x=x, solver=self.name, iterations=it, residual=res, converged=converged,
                           damping=self.damping, info={"negative_curvature": negative})


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


class ArnoldiSolver(InverseHVPSolver):
    """Low-rank inverse from the top eigenpairs of ``H`` (Schioppa et al. 2022).

    Lanczos iteration (the symmetric case of Arnoldi's; ARPACK's ``eigsh`` driven by HVPs)
    finds the ``rank`` largest eigenvalues ``lambda`` of ``H`` (or ``G``) and their
    orthonormal eigenvectors ``V`` (p, rank); then::

        x = V diag(1 / (lambda + damping)) V^T v  +  (I - V V^T) v / (fill + damping)

    The second term is dropped when ``fill`` is None (the default, as in the paper above:
    ``v`` is projected onto the top eigenspace). A number assumes every remaining
    eigenvalue equals ``fill``, e.g. the weight decay, the floor of an L2-regularised
    convex model's spectrum. The decomposition is cached on the model for the current
    theta, training data and curvature, so every later solve, for any number of
    right-hand sides, costs two (p, rank) products and one HVP for the residual.
    Exact (up to ``tol``) when ``rank = p``; otherwise an approximation whose error the
    returned residual shows. For ``rank >= p - 1`` (ARPACK needs rank < p) the explicit
    Hessian's eigendecomposition is used.
    """

    name = "arnoldi"

    def __init__(self, damping: float = 0.0, rank: int = 50, fill: float | None = None, tol: float = 1e-6,
                 maxiter: int | None = None, seed: int = 0):
        super().__init__(damping)
        if int(rank) < 1:
            raise ValueError("rank must be >= 1")
        if fill is not None and not float(fill) >= 0:
            raise ValueError("fill must be None or >= 0")
        if fill is not None and self.damping != "auto" and float(fill) + self.damping <= 0:
            raise ValueError("fill + damping must be > 0 (the complement would be divided by zero)")
        self.rank = int(rank)
        self.fill = None if fill is None else float(fill)
        self.tol = float(tol)
        self.maxiter = maxiter
        self.seed = int(seed)

    def eigenpairs(self, model) -> tuple[np.ndarray, np.ndarray]:
        """``(lambda, V)``: the ``rank`` largest eigenvalues (descending) and eigenvectors."""
        p = model.n_params
        rank = min(self.rank, p)
        key = (*model.state_key_, rank, self.tol, self.seed,
               self.maxiter)
        cached = getattr(model, "_eigen_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        t0 = time.perf_counter()
        if rank >= p - 1:
            lam, V = np.linalg.eigh(model.hessian())
            lam, V = lam[::-1][:rank], V[:, ::-1][:, :rank]
            matvecs = p
        else:
            import scipy.sparse.linalg as spla

            count = [0]

            def matvec(u):
                count[0] += 1
                return model.hvp(np.ravel(u))

            op = spla.LinearOperator((p, p), matvec=matvec, dtype=np.float64)
            v0 = np.random.default_rng(self.seed).standard_normal(p)
            lam, V = spla.eigsh(op, k=rank, which="LA", tol=self.tol, v0=v0, maxiter=self.maxiter)
            order = np.argsort(lam)[::-1]
            lam, V = lam[order], V[:, order]
            matvecs = count[0]
        logger.info("arnoldi: %d eigenpairs in %.2fs (%d HVPs); eigenvalues %.3g .. %.3g", rank,
                    time.perf_counter() - t0, matvecs, lam[0], lam[-1])
        model._eigen_cache = (key, (lam, V))
        return lam, V

    def _solve(self, model, v):
        lam, V = self.eigenpairs(model)
        shifted = lam + self.damping
        if np.any(shifted <= 0):
            raise NotPositiveDefiniteError(
                f"eigenvalue {lam.min():.3g} of the kept {len(lam)}: H + {self.damping} I is not positive definite "
                f"there; lower the rank, add damping > {-lam.min():.3g}, or use curvature='gauss-newton'")
        coef = V.T @ v
        x = V @ (coef / (shifted if v.ndim == 1 else shifted[:, None]))
        if self.fill is not None:
            if self.fill + self.damping <= 0:
                raise ValueError("fill + damping must be > 0 (the complement would be divided by zero)")
            x = x + (v - V @ coef) / (self.fill + self.damping)
        res = relative_residual(model, x, v, self.damping)
        return SolveResult(x=x, solver=self.name, iterations=len(lam), residual=res, converged=res <= 1e-6,
                           damping=self.damping, info={"rank": len(lam), "eigenvalue_min": float(lam[-1]),
                                                       "eigenvalue_max": float(lam[0])})


SOLVERS = {cls.name: cls for cls in (ExactSolver, CGSolver, LissaSolver, ArnoldiSolver)}


def get_solver(solver: str | InverseHVPSolver = "cg", **options) -> InverseHVPSolver:
    """A solver instance from a name (``exact``, ``cg``, ``lissa``, ``arnoldi``) and its options."""
    if isinstance(solver, InverseHVPSolver):
        if options:
            raise ValueError("pass options either to the solver instance or here, not both")
        return solver
    try:
        cls = SOLVERS[solver]
    except KeyError:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}") from None
    return cls(**options)

"""Preconditioners for (block) conjugate gradients on ``A = C + d I``.

A preconditioner is an SPD ``M^-1 ~ A^-1`` that CG applies to its residuals; it changes
the iteration count, never the answer (CG still stops on the true system's residual).

``NystromPreconditioner(rank=k)`` (spectral / Nystrom, Frangella, Tropp & Udell 2023):
with ``(lambda, V)`` the ``k`` largest eigenpairs of ``C`` (Lanczos on HVPs, computed once
per model state and curvature by the operator and shared with ``solver="arnoldi"``)::

    M^-1 = (lambda_k + d) V (Lambda + d I)^-1 V^T + (I - V V^T)

``M^-1 A`` maps each kept eigenvalue ``lambda_i + d`` to ``lambda_k + d`` and leaves the
rest unchanged, so CG's condition number drops from ``(lambda_1 + d) / (lambda_min + d)``
to ``(lambda_k + d) / (lambda_min + d)``. It is SPD whenever ``lambda_k + d > 0`` (its
eigenvalues are ``(lambda_k + d) / (lambda_i + d)`` and 1), which holds for every damping
that makes ``A`` positive definite; an indefinite ``H`` uses its *largest* eigenvalues,
and a damping with ``lambda_k + d <= 0`` is refused (``A`` is then indefinite anyway).

``KroneckerPreconditioner("kfac" | "ekfac")``: ``M^-1`` is the (E)K-FAC inverse at the same
damping (SPD when its eigenvalues plus weight decay and damping are > 0, checked at build). Measured on the paper's CNN it is a poor preconditioner for
the full ``G`` (docs/solvers.md); it is kept for models where the block-diagonal
curvature dominates.

``GaussNewtonPreconditioner()`` (``"gauss-newton"``): ``M^-1 = (G + d I)^-1`` by a Cholesky
factorisation of the explicit Gauss-Newton matrix of the same model and training points,
built from per-example output Jacobians (k reverse passes per example, not p products:
:meth:`~influence.curvature.operators.CurvatureOperator.dense`) and cached with the
operator. For a solve on ``G`` it is the exact inverse (CG stops after one iteration, its
answer checked on the matrix-free product); for ``H`` it leaves ``I + M^-1 (H - G)``, the
residual term of the Hessian; where the outputs are linear in theta ``G = H`` (the logistic
models build it in closed form), so CG on ``H`` stops after one iteration too, and the set-up
(forming the matrix: at most ``n k (k - 1) d^2 / 4`` multiply-adds for softmax regression,
fewer where inputs are sparse: :mod:`influence.curvature.gram`) is the cost.
SPD for every ``d > 0`` (``G`` is positive semi-definite);
refused above the model's ``max_hessian_params`` (then use ``"nystrom"``).
``GaussNewtonPreconditioner(dtype="float32")`` (``"gauss-newton-float32"``) forms and factors
the matrix in single precision: it is then ``(G + d I)^-1`` to ~1e-7 relative and CG takes
two iterations instead of one, for ~60% of the set-up; on the Fig 2 logistic model that
makes 100 test points cheapest (docs/solvers.md). Parameters that no loss term reaches (the
weights of an always-zero input) have only the regulariser's diagonal and are left out of
the factorisation.

``make_preconditioner(spec, rank)`` turns CG's ``preconditioner=`` option (None, a name,
an instance, or a callable ``R -> M^-1 R``) into one of these.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..validation import check_choice, check_number
from .base import NotPositiveDefiniteError

PRECONDITIONERS = ("nystrom", "gauss-newton", "gauss-newton-float32", "kfac", "ekfac")
DEFAULT_RANK = 30


class Preconditioner:
    """A fitted ``M^-1 ~ (C + d I)^-1``: ``fit(operator, damping)`` computes what it needs and
    holds it (refitted only when the operator's state or the damping changes), ``apply(R)``
    (or calling it) gives ``M^-1 R`` for (p,) or (p, k) arrays; ``config()`` says what
    determines it, ``setup`` what the last fit cost. Nothing is stored on the operator."""

    name = "base"

    def fit(self, operator, damping: float) -> "Preconditioner":
        key = (id(operator), operator.state_key(), float(damping))
        if getattr(self, "_fitted_for", None) != key:
            self._fitted_for = None
            self._apply = self._fit(operator, float(damping))
            self._fitted_for = key
        elif isinstance(getattr(self, "setup", None), dict) and self.setup:
            self.setup = {**self.setup, "setup_hvps": 0, "setup_s": 0.0}  # this fit cost nothing: already fitted
        return self

    def apply(self, R: np.ndarray) -> np.ndarray:
        if getattr(self, "_fitted_for", None) is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(operator, damping) first")
        return self._apply(R)

    __call__ = apply

    def build(self, operator, damping: float) -> Callable[[np.ndarray], np.ndarray]:
        """The map ``R -> M^-1 R`` of ``fit(operator, damping)``, fixed (a later fit at another
        damping does not change it; the earlier interface)."""
        return self.fit(operator, damping)._apply

    def _fit(self, operator, damping: float) -> Callable[[np.ndarray], np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def config(self) -> dict:
        return {"preconditioner": self.name}

    def __repr__(self):  # stable: the shortcuts key their shared solvers by it
        return f"{type(self).__name__}({self.config()})"


class NystromPreconditioner(Preconditioner):
    """Spectral (Nystrom) preconditioner from the ``rank`` largest eigenpairs of the operator
    (module docstring). ``tol``, ``seed``, ``maxiter``: the Lanczos run's (as ArnoldiSolver's)."""

    name = "nystrom"

    def __init__(self, rank: int = DEFAULT_RANK, tol: float = 1e-6, seed: int = 0, maxiter: int | None = None):
        self.rank = check_number("preconditioner_rank", rank, low=1, integer=True)
        self.tol = check_number("tol", tol, low=0.0)
        self.seed = check_number("seed", seed, low=0, integer=True)
        self.maxiter = check_number("maxiter", maxiter, low=1, integer=True, allow_none=True)
        self.setup: dict = {}

    def config(self) -> dict:
        return {"preconditioner": self.name, "rank": self.rank, "tol": self.tol, "seed": self.seed,
                "maxiter": self.maxiter}

    def eigenpairs(self, operator):
        return operator.top_eigenpairs(self.rank, tol=self.tol, seed=self.seed, maxiter=self.maxiter)

    def _fit(self, operator, damping: float):
        t0 = time.perf_counter()
        before = operator.eigenpairs_cost()
        lam, V = self.eigenpairs(operator)
        fresh = operator.eigenpairs_cost()
        reused = bool(before) and fresh == before
        apply = nystrom_inverse(lam, V, damping)
        self.setup = {"preconditioner": self.name, "rank": int(len(lam)),
                      "setup_hvps": 0 if reused else fresh.get("hvps", 0),
                      "setup_s": 0.0 if reused else time.perf_counter() - t0,
                      "eigenvalue_kept_min": float(lam[-1]), "eigenvalue_max": float(lam[0])}
        return apply


def nystrom_inverse(lam: np.ndarray, V: np.ndarray, damping: float) -> Callable[[np.ndarray], np.ndarray]:
    """``r -> M^-1 r`` with ``M^-1 = (lam_k + d) V (diag(lam) + d I)^-1 V^T + (I - V V^T)``
    (``lam`` descending, ``V`` orthonormal columns)."""
    lam = np.asarray(lam, dtype=np.float64)
    floor = float(lam[-1]) + damping
    if not floor > 0:
        raise NotPositiveDefiniteError(
            f"Nystrom preconditioner: the smallest kept eigenvalue plus damping is {floor:.3g} <= 0, so C + "
            f"{damping:g} I is not positive definite; raise damping above {-float(lam[-1]):.3g} or use "
            f"curvature='gauss-newton'")
    scale = floor / (lam + damping) - 1.0  # M^-1 = I + V diag(scale) V^T

    def apply(r):
        coef = V.T @ r
        return r + V @ (coef * (scale if r.ndim == 1 else scale[:, None]))

    return apply


class GaussNewtonPreconditioner(Preconditioner):
    """``(G + d I)^-1`` from the explicit Gauss-Newton matrix (module docstring).

    ``dtype``: the precision the matrix is formed and factored in. ``"float64"`` (default):
    on ``G`` the exact inverse, CG stops after one iteration. ``"float32"``: cheaper to form
    and factor, equal to the float64 matrix to ~1e-7 relative, so CG needs one more iteration;
    worth it where forming the matrix costs more than a product (the linear models), not
    where a product is dear (the CNN's many-column products); timings in docs/solvers.md.
    Parameters that no training point's loss reaches
    (all-zero inputs of a linear model) are left out of the factorisation: their rows are
    the regulariser's diagonal alone."""

    name = "gauss-newton"

    def __init__(self, dtype: str = "float64"):
        self.dtype = check_choice("dtype", dtype, ("float64", "float32"))
        self.setup: dict = {}

    def config(self) -> dict:
        return {"preconditioner": self.name, "dtype": self.dtype}

    def _fit(self, operator, damping: float):
        import scipy.linalg

        t0 = time.perf_counter()
        gn = operator.gauss_newton()
        m = gn.model
        if m.n_params > m.max_hessian_params:
            raise ValueError(f"preconditioner='gauss-newton' needs the explicit (p, p) Gauss-Newton matrix; p = "
                             f"{m.n_params} > max_hessian_params = {m.max_hessian_params}: use "
                             f"preconditioner='nystrom' (or raise max_hessian_params)")
        singular = (f"preconditioner='gauss-newton': G + {damping:g} I is not positive definite (G is singular "
                    f"where the weight decay does not reach); pass damping > 0")

        def factor():
            index, B, rest = gn.explicit_blocks(self.dtype)
            B[np.diag_indices(len(index))] += B.dtype.type(damping)
            rest = rest + damping
            if np.any(rest <= 0):
                raise NotPositiveDefiniteError(singular)
            try:
                fac = scipy.linalg.cho_factor(B, lower=True, overwrite_a=True, check_finite=False)
            except np.linalg.LinAlgError as exc:
                raise NotPositiveDefiniteError(singular) from exc
            if not np.all(np.isfinite(np.diagonal(fac[0]))):
                raise NotPositiveDefiniteError(singular)
            return index, np.setdiff1d(np.arange(gn.n_params), index), fac, rest

        self._factor = None  # the previous fit's factor goes before the new one is made (~p^2 numbers)
        index, other, fac, rest = self._factor = factor()
        dt = fac[0].dtype
        in_order = not len(other) and np.array_equal(index, np.arange(len(index)))  # the factor is all of M
        self.setup = {"preconditioner": self.name, "rank": int(len(index)), "dtype": self.dtype, "setup_hvps": 0,
                      "setup_s": time.perf_counter() - t0}  # ~0 when the factor was cached

        def apply(r):
            if in_order:
                return scipy.linalg.cho_solve(fac, r.astype(dt, copy=False), check_finite=False).astype(np.float64)
            out = np.empty(r.shape, dtype=np.float64)
            out[index] = scipy.linalg.cho_solve(fac, r[index].astype(dt), check_finite=False)
            out[other] = r[other] / (rest if r.ndim == 1 else rest[:, None])
            return out

        return apply


class KroneckerPreconditioner(Preconditioner):
    """The K-FAC (``"kfac"``) or EK-FAC (``"ekfac"``) inverse as ``M^-1``, at CG's damping
    (``fisher``, ``mc_samples``, ``seed`` as :class:`~influence.solvers.kfac.KFACSolver`)."""

    def __init__(self, kind: str = "ekfac", fisher: str = "expectation", mc_samples: int = 1, seed: int = 0):
        from .kfac import FISHERS

        if kind not in ("kfac", "ekfac"):
            raise ValueError(f"kind must be 'kfac' or 'ekfac', got {kind!r}")
        self.name = kind
        self.fisher = check_choice("fisher", fisher, FISHERS)
        self.mc_samples = check_number("mc_samples", mc_samples, low=1, integer=True)
        self.seed = check_number("seed", seed, low=0, integer=True)
        self._solver = None
        self.setup: dict = {}

    def config(self) -> dict:
        return {"preconditioner": self.name, "fisher": self.fisher, "mc_samples": self.mc_samples, "seed": self.seed}

    def _fit(self, operator, damping: float):
        from .kfac import EKFACSolver, KFACSolver

        t0 = time.perf_counter()
        if self._solver is None:
            cls = EKFACSolver if self.name == "ekfac" else KFACSolver
            self._solver = cls(damping=damping, fisher=self.fisher, mc_samples=self.mc_samples, seed=self.seed)
        solver = self._solver.with_damping(damping).fit(operator)
        with np.errstate(divide="ignore", invalid="ignore"):  # only its smallest eigenvalue is wanted here
            _, smallest = solver.apply_inverse(np.zeros(operator.n_params))
        if not smallest > 0:
            raise NotPositiveDefiniteError(
                f"preconditioner={self.name!r}: its smallest eigenvalue plus weight decay and damping is "
                f"{smallest:.3g} <= 0 (singular Kronecker factors); pass damping > 0, got damping={damping!r}")
        self.setup = {"preconditioner": self.name, "rank": None, "setup_hvps": 0,
                      "setup_s": time.perf_counter() - t0}
        return lambda r: solver.apply_inverse(r)[0]


class CallablePreconditioner(Preconditioner):
    """A user's ``R -> M^-1 R`` (SPD, close to ``(C + d I)^-1``). It gets a copy of each residual
    (changing it in place cannot corrupt the solve), and what it returns is checked: same
    shape, real, finite; else an error that names the callable."""

    name = "callable"

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError("preconditioner must be a callable r -> M^-1 r")
        self.fn = fn
        self.setup = {"preconditioner": "callable", "rank": None, "setup_hvps": 0, "setup_s": 0.0}

    def config(self) -> dict:
        return {"preconditioner": "callable", "fn": id(self.fn)}

    def _fit(self, operator, damping: float):
        return self._checked

    def _checked(self, R):
        label = f"preconditioner={getattr(self.fn, '__qualname__', type(self.fn).__name__)!r} (your callable R -> M^-1 R)"
        try:
            out = self.fn(np.array(R, dtype=np.float64, copy=True))
        except Exception as exc:
            raise ValueError(f"{label} raised {type(exc).__name__} on a residual of shape {np.shape(R)}: "
                             f"{exc}") from exc
        try:
            out = np.asarray(out, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{label} returned {type(out).__name__}, not an array of numbers") from exc
        if out.shape != np.shape(R):
            raise ValueError(f"{label} returned shape {out.shape} for a residual of shape {np.shape(R)}: it must "
                             f"return M^-1 R, of the residual's shape")
        if not np.all(np.isfinite(out)):
            raise ValueError(f"{label} returned NaN or infinite values (it must be a symmetric positive definite "
                             f"M^-1)")
        return out


def make_preconditioner(spec, rank: int | None = None) -> Preconditioner | None:
    """CG's ``preconditioner=`` option as a :class:`Preconditioner`: None, ``"nystrom"``
    (with ``rank``, default 30), ``"gauss-newton"``, ``"gauss-newton-float32"``, ``"kfac"``, ``"ekfac"``, an
    instance, or a callable."""
    if rank is not None:
        check_number("preconditioner_rank", rank, low=1, integer=True)
        if spec != "nystrom":
            raise ValueError(f"preconditioner_rank={rank!r} applies to preconditioner='nystrom' only, got "
                             f"preconditioner={spec!r}")
    if spec is None or isinstance(spec, Preconditioner):
        return spec
    if isinstance(spec, str):
        if spec == "nystrom":
            return NystromPreconditioner(rank=DEFAULT_RANK if rank is None else rank)
        if spec == "gauss-newton":
            return GaussNewtonPreconditioner()
        if spec == "gauss-newton-float32":
            return GaussNewtonPreconditioner(dtype="float32")
        if spec in ("kfac", "ekfac"):
            return KroneckerPreconditioner(spec)
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, a Preconditioner or a callable "
                         f"r -> M^-1 r; got {spec!r}")
    if callable(spec):
        return CallablePreconditioner(spec)
    raise TypeError(f"preconditioner must be one of {PRECONDITIONERS}, a Preconditioner or a callable r -> M^-1 r; "
                    f"got {type(spec).__name__}")

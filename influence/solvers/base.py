"""The one interface every inverse-HVP solver implements, and what they share.

A solver is fitted on a curvature operator ``C`` (:mod:`influence.curvature`: the Hessian
``H`` or the Gauss-Newton matrix ``G`` of a model), holds what it precomputes (a Cholesky
factor, eigenpairs, Kronecker factors), and solves ``(C + damping I) x = v`` for one
right-hand side ``v`` of shape (p,) or several at once (shape (p, k))::

    solver = CGSolver(damping=0.01, tol=1e-8).fit(GaussNewtonOperator(model))
    result = solver.solve(v)            # a SolveResult: x and its diagnostics

``solver.solve(model, v)`` fits on the model's shared operator for its ``curvature`` first.
Precomputed values are keyed by the operator's state (theta, data): a solve after the
model changed recomputes them. ``damping`` means the same thing for every solver (the
original code's LiSSA ``damping`` d is ``damping = d * scale`` here); ``damping="auto"``
is :class:`~influence.solvers.damping.AutoDamping`.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..utils import memo
from .damping import (AUTO_DAMPING_FACTOR, AUTO_DAMPING_LANCZOS_TOL, AUTO_DAMPING_RETRIES,  # noqa: F401
                      AutoDamping, check_damping)

logger = logging.getLogger(__name__)


class LissaDivergenceError(RuntimeError):
    """The LiSSA recursion blew up (NaN/inf or a growing norm)."""


class NotPositiveDefiniteError(np.linalg.LinAlgError):
    """H + damping I is not positive definite."""


class SolveFailedError(RuntimeError):
    """An iterative solve did not reach its target (``result``: the failed SolveResult)."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


@dataclass
class SolveResult:
    """Solution ``x`` of ``(C + damping I) x = v`` and how it was obtained.

    ``residual`` is the relative residual ``||(C + damping I) x - v|| / ||v||``, computed
    afresh with full products (for several right-hand sides: the largest over columns).
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


def column_residuals(operator, x: np.ndarray, v: np.ndarray, damping: float) -> np.ndarray:
    """``||(C + damping I) x_k - v_k|| / ||v_k||`` for each column ``k`` (a zero ``v_k``: the absolute norm)."""
    r = operator.hvp(x) + damping * x - v
    num = np.linalg.norm(r, axis=0)
    den = np.linalg.norm(v, axis=0)
    return np.atleast_1d(num / np.where(den > 0, den, 1.0))


def relative_residual(operator, x: np.ndarray, v: np.ndarray, damping: float) -> float:
    """``max_k ||(C + damping I) x_k - v_k|| / ||v_k||``."""
    return float(np.max(column_residuals(operator, x, v, damping)))


class InverseHVPSolver:
    """Interface: ``fit(operator)``, then ``solve(v) -> SolveResult`` for ``(C + damping I) x = v``.

    Subclasses set ``name``, validate their options in ``__init__`` and implement
    ``_solve(v)`` with ``self.operator_``; what they precompute goes through
    :meth:`_memo`, keyed by the operator's state, and is shared by copies that
    :meth:`with_damping` makes.
    """

    name = "base"
    #: an approximation of the inverse (its residual says how close), not an iterative solve to a tolerance
    approximate = False

    def __init__(self, damping: float | str | AutoDamping = 0.0):
        self.damping = check_damping(damping)
        self._store: dict = {}   # fitted values, keyed by what they depend on; shared by with_damping copies
        self.operator_ = None

    # ------------------------------------------------------------------ fitting
    def fit(self, operator) -> "InverseHVPSolver":
        """Bind the solver to a curvature operator (a model: its shared operator for its curvature)."""
        from ..curvature import as_operator

        self.operator_ = as_operator(operator)
        return self

    def settings_key(self) -> dict:
        """Every option of this solver, the private ones too (a callable by its identity): two
        solvers with equal keys compute the same things (the facade shares one per key)."""
        return {k: (id(v) if callable(v) else repr(v)) for k, v in vars(self).items()
                if k not in ("_store", "operator_")}

    def share_store(self, store: dict) -> "InverseHVPSolver":
        """Use ``store`` for precomputed values (shared by solvers of one kind on one operator;
        every entry is keyed by all it depends on)."""
        self._store = store
        return self

    @staticmethod
    def new_store() -> dict:
        return {}

    def _memo(self, name: str, key, compute):
        """``compute()`` once per ``key`` (e.g. the operator's state and the options it depends on)."""
        return memo(self._store, name, key, compute)

    def with_damping(self, damping) -> "InverseHVPSolver":
        """A copy with another damping that shares this solver's precomputed values."""
        other = copy.copy(self)
        other.damping = check_damping(damping)
        return other

    # ------------------------------------------------------------------ solving
    def config(self) -> dict:
        """Settings that determine the result (used in cache keys)."""
        cfg = {"solver": self.name}
        for k, v in vars(self).items():
            if k.startswith("_") or k.endswith("_"):
                continue
            cfg[k] = v.config() if isinstance(v, AutoDamping) else v
        return cfg

    def solve(self, *args) -> SolveResult:
        """``solve(v)`` on the fitted operator, or ``solve(model_or_operator, v)`` (fits first)."""
        if len(args) == 2:
            target, v = args
            from ..curvature import CurvatureOperator

            if not (isinstance(target, CurvatureOperator) and target is self.operator_):
                self.fit(target)
        elif len(args) == 1:
            (v,) = args
        else:
            raise TypeError("solve(v) or solve(model_or_operator, v)")
        if self.operator_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(operator) first")
        p = self.operator_.n_params
        v = np.asarray(v, dtype=np.float64)
        if v.ndim not in (1, 2) or v.shape[0] != p:
            raise ValueError(f"v must have shape ({p},) or ({p}, k); got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("v contains NaN or infinite values")
        t0 = time.perf_counter()
        res = self._solve_auto_damping(v) if isinstance(self.damping, AutoDamping) else self._solve(v)
        res.time_s = time.perf_counter() - t0
        res.info.setdefault("curvature", self.operator_.kind)
        res.info.setdefault("approximate", self.approximate)
        res.info.setdefault("gradient_norm", getattr(self.operator_.model, "grad_norm_", None))  # at the last fit
        logger.info("%s solve on %s: %d iterations, relative residual %.2e, %.2fs", self.name,
                    self.operator_.kind, res.iterations, res.residual, res.time_s)
        self.check_result(res)
        return res

    def check_result(self, res: SolveResult) -> None:
        """Raise (or warn) where the solve failed; approximate solvers report, never raise."""

    def _auto_eigenvalues(self, auto: AutoDamping):
        return auto.eigenvalues(self.operator_, dense=False)

    def _solve_auto_damping(self, v) -> SolveResult:
        auto = self.damping
        lmin, lmax, accuracy = self._auto_eigenvalues(auto)
        solver = self.with_damping(auto.choose(lmin, accuracy))
        logger.info("damping='auto': smallest eigenvalue %.3g (+- %.2g), damping %.3g", lmin, accuracy,
                    solver.damping)
        res = solver._solve(v)
        retries = 0
        while res.info.get("negative_curvature") and retries < auto.retries:
            solver = solver.with_damping(auto.raised(solver.damping, accuracy))
            retries += 1
            logger.warning("damping='auto': CG met negative curvature, damping raised to %.3g", solver.damping)
            res = solver._solve(v)
        res.info.update(damping_auto=True, damping_retries=retries, smallest_eigenvalue=lmin,
                        largest_eigenvalue=lmax)
        return res

    def _solve(self, v):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items() if k != 'solver')})"

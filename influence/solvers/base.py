"""The one interface every inverse-HVP solver implements, and what they share.

A solver solves ``(H + damping * I) x = v`` for one right-hand side ``v`` of shape (p,) or
several at once (shape (p, k)), where ``H`` is a model's Hessian (its Gauss-Newton matrix
when the model's ``curvature`` is "gauss-newton"), and returns a :class:`SolveResult` with
the solution and its diagnostics. ``damping`` means the same thing for every solver. (The
original code's LiSSA ``damping`` d corresponds to ``damping = d * scale`` here.)

``damping="auto"`` follows Koh's rule for non-convex models (influence-release #6): no
damping where ``H`` is positive definite, else 1.5 times the magnitude of its smallest
eigenvalue (Lanczos on HVPs, good to about 1e-4 of the largest eigenvalue, which is the
least damping used where the smallest is not clearly positive; the explicit Hessian's
eigenvalues for the exact solver), tripled up to ``AUTO_DAMPING_RETRIES`` times while CG
still meets negative curvature. The value used is ``SolveResult.damping``.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

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


def column_residuals(model, x: np.ndarray, v: np.ndarray, damping: float) -> np.ndarray:
    """``||(H + damping I) x_k - v_k|| / ||v_k||`` for each column ``k`` (a zero ``v_k``: the absolute norm)."""
    r = model.hvp(x) + damping * x - v
    num = np.linalg.norm(r, axis=0)
    den = np.linalg.norm(v, axis=0)
    return np.atleast_1d(num / np.where(den > 0, den, 1.0))


def relative_residual(model, x: np.ndarray, v: np.ndarray, damping: float) -> float:
    """``max_k ||(H + damping I) x_k - v_k|| / ||v_k||``."""
    return float(np.max(column_residuals(model, x, v, damping)))


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

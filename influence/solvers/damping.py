"""``damping="auto"``: Koh's rule for a matrix that may not be positive definite (influence-release #6).

No damping (or ``minimum``) where ``C + minimum I`` is surely positive definite, else
``factor`` times the magnitude of the smallest eigenvalue ``lambda_min`` of ``C`` (at least
``minimum`` and the estimate's accuracy), multiplied by 3 up to ``retries`` times while CG
still meets negative curvature. ``lambda_min`` comes from Lanczos on HVPs, good to about
``lanczos_tol * lambda_max`` (the accuracy), or from the explicit matrix for the exact
solver; ``bounds`` gives known eigenvalues instead (e.g. recorded by an earlier run).
This is the one place the rule lives; every solver and script uses it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..validation import check_number

AUTO_DAMPING_FACTOR = 1.5   # this times |smallest eigenvalue| where it is negative
AUTO_DAMPING_RETRIES = 4    # ... tripled at most this often while CG meets negative curvature
AUTO_DAMPING_LANCZOS_TOL = 1e-4  # Lanczos tolerance: eigenvalues good to about this times lambda_max


@dataclass(frozen=True)
class AutoDamping:
    """The settings of ``damping="auto"`` (module docstring); ``AutoDamping()`` is ``"auto"``.

    Parameters
    ----------
    minimum : float
        Least damping used (>= 0); kept where ``C + minimum I`` is surely definite.
    factor : float
        Multiple of ``|lambda_min|`` used where it is not (> 0).
    retries : int
        How often the damping is tripled while CG meets negative curvature (>= 0).
    lanczos_tol, lanczos_maxiter : float, int or None
        Lanczos settings of the eigenvalue estimate.
    accuracy : float or None
        Absolute accuracy of ``lambda_min`` (None: ``lanczos_tol * |lambda_max|``; the
        explicit matrix's: ``1e-12 |lambda_max|``).
    bounds : (float, float) or None
        Known ``(lambda_min, lambda_max)``: no eigenvalue search.
    """

    minimum: float = 0.0
    factor: float = AUTO_DAMPING_FACTOR
    retries: int = AUTO_DAMPING_RETRIES
    lanczos_tol: float = AUTO_DAMPING_LANCZOS_TOL
    lanczos_maxiter: int | None = None
    accuracy: float | None = None
    bounds: tuple | None = None

    def __post_init__(self):
        check_number("minimum", self.minimum, low=0.0)
        check_number("factor", self.factor, low=0.0, low_open=True)
        check_number("retries", self.retries, low=0, integer=True)
        check_number("lanczos_tol", self.lanczos_tol, low=0.0, low_open=True)
        if self.lanczos_maxiter is not None:
            check_number("lanczos_maxiter", self.lanczos_maxiter, low=1, integer=True)
        if self.accuracy is not None:
            check_number("accuracy", self.accuracy, low=0.0)
        if self.bounds is not None:
            lo, hi = (check_number("bounds", b) for b in self.bounds)
            object.__setattr__(self, "bounds", (float(lo), float(hi)))

    def eigenvalues(self, operator, dense: bool) -> tuple[float, float, float]:
        """``(lambda_min, lambda_max, accuracy)`` of ``operator`` (cached by the operator)."""
        if self.bounds is not None:
            lmin, lmax = self.bounds
            acc = self.lanczos_tol * abs(lmax)
        elif dense:
            lmin, lmax = operator.dense_eigenvalue_bounds()
            acc = 1e-12 * abs(lmax)
        else:
            lmin, lmax = operator.eigenvalue_bounds(tol=self.lanczos_tol, maxiter=self.lanczos_maxiter)
            acc = self.lanczos_tol * abs(lmax)
        return lmin, lmax, (acc if self.accuracy is None else float(self.accuracy))

    def choose(self, lmin: float, accuracy: float) -> float:
        """The damping for a smallest eigenvalue ``lmin`` known to ``accuracy``."""
        if lmin + self.minimum > max(accuracy, 0.5 * self.minimum):
            return float(self.minimum)
        return float(max(self.minimum, accuracy, self.factor * -lmin))

    def raised(self, damping: float, accuracy: float) -> float:
        """The next damping after CG met negative curvature at ``damping``."""
        return float(max(3 * damping, accuracy))

    def config(self):
        return "auto" if self == AutoDamping() else {"auto": asdict(self)}


def raise_until_definite(solve, damping: float, auto: AutoDamping | None = None):
    """The rule's retry from a known starting damping (no eigenvalue estimate): ``solve(damping)``
    (a SolveResult), the damping raised by ``auto.raised`` while the solve met negative curvature,
    at most ``auto.retries`` times. Returns ``(result, damping)`` of the last solve."""
    auto = AutoDamping() if auto is None else auto
    damping = check_number("damping", damping, low=0.0)
    res = solve(damping)
    for _ in range(auto.retries):
        if not res.info.get("negative_curvature"):
            break
        damping = auto.raised(damping, 0.0)
        res = solve(damping)
    return res, damping


def check_damping(damping) -> float | AutoDamping:
    """A damping setting: a number >= 0, ``"auto"`` or an :class:`AutoDamping`."""
    if isinstance(damping, AutoDamping):
        return damping
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(f"damping must be a number >= 0 or 'auto', got {damping!r}")
        return AutoDamping()
    return check_number("damping", damping, low=0.0)

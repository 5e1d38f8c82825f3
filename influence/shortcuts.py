"""The model's convenience methods: thin wrappers over the curvature operators and
:class:`~influence.estimators.InfluenceFunction`, so that ``model.s_test(x, y, solver="cg",
damping=0.01)`` keeps working.

Each call takes its solver by name and options (or an instance), and ``curvature`` (None:
the model's ``curvature``). Behind it sits one :class:`InfluenceFunction` per model,
curvature and solver configuration, kept here (weakly keyed by the model, never on it), so
that repeated calls reuse the solver's precomputed values (Cholesky factor, eigenpairs,
Kronecker factors) and the operator's compiled kernels. Precomputed values are keyed by
theta and the data, so a re-fitted model gets fresh ones.
"""
from __future__ import annotations

import weakref

import numpy as np

from .utils import hash_arrays

_INFLUENCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def influence_for(model, solver="cg", solver_options: dict | None = None, curvature: str | None = None):
    """The shared, fitted :class:`InfluenceFunction` of ``model`` for this solver and curvature.

    A solver instance is used as it is (it holds its own precomputed values); a name with
    options shares one instance per configuration."""
    from .curvature import check_curvature
    from .estimators.influence_function import InfluenceFunction
    from .solvers import InverseHVPSolver, get_solver

    model._require_fit()
    curvature = check_curvature(model.curvature if curvature is None else curvature)
    if isinstance(solver, InverseHVPSolver):
        if solver_options:
            raise ValueError("pass options either to the solver instance or here, not both")
        return InfluenceFunction(solver, curvature=curvature).fit(model, _weak=True)
    solver_obj = get_solver(solver, **(solver_options or {}))
    settings = {k: (id(v) if callable(v) else repr(v)) for k, v in vars(solver_obj).items()
                if k not in ("_store", "operator_")}  # every option, the private ones too
    key = hash_arrays(curvature, type(solver_obj).__qualname__, settings)
    shared = _INFLUENCES.setdefault(model, {})
    infl = shared.get(key)
    if infl is None:
        # solvers of one kind on one operator share their store of precomputed values (every
        # entry is keyed by all it depends on), so e.g. eigenpairs serve every damping
        store = shared.setdefault(("store", curvature, solver_obj.name), solver_obj._store)
        solver_obj._store = store
        infl = shared[key] = InfluenceFunction(solver_obj, curvature=curvature).fit(model, _weak=True)
    return infl


class InfluenceShortcuts:
    """``hvp``, ``hessian``, ``s_test``, ``influence_matrix``, ``most_influential`` ... on the model
    (each a thin wrapper; the work is done by the operator or the influence object)."""

    # ------------------------------------------------------------------ curvature
    def curvature_operator(self, curvature: str | None = None):
        """The shared :class:`~influence.curvature.CurvatureOperator` (None: the model's ``curvature``)."""
        from .curvature import operator_for

        return operator_for(self, curvature)

    def hvp(self, v, indices=None, curvature: str | None = None) -> np.ndarray:
        """``H v`` (or ``H V`` for a (p, k) matrix), H the Hessian of the objective; ``G v`` with
        curvature "gauss-newton". ``indices``: average the loss part over those training points."""
        return self.curvature_operator(curvature).hvp(v, indices)

    def hessian(self, curvature: str | None = None) -> np.ndarray:
        """Explicit (p, p) Hessian of the objective (``G`` with curvature "gauss-newton"); cached."""
        return self.curvature_operator(curvature).dense()

    def hessian_eigenvalue_bounds(self, tol: float = 1e-4, maxiter: int | None = None,
                                  curvature: str | None = None) -> tuple[float, float]:
        """(smallest, largest) eigenvalue by Lanczos on HVPs (cached: ``damping="auto"`` reuses them)."""
        return self.curvature_operator(curvature).eigenvalue_bounds(tol=tol, maxiter=maxiter)

    def per_example_curvature(self, refine: int = 8, curvature: str | None = None) -> np.ndarray:
        """Largest eigenvalue of each training point's loss curvature (see the operator's method)."""
        return self.curvature_operator(curvature).per_example_curvature(refine)

    # ------------------------------------------------------------------ influence
    def influence(self, solver="cg", curvature: str | None = None, **solver_options):
        """The fitted :class:`~influence.estimators.InfluenceFunction` these shortcuts use."""
        return influence_for(self, solver, solver_options, curvature)

    def inverse_hvp(self, v, solver="cg", curvature: str | None = None, **solver_options):
        """Solve ``(H + damping I) x = v``; returns a :class:`~influence.solvers.SolveResult`.

        ``solver``: "exact", "cg", "lissa", "arnoldi", "kfac", "ekfac" (options as keywords,
        e.g. ``damping``, ``tol``, ``maxiter``, ``rank``: see each solver class) or an instance."""
        self._require_fit()
        return influence_for(self, solver, solver_options, curvature).inverse_hvp(v)

    def s_test(self, X_test, y_test, solver="cg", use_cache: bool = True, curvature: str | None = None,
               **solver_options):
        """``s_test = C^-1 grad L(z_test)`` (``C``: H, or G with ``curvature="gauss-newton"``) and the
        solve's diagnostics (a SolveResult). Cached on disk under ``cache_dir`` when set.

        ``solver`` and its keyword options (each validated by the solver class):

        - ``"cg"`` (CGSolver): ``damping`` (number or "auto"), ``tol`` (None: 1e-10 float64,
          1e-5 float32), ``maxiter``, ``preconditioner`` ("nystrom", "gauss-newton", "gauss-newton-float32",
          "kfac", "ekfac", a callable),
          ``preconditioner_rank``, ``block``, ``on_failure`` ("raise" / "warn"), ``precision``
          ("full" / "mixed"), ``inner_tol``;
        - ``"exact"`` (Cholesky): ``damping``;
        - ``"lissa"``: ``damping``, ``scale`` (or "auto"), ``depth``, ``num_samples``, ``batch_size``,
          ``seed``, ``safety``, ``divergence_factor``;
        - ``"arnoldi"``: ``damping``, ``rank``, ``fill``, ``tol``, ``maxiter``, ``seed``;
        - ``"kfac"`` / ``"ekfac"``: ``damping``, ``fisher``, ``mc_samples``, ``seed``,
          ``residual_columns``;
        - or a solver instance (no options then).
        """
        return influence_for(self, solver, solver_options, curvature).s_test(X_test, y_test, use_cache=use_cache)

    def gradient_dots(self, s, indices=None, include_regularizer: bool = True) -> np.ndarray:
        """``s . g(z_i)`` (float64) for the given training indices, via forward-mode JVPs; with
        ``s = s_test`` it is ``-I_up,loss(z_i, z_test)`` (``influence_*`` return ``+I_up,loss``)."""
        from .estimators.influence_function import gradient_dots

        return gradient_dots(self, s, indices, include_regularizer)

    def influence_scores(self, s, indices=None, include_regularizer: bool = True) -> np.ndarray:
        """Deprecated name of :meth:`gradient_dots` (warns)."""
        from .estimators.influence_function import influence_scores

        return influence_scores(self, s, indices, include_regularizer)

    def influence_up_loss(self, X_test, y_test, indices=None, solver="cg", include_regularizer: bool = True,
                          curvature: str | None = None, use_cache: bool = True, **solver_options) -> np.ndarray:
        """``I_up,loss(z_i, z_test) = -s_test . g(z_i)`` for training points ``indices`` (default all)."""
        return influence_for(self, solver, solver_options, curvature).influence_up_loss(
            X_test, y_test, indices, include_regularizer, use_cache=use_cache)

    def influence_matrix(self, X_test, y_test, indices=None, solver="cg", include_regularizer: bool = True,
                         out=None, test_chunk: int | None = None, resume: bool = False,
                         curvature: str | None = None, **solver_options) -> np.ndarray:
        """``I_up,loss(z_i, z_test_k)``, shape (k, m); see :meth:`InfluenceFunction.influence_matrix`."""
        self._require_fit()
        return influence_for(self, solver, solver_options, curvature).influence_matrix(
            X_test, y_test, indices, include_regularizer=include_regularizer, out=out, test_chunk=test_chunk,
            resume=resume)

    def predicted_loss_diffs(self, X_test, y_test, indices=None, solver="cg", curvature: str | None = None,
                             use_cache: bool = True, **solver_options) -> np.ndarray:
        """Predicted change in test loss when each training point is removed: ``-I_up,loss / n``."""
        return influence_for(self, solver, solver_options, curvature).predicted_loss_diffs(
            X_test, y_test, indices, use_cache=use_cache)

    def most_influential(self, X_test, y_test, k: int = 10, indices=None, solver="cg",
                         curvature: str | None = None, use_cache: bool = True, **solver_options):
        """The ``k`` most helpful and most harmful training points (an InfluenceRanking)."""
        if int(k) < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self._require_fit()
        return influence_for(self, solver, solver_options, curvature).most_influential(
            X_test, y_test, k, indices, use_cache=use_cache)

    def influence_up_params(self, indices, solver="cg", include_regularizer: bool = True,
                            curvature: str | None = None, **solver_options) -> np.ndarray:
        """``I_up,params(z_i) = -H^-1 g(z_i)``, shape (m, p); one multi-RHS solve."""
        return influence_for(self, solver, solver_options, curvature).influence_up_params(indices,
                                                                                          include_regularizer)

    def influence_pert_loss(self, X_test, y_test, indices, solver="cg", curvature: str | None = None,
                            use_cache: bool = True, **solver_options) -> np.ndarray:
        """``I_pert,loss(z_i, z_test) = d/dx_i I_up,loss(z_i, z_test)``, shape (m, *x_shape)."""
        return influence_for(self, solver, solver_options, curvature).influence_pert_loss(
            X_test, y_test, indices, use_cache=use_cache)

    def score_input_gradients(self, s, indices) -> np.ndarray:
        """``-d/dx_i (s . grad L(z_i))`` for the given training indices."""
        from .estimators.influence_function import score_input_gradients

        return score_input_gradients(self, s, indices)

    def self_influence(self, indices=None, solver="exact", include_regularizer: bool = True,
                       curvature: str | None = None, **solver_options) -> np.ndarray:
        """``I_up,loss(z_i, z_i) = -g(z_i)^T H^-1 g(z_i)``; batched multi-RHS solves."""
        return influence_for(self, solver, solver_options, curvature).self_influence(indices, include_regularizer)

"""A model's influence tools: the facade that holds one model's shared curvature operators,
fitted influence objects and their caches, and the model's convenience methods over it.

``Influence(model)`` answers ``hvp``, ``hessian``, ``s_test``, ``influence_matrix``,
``most_influential``, ... for one fitted model. It owns everything it reuses between calls:
one :class:`~influence.curvature.CurvatureOperator` per curvature (compiled products, the
explicit matrix, eigenvalues; the linear models' closed form, with its column split, is
shared by both), one :class:`~influence.estimators.InfluenceFunction` per solver
configuration, and one solver store per solver kind and curvature (eigenpairs or factors
serve every damping; every entry is keyed by all it depends on). Nothing is kept at module
level: when the model goes, its facade goes with it.

The concrete models (:class:`InfluenceMethods`) hold one facade, made when they receive
training data, and their ``model.s_test(...)`` ... are one-line wrappers over it; a model
class of your own gets them by deriving from :class:`influence.models.Model` (or use
``Influence(model)`` on any :class:`~influence.generic_neural_net.GenericNeuralNet`).
"""
from __future__ import annotations

import numpy as np

from .curvature import check_curvature, make_operator
from .estimators.influence_function import InfluenceFunction
from .solvers import InverseHVPSolver, get_solver
from .utils import hash_arrays


class Influence:
    """The influence tools of one fitted model (module docstring)."""

    def __init__(self, model):
        model.require_fit()
        self.model = model
        self._closed_form = model.closed_form_curvature()  # shared by both operators (one column split)
        self._operators: dict = {}
        self._functions: dict = {}
        self._stores: dict = {}

    def function(self, solver="cg", solver_options: dict | None = None, curvature: str | None = None):
        """The shared, fitted :class:`InfluenceFunction` for this solver and curvature.

        A solver instance is used as it is (it holds its own precomputed values); a name with
        options shares one instance per configuration."""
        model = self.model
        curvature = check_curvature(model.curvature if curvature is None else curvature)
        operator = self.curvature_operator(curvature)
        if isinstance(solver, InverseHVPSolver):
            if solver_options:
                raise ValueError("pass options either to the solver instance or here, not both")
            return InfluenceFunction(solver, curvature=curvature).fit(model, operator=operator)
        solver_obj = get_solver(solver, **(solver_options or {}))
        key = hash_arrays(curvature, type(solver_obj).__qualname__, solver_obj.settings_key())
        infl = self._functions.get(key)
        if infl is None:
            # solvers of one kind on one operator share their store of precomputed values (every
            # entry is keyed by all it depends on), so e.g. eigenpairs serve every damping
            solver_obj.share_store(self._stores.setdefault((curvature, solver_obj.name), solver_obj.new_store()))
            infl = self._functions[key] = InfluenceFunction(solver_obj, curvature=curvature).fit(model,
                                                                                                operator=operator)
        return infl

    # ------------------------------------------------------------------ curvature
    def curvature_operator(self, curvature: str | None = None):
        """The shared :class:`~influence.curvature.CurvatureOperator` (None: the model's ``curvature``)."""
        curvature = check_curvature(self.model.curvature if curvature is None else curvature)
        op = self._operators.get(curvature)
        if op is None:
            op = self._operators[curvature] = make_operator(self.model, curvature, closed_form=self._closed_form)
        return op

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
        """The fitted :class:`~influence.estimators.InfluenceFunction` these methods use."""
        return self.function(solver, solver_options, curvature)

    def inverse_hvp(self, v, solver="cg", curvature: str | None = None, **solver_options):
        """Solve ``(H + damping I) x = v``; returns a :class:`~influence.solvers.SolveResult`.

        ``solver``: "exact", "cg", "lissa", "arnoldi", "kfac", "ekfac" (options as keywords,
        e.g. ``damping``, ``tol``, ``maxiter``, ``rank``: see each solver class) or an instance."""
        return self.function(solver, solver_options, curvature).inverse_hvp(v)

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
        return self.function(solver, solver_options, curvature).s_test(X_test, y_test, use_cache=use_cache)

    def gradient_dots(self, s, indices=None, include_regularizer: bool = True) -> np.ndarray:
        """``s . g(z_i)`` (float64) for the given training indices, via forward-mode JVPs; with
        ``s = s_test`` it is ``-I_up,loss(z_i, z_test)`` (``influence_*`` return ``+I_up,loss``)."""
        from .estimators.influence_function import gradient_dots

        return gradient_dots(self.model, s, indices, include_regularizer)

    def influence_scores(self, s, indices=None, include_regularizer: bool = True) -> np.ndarray:
        """Deprecated name of :meth:`gradient_dots` (warns)."""
        from .estimators.influence_function import influence_scores

        return influence_scores(self.model, s, indices, include_regularizer)

    def influence_up_loss(self, X_test, y_test, indices=None, solver="cg", include_regularizer: bool = True,
                          curvature: str | None = None, use_cache: bool = True, **solver_options) -> np.ndarray:
        """``I_up,loss(z_i, z_test) = -s_test . g(z_i)`` for training points ``indices`` (default all)."""
        return self.function(solver, solver_options, curvature).influence_up_loss(
            X_test, y_test, indices, include_regularizer, use_cache=use_cache)

    def influence_matrix(self, X_test, y_test, indices=None, solver="cg", include_regularizer: bool = True,
                         out=None, test_chunk: int | None = None, resume: bool = False,
                         curvature: str | None = None, **solver_options) -> np.ndarray:
        """``I_up,loss(z_i, z_test_k)``, shape (k, m); see :meth:`InfluenceFunction.influence_matrix`."""
        return self.function(solver, solver_options, curvature).influence_matrix(
            X_test, y_test, indices, include_regularizer=include_regularizer, out=out, test_chunk=test_chunk,
            resume=resume)

    def predicted_loss_diffs(self, X_test, y_test, indices=None, solver="cg", curvature: str | None = None,
                             use_cache: bool = True, **solver_options) -> np.ndarray:
        """Predicted change in test loss when each training point is removed: ``-I_up,loss / n``."""
        return self.function(solver, solver_options, curvature).predicted_loss_diffs(
            X_test, y_test, indices, use_cache=use_cache)

    def most_influential(self, X_test, y_test, k: int = 10, indices=None, solver="cg",
                         curvature: str | None = None, use_cache: bool = True, **solver_options):
        """The ``k`` most helpful and most harmful training points (an InfluenceRanking)."""
        if int(k) < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        return self.function(solver, solver_options, curvature).most_influential(
            X_test, y_test, k, indices, use_cache=use_cache)

    def influence_up_params(self, indices, solver="cg", include_regularizer: bool = True,
                            curvature: str | None = None, **solver_options) -> np.ndarray:
        """``I_up,params(z_i) = -H^-1 g(z_i)``, shape (m, p); one multi-RHS solve."""
        return self.function(solver, solver_options, curvature).influence_up_params(indices,
                                                                                          include_regularizer)

    def influence_pert_loss(self, X_test, y_test, indices, solver="cg", curvature: str | None = None,
                            use_cache: bool = True, **solver_options) -> np.ndarray:
        """``I_pert,loss(z_i, z_test) = d/dx_i I_up,loss(z_i, z_test)``, shape (m, *x_shape)."""
        return self.function(solver, solver_options, curvature).influence_pert_loss(
            X_test, y_test, indices, use_cache=use_cache)

    def score_input_gradients(self, s, indices) -> np.ndarray:
        """``-d/dx_i (s . grad L(z_i))`` for the given training indices."""
        from .estimators.influence_function import score_input_gradients

        return score_input_gradients(self.model, s, indices)

    def self_influence(self, indices=None, solver="exact", include_regularizer: bool = True,
                       curvature: str | None = None, **solver_options) -> np.ndarray:
        """``I_up,loss(z_i, z_i) = -g(z_i)^T H^-1 g(z_i)``; batched multi-RHS solves."""
        return self.function(solver, solver_options, curvature).self_influence(indices, include_regularizer)


class InfluenceMethods:
    """The convenience methods of the concrete models, each a one-line wrapper over the model's
    :class:`Influence` (``model.influence_tools``), which is made anew whenever the model
    receives training data."""

    def _set_training_data(self, X, y):
        out = super()._set_training_data(X, y)
        self._influence_tools = Influence(self)
        return out

    def _after_copy(self):
        super()._after_copy()
        if self.__dict__.get("_influence_tools") is not None:
            self._influence_tools = Influence(self)  # a copy's caches are its own

    @property
    def influence_tools(self) -> Influence:
        """This model's :class:`Influence`: its shared operators, influence objects and caches."""
        self.require_fit()
        return self._influence_tools

    def curvature_operator(self, curvature: str | None = None):
        """The shared :class:`~influence.curvature.CurvatureOperator` (None: the model's ``curvature``). (:meth:`Influence.curvature_operator`)."""
        return self.influence_tools.curvature_operator(curvature=curvature)

    def hvp(self, v, indices=None, curvature: str | None = None) -> np.ndarray:
        """``H v`` (or ``H V`` for a (p, k) matrix), H the Hessian of the objective; ``G v`` with (:meth:`Influence.hvp`)."""
        return self.influence_tools.hvp(v, indices=indices, curvature=curvature)

    def hessian(self, curvature: str | None = None) -> np.ndarray:
        """Explicit (p, p) Hessian of the objective (``G`` with curvature "gauss-newton"); cached. (:meth:`Influence.hessian`)."""
        return self.influence_tools.hessian(curvature=curvature)

    def hessian_eigenvalue_bounds(self, tol: float = 1e-4, maxiter: int | None = None,
                                  curvature: str | None = None) -> tuple[float, float]:
        """(smallest, largest) eigenvalue by Lanczos on HVPs (cached: ``damping="auto"`` reuses them). (:meth:`Influence.hessian_eigenvalue_bounds`)."""
        return self.influence_tools.hessian_eigenvalue_bounds(tol=tol, maxiter=maxiter, curvature=curvature)

    def per_example_curvature(self, refine: int = 8, curvature: str | None = None) -> np.ndarray:
        """Largest eigenvalue of each training point's loss curvature (see the operator's method). (:meth:`Influence.per_example_curvature`)."""
        return self.influence_tools.per_example_curvature(refine=refine, curvature=curvature)

    def influence(self, solver="cg", curvature: str | None = None, **solver_options):
        """The fitted :class:`~influence.estimators.InfluenceFunction` these shortcuts use. (:meth:`Influence.influence`)."""
        return self.influence_tools.influence(solver=solver, curvature=curvature, **solver_options)

    def inverse_hvp(self, v, solver="cg", curvature: str | None = None, **solver_options):
        """Solve ``(H + damping I) x = v``; returns a :class:`~influence.solvers.SolveResult`. (:meth:`Influence.inverse_hvp`)."""
        return self.influence_tools.inverse_hvp(v, solver=solver, curvature=curvature, **solver_options)

    def s_test(self, X_test, y_test, solver="cg", use_cache: bool = True, curvature: str | None = None,
               **solver_options):
        """``s_test = C^-1 grad L(z_test)`` (``C``: H, or G with ``curvature="gauss-newton"``) and the (:meth:`Influence.s_test`)."""
        return self.influence_tools.s_test(X_test, y_test, solver=solver, use_cache=use_cache, curvature=curvature, **solver_options)

    def gradient_dots(self, s, indices=None, include_regularizer: bool = True) -> np.ndarray:
        """``s . g(z_i)`` (float64) for the given training indices, via forward-mode JVPs; with (:meth:`Influence.gradient_dots`)."""
        return self.influence_tools.gradient_dots(s, indices=indices, include_regularizer=include_regularizer)

    def influence_scores(self, s, indices=None, include_regularizer: bool = True) -> np.ndarray:
        """Deprecated name of :meth:`gradient_dots` (warns). (:meth:`Influence.influence_scores`)."""
        return self.influence_tools.influence_scores(s, indices=indices, include_regularizer=include_regularizer)

    def influence_up_loss(self, X_test, y_test, indices=None, solver="cg", include_regularizer: bool = True,
                          curvature: str | None = None, use_cache: bool = True, **solver_options) -> np.ndarray:
        """``I_up,loss(z_i, z_test) = -s_test . g(z_i)`` for training points ``indices`` (default all). (:meth:`Influence.influence_up_loss`)."""
        return self.influence_tools.influence_up_loss(X_test, y_test, indices=indices, solver=solver, include_regularizer=include_regularizer, curvature=curvature, use_cache=use_cache, **solver_options)

    def influence_matrix(self, X_test, y_test, indices=None, solver="cg", include_regularizer: bool = True,
                         out=None, test_chunk: int | None = None, resume: bool = False,
                         curvature: str | None = None, **solver_options) -> np.ndarray:
        """``I_up,loss(z_i, z_test_k)``, shape (k, m); see :meth:`InfluenceFunction.influence_matrix`. (:meth:`Influence.influence_matrix`)."""
        return self.influence_tools.influence_matrix(X_test, y_test, indices=indices, solver=solver, include_regularizer=include_regularizer, out=out, test_chunk=test_chunk, resume=resume, curvature=curvature, **solver_options)

    def predicted_loss_diffs(self, X_test, y_test, indices=None, solver="cg", curvature: str | None = None,
                             use_cache: bool = True, **solver_options) -> np.ndarray:
        """Predicted change in test loss when each training point is removed: ``-I_up,loss / n``. (:meth:`Influence.predicted_loss_diffs`)."""
        return self.influence_tools.predicted_loss_diffs(X_test, y_test, indices=indices, solver=solver, curvature=curvature, use_cache=use_cache, **solver_options)

    def most_influential(self, X_test, y_test, k: int = 10, indices=None, solver="cg",
                         curvature: str | None = None, use_cache: bool = True, **solver_options):
        """The ``k`` most helpful and most harmful training points (an InfluenceRanking). (:meth:`Influence.most_influential`)."""
        return self.influence_tools.most_influential(X_test, y_test, k=k, indices=indices, solver=solver, curvature=curvature, use_cache=use_cache, **solver_options)

    def influence_up_params(self, indices, solver="cg", include_regularizer: bool = True,
                            curvature: str | None = None, **solver_options) -> np.ndarray:
        """``I_up,params(z_i) = -H^-1 g(z_i)``, shape (m, p); one multi-RHS solve. (:meth:`Influence.influence_up_params`)."""
        return self.influence_tools.influence_up_params(indices, solver=solver, include_regularizer=include_regularizer, curvature=curvature, **solver_options)

    def influence_pert_loss(self, X_test, y_test, indices, solver="cg", curvature: str | None = None,
                            use_cache: bool = True, **solver_options) -> np.ndarray:
        """``I_pert,loss(z_i, z_test) = d/dx_i I_up,loss(z_i, z_test)``, shape (m, *x_shape). (:meth:`Influence.influence_pert_loss`)."""
        return self.influence_tools.influence_pert_loss(X_test, y_test, indices, solver=solver, curvature=curvature, use_cache=use_cache, **solver_options)

    def score_input_gradients(self, s, indices) -> np.ndarray:
        """``-d/dx_i (s . grad L(z_i))`` for the given training indices. (:meth:`Influence.score_input_gradients`)."""
        return self.influence_tools.score_input_gradients(s, indices)

    def self_influence(self, indices=None, solver="exact", include_regularizer: bool = True,
                       curvature: str | None = None, **solver_options) -> np.ndarray:
        """``I_up,loss(z_i, z_i) = -g(z_i)^T H^-1 g(z_i)``; batched multi-RHS solves. (:meth:`Influence.self_influence`)."""
        return self.influence_tools.self_influence(indices=indices, solver=solver, include_regularizer=include_regularizer, curvature=curvature, **solver_options)


for _name in [n for n, v in vars(InfluenceMethods).items() if callable(v) and not n.startswith("_")]:
    getattr(InfluenceMethods, _name).__doc__ = getattr(Influence, _name).__doc__  # the full docs on the model
del _name

"""Influence quantities of a fitted model (Koh & Liang 2017, Sec. 2), as one object.

``InfluenceFunction(solver, curvature).fit(model)`` pairs a model (gradients), a curvature
operator (``H`` or ``G``) and an inverse-HVP solver fitted on it; it holds the solver's
precomputed values and the s_test cache, and never modifies the model. For a training
point ``z`` and test point(s) ``z_test`` (several test points: their mean loss)::

    I_up,params(z)       = -H^-1 g(z)
    I_up,loss(z, z_test) = -grad L(z_test)^T H^-1 g(z) = -s_test . g(z)
                           (influence_matrix: each of many test points, one multi-column solve)
    predicted change in test loss when z is removed  = -I_up,loss(z, z_test) / n
    I_pert,loss(z, z_test) = d/dx I_up,loss(z, z_test)        (x = the input of z)
    self-influence       = I_up,loss(z, z)

with ``s_test = H^-1 grad L(z_test)`` (test loss without the regulariser) and the
training gradient ``g(z) = grad [L(z, theta) + (wd/2)||theta_decay||^2]``. Including the
regulariser in ``g`` makes "remove z" exactly "up-weight z's share of the objective by
-1/n", which is what retraining on n-1 points with the objective normalised by n-1
does (the original code's convention). Pass ``include_regularizer=False`` to use the
bare loss gradient. Positive ``I_up,loss`` = harmful (up-weighting raises the test
loss); positive predicted change on removal = helpful.

The same object is the ``"influence"`` estimator of the leaderboard
(:mod:`influence.estimators`): ``influence_matrix(X_test, y_test)`` returns ``I_up,loss``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from .. import result_store
from ..curvature import as_operator, check_curvature
from ..solvers import InverseHVPSolver, SolveResult, get_solver
from ..utils import hash_arrays, progress, progress_on
from .base import Estimator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InfluenceRanking:
    """Training points ranked by their predicted effect on a test loss when removed.

    ``helpful``: indices, most helpful first (removal raises the test loss by
    ``helpful_change`` > 0); ``harmful``: most harmful first (removal lowers it:
    ``harmful_change`` < 0). See :meth:`InfluenceFunction.most_influential`.
    """

    helpful: np.ndarray
    helpful_change: np.ndarray
    harmful: np.ndarray
    harmful_change: np.ndarray


def _writable(folder: Path, known: set) -> bool:
    """Whether files can be written into ``folder`` (created if absent); remembered in ``known``
    (the influence object's own set) once true."""
    if folder in known:
        return True
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    known.add(folder)
    return True


# ---------------------------------------------------------------------- gradient-side helpers (no solve)
def gradient_dots(model, s: np.ndarray, indices=None, include_regularizer: bool = True) -> np.ndarray:
    """``s . g(z_i)`` (float64) for the given training indices, via forward-mode JVPs (no n x p
    matrix). With ``s = s_test`` this is ``-I_up,loss(z_i, z_test)``; named by what it returns,
    since every ``influence_*`` function returns ``I_up,loss`` itself."""
    model.require_fit()
    idx = model.check_indices(indices)
    s = np.asarray(s, dtype=model.dtype).reshape(-1)
    if s.shape != (model.n_params,):
        raise ValueError(f"s must have {model.n_params} entries")
    out = model.map_train(model.kernels.jvp_losses, model.theta_tensor(), tf.constant(s), reduce="concat",
                           indices=None if indices is None else idx, desc="scores")
    out = np.asarray(out, dtype=np.float64)
    if include_regularizer:
        out = out + model.weight_decay * float(np.dot(model.decay_mask_ * model.theta_, s))
    return out


def influence_scores(model, s, indices=None, include_regularizer: bool = True) -> np.ndarray:
    """Deprecated name of :func:`gradient_dots` (``s . g(z_i)``, i.e. ``-I_up,loss`` for ``s = s_test``)."""
    import warnings

    warnings.warn("influence_scores(s) is renamed gradient_dots(s): it returns s . g(z_i), which is -I_up,loss for "
                  "s = s_test (every influence_* function returns +I_up,loss)", DeprecationWarning, stacklevel=2)
    return gradient_dots(model, s, indices, include_regularizer)


def score_input_gradients(model, s, indices) -> np.ndarray:
    """``-d/dx_i (s . grad L(z_i))`` for the given training indices."""
    idx = model.check_indices(indices)
    st = tf.constant(np.asarray(s, dtype=model.dtype))
    return -np.asarray(model.map_train(model.kernels.input_grad_of_score, model.theta_tensor(), st, reduce="concat",
                                        indices=idx), dtype=np.float64)


class InfluenceFunction(Estimator):
    """Influence functions of one model by one solver on one curvature (module docstring).

    Parameters
    ----------
    solver : InverseHVPSolver or str
        The inverse-HVP solver, e.g. ``CGSolver(damping=0.01, tol=1e-8)``; a name
        (``"cg"``, ``"exact"``, ...) with its options as keywords is the command line's way.
    curvature : {"hessian", "gauss-newton"} or None
        The matrix the solver inverts (None: the model's ``curvature``).
    cache_dir : str or None
        Where ``s_test`` vectors are cached on disk (None: the model's ``cache_dir``).

    Fitted attributes: ``model_``, ``operator_`` (the curvature operator), ``solver_``.
    """

    name = "influence"

    def __init__(self, solver: InverseHVPSolver | str = "cg", curvature: str | None = None,
                 cache_dir: str | None = None, **solver_options):
        self.solver = solver if isinstance(solver, InverseHVPSolver) else str(solver)
        self.solver_options = dict(solver_options)
        self.curvature = None if curvature is None else check_curvature(curvature)
        self.cache_dir = cache_dir
        self._solver = get_solver(solver, **solver_options)  # validated now, before any work
        self._writable_dirs: set = set()  # cache folders found writable
        super().__init__()

    # ------------------------------------------------------------------ fitting
    def fit(self, model, operator=None) -> "InfluenceFunction":
        """Bind to a fitted model: its curvature operator (``operator``, or the model's own
        shared one, :func:`~influence.curvature.as_operator`), and the solver fitted on it."""
        super().fit(model)
        if operator is not None and operator.model is not model:
            raise ValueError("InfluenceFunction.fit: operator= belongs to another model than the one given")
        self.operator_ = as_operator(model if operator is None else operator, self.curvature)
        self.solver_ = self._solver.fit(self.operator_)
        return self

    def config(self) -> dict:
        return {"estimator": self.name, "solver": self._solver.config(), "curvature": self.curvature}

    # ------------------------------------------------------------------ solves
    def inverse_hvp(self, v) -> SolveResult:
        """Solve ``(C + damping I) x = v``."""
        return self.solver_.solve(np.asarray(v, dtype=self.model_.dtype))

    @property
    def converged_(self) -> bool:
        """Whether every solve of the last ``influence_matrix`` call converged (``solve_results_``)."""
        results = getattr(self, "solve_results_", None)
        if results is None:
            raise AttributeError("converged_: call influence_matrix first")
        return all(r.converged and not r.info.get("negative_curvature") for r in results)

    def _cache_path(self, key):
        cache_dir = self.cache_dir if self.cache_dir is not None else self.model_.cache_dir
        return None if cache_dir is None else Path(cache_dir) / f"s_test-{key}.npz"

    def s_test(self, X_test, y_test, use_cache: bool = True) -> SolveResult:
        """``s_test = C^-1 grad L(z_test)`` and the solve's diagnostics.

        Cached on disk under ``cache_dir`` (when set), keyed by a hash of the model
        configuration, theta, the training data, the test points, the curvature and the
        solver settings.
        """
        model = self.model_
        v = model.test_gradient(X_test, y_test)
        path = None
        if use_cache and self._cache_path("x") is not None:
            key = hash_arrays(model.cache_identity(), model.theta_, model.data_fingerprint_, np.asarray(X_test),
                              np.asarray(y_test), self.solver_.config(), self.operator_.kind)
            path = self._cache_path(key)
            cached = result_store.load_solve(path, key)
            if cached is not None:
                logger.info("s_test loaded from cache %s", key[:12])
                return cached
        if path is not None and not _writable(path.parent, self._writable_dirs):  # found before the solve, not after it
            logger.warning("s_test not cached: cache_dir %s cannot be written to", path.parent)
            path = None
        result = self.inverse_hvp(v)
        if path is not None:
            try:
                result_store.save_solve(path, key, result)
            except OSError as exc:  # a finished solve is never thrown away for want of a cache
                logger.warning("s_test not cached: cannot write %s (%s)", path, exc)
        return result

    # ------------------------------------------------------------------ quantities
    def gradient_dots(self, s, indices=None, include_regularizer: bool = True) -> np.ndarray:
        """``s . g(z_i)`` for training points ``indices`` (default all): ``-I_up,loss`` for ``s = s_test``."""
        return gradient_dots(self.model_, s, indices, include_regularizer)

    def influence_scores(self, s, indices=None, include_regularizer: bool = True) -> np.ndarray:
        """Deprecated name of :meth:`gradient_dots`."""
        return influence_scores(self.model_, s, indices, include_regularizer)

    def influence_up_loss(self, X_test, y_test, indices=None, include_regularizer: bool = True,
                          use_cache: bool = True) -> np.ndarray:
        """``I_up,loss(z_i, z_test) = -s_test . g(z_i)`` for training points ``indices`` (default all)."""
        s = self.s_test(X_test, y_test, use_cache=use_cache).x
        return -self.gradient_dots(s, indices, include_regularizer)

    def predicted_loss_diffs(self, X_test, y_test, indices=None, use_cache: bool = True) -> np.ndarray:
        """Predicted change in test loss when each training point is removed: ``-I_up,loss / n``."""
        return -self.influence_up_loss(X_test, y_test, indices, use_cache=use_cache) / self.model_.n_train_

    def most_influential(self, X_test, y_test, k: int = 10, indices=None, use_cache: bool = True) -> InfluenceRanking:
        """The ``k`` most helpful and ``k`` most harmful training points for the test loss.

        Ranked by the predicted change in test loss on removal, ``-I_up,loss / n``:
        removing a *helpful* point raises the test loss (positive change), removing a
        *harmful* one lowers it (negative change). Points whose change has the other sign
        are never listed, so either list may be shorter than ``k``.
        """
        if int(k) < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        idx = self.model_.check_indices(indices)
        change = self.predicted_loss_diffs(X_test, y_test, idx, use_cache=use_cache)
        up, down = np.argsort(-change, kind="stable"), np.argsort(change, kind="stable")
        up, down = up[change[up] > 0][:k], down[change[down] < 0][:k]
        return InfluenceRanking(helpful=idx[up], helpful_change=change[up], harmful=idx[down],
                                harmful_change=change[down])

    def influence_up_params(self, indices, include_regularizer: bool = True) -> np.ndarray:
        """``I_up,params(z_i) = -C^-1 g(z_i)``, shape (m, p); one multi-RHS solve."""
        G = self.model_.per_example_gradients(indices, include_regularizer)
        return -self.inverse_hvp(G.T).x.T

    def influence_pert_loss(self, X_test, y_test, indices, use_cache: bool = True) -> np.ndarray:
        """``I_pert,loss(z_i, z_test) = d/dx_i I_up,loss(z_i, z_test)``, shape (m, *x_shape).

        The regulariser part of ``g`` does not depend on x, so it drops out. Refused before any
        solve where the inputs are not differentiable (integer tokens).
        """
        self.model_.check_differentiable_inputs()
        s = self.s_test(X_test, y_test, use_cache=use_cache).x
        return score_input_gradients(self.model_, s, indices)

    def self_influence(self, indices=None, include_regularizer: bool = True) -> np.ndarray:
        """``I_up,loss(z_i, z_i) = -g(z_i)^T C^-1 g(z_i)``; batched multi-RHS solves."""
        model = self.model_
        idx = model.check_indices(indices)
        out = np.empty(len(idx))
        chunk = max(1, min(len(idx), model.rows_per_chunk(), 1024))
        for j in range(0, len(idx), chunk):
            G = model.per_example_gradients(idx[j:j + chunk], include_regularizer)
            X = self.inverse_hvp(G.T).x
            out[j:j + chunk] = -np.einsum("pm,mp->m", X, G)
        return out

    def _self_scores(self) -> np.ndarray:
        """Self-influence of every training point (the closed form where the model has one and
        it is the same quantity: exact solve of H without damping), with the bare loss gradients."""
        closed = getattr(self.model_, "self_influence_closed_form", None)
        if closed is not None and self._solver.name == "exact" and self._solver.damping == 0 \
                and self.operator_.kind == "hessian":
            return closed()
        return self.self_influence(include_regularizer=False)

    def _influence_matrix(self, X_test, y_test, indices=None, include_regularizer: bool = True, out=None,
                              test_chunk: int | None = None, resume: bool = False) -> np.ndarray:
        """``I_up,loss(z_i, z_test_k)`` for every test point ``k`` and training point ``i``: shape (k, m).

        Each test point separately (not their mean, as :meth:`influence_up_loss` takes):
        one multi-right-hand-side solve ``S = (C + damping I)^-1 [grad L(z_test_1) ...
        grad L(z_test_k)]`` (p, k), then ``I = -(G S)^T`` with the training gradients ``G``
        formed in chunks of rows, so memory stays at O(chunk * p + k * m).
        Divide by ``-n`` for the predicted change in each test loss on removal.

        For matrices larger than memory: ``out`` (a path ending in ``.npy``) writes the
        matrix there, chunk by chunk, and returns it opened read-only as a memory map
        (``np.load(out, mmap_mode="r")`` reads it later); the file appears only when
        complete. ``test_chunk`` solves that many test points at a time (default: all at
        once), so memory is O(p * test_chunk + chunk * p) besides the output.

        ``resume=True`` (with ``out``) makes a long run restartable: the rows are written
        to ``<out>.partial.npy`` with a checkpoint ``<out>.partial.json`` after each test
        chunk, and a later call with the same model, data, test points, indices, solver
        settings and ``test_chunk`` computes only the chunks still missing. Both files
        are kept if the run fails, and replaced by ``out`` when it completes.

        Afterwards ``solve_results_`` lists this call's solves (one :class:`SolveResult` per test
        chunk, ``x`` dropped; ``info["tests"]`` = its test rows): whether each converged, its
        relative residual and iterations. With ``on_failure='warn'`` a failed solve is kept, and
        ``converged_`` (all of them converged) is the flag to check.
        """
        model = self.model_
        X_test, y_test = model.as_batch(X_test, y_test)
        k = len(X_test)
        if k == 0:
            raise ValueError("no test points given")
        if test_chunk is not None and int(test_chunk) < 1:
            raise ValueError(f"test_chunk must be an integer >= 1 or None, got {test_chunk!r}")
        tc = k if test_chunk is None else int(test_chunk)
        idx = model.check_indices(indices)
        if out is not None and Path(out).suffix != ".npy":
            raise ValueError(f"out must be a path ending in .npy, got {out!r}")
        if resume and out is None:
            raise ValueError("resume=True needs out=<path>.npy to write to")
        key = None
        if resume:
            key = hash_arrays(model.cache_identity(), model.theta_, model.data_fingerprint_, X_test, y_test, idx,
                              include_regularizer, self.solver_.config(), self.operator_.kind, tc)
        chunk = max(1, min(len(idx), model.rows_per_chunk()))

        self.solve_results_ = []  # this call's solves (x dropped): converged, residual, iterations per test chunk

        def fill(result, done, chunk_done):
            for t in range(0, k, tc):
                if t in done:
                    continue
                V = model.test_gradients(X_test[t:t + tc], y_test[t:t + tc])
                res = self.inverse_hvp(V.T)
                logger.info("influence_matrix: %s solve for %d test points, %d iterations, relative residual %.2g",
                            res.solver, len(V), res.iterations, res.residual)
                self.solve_results_.append(dataclasses.replace(res, x=None, info={**res.info, "tests": [t, t + len(V)]}))
                for j in progress(range(0, len(idx), chunk), total=-(-len(idx) // chunk), desc="influence_matrix",
                                  enabled=progress_on(model.progress) and isinstance(result, np.memmap)):
                    G = model.per_example_gradients(idx[j:j + chunk], include_regularizer)
                    result[t:t + tc, j:j + chunk] = -(G @ res.x).T
                if chunk_done is not None:
                    chunk_done(t, min(t + tc, k))

        return result_store.fill_matrix((k, len(idx)), fill, out, key)

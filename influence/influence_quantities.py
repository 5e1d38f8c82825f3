"""Influence quantities of a fitted model (Koh & Liang 2017, Sec. 2).

For a training point ``z`` and test
point(s) ``z_test`` (several test points: their mean loss)::

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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import result_store
from .utils import hash_arrays, progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InfluenceRanking:
    """Training points ranked by their predicted effect on a test loss when removed.

    ``helpful``: indices, most helpful first (removal raises the test loss by
    ``helpful_change`` > 0); ``harmful``: most harmful first (removal lowers it:
    ``harmful_change`` < 0). See :meth:`GenericNeuralNet.most_influential`.
    """

    helpful: np.ndarray
    helpful_change: np.ndarray
    harmful: np.ndarray
    harmful_change: np.ndarray


class InfluenceMixin:
    """``s_test``, ``influence_matrix``, ``most_influential`` ... for :class:`GenericNeuralNet`."""

    def test_gradient(self, X_test, y_test) -> np.ndarray:
        """``grad L(z_test)``: gradient of the mean test loss, without the regulariser."""
        return self.loss_gradient(*self.as_batch(X_test, y_test))

    def test_gradients(self, X_test, y_test) -> np.ndarray:
        """``grad L(z_test_k)`` for each test point separately, shape (k, p); vectorised."""
        self._require_fit()
        X_test, y_test = self._check_xy(X_test, y_test, "X_test")
        th = self._theta_tf()
        if len(X_test) == 0:
            return np.zeros((0, self.n_params))
        bs = min(self.batch_size, self._rows_per_chunk())
        kernel = self._tf_per_example_grads
        return np.concatenate([kernel(th, tf.constant(X_test[sl]), tf.constant(y_test[sl])).numpy()
                               for sl in self._slices(len(X_test), bs)])

    def _get_solver(self, solver, solver_options):
        from .solvers import get_solver
        return get_solver(solver, **(solver_options or {}))

    def inverse_hvp(self, v, solver="cg", **solver_options):
        """Solve ``(H + damping I) x = v``; returns a :class:`~influence.solvers.SolveResult`."""
        self._require_fit()
        return self._get_solver(solver, solver_options).solve(self, np.asarray(v, dtype=self.dtype))

    def s_test(self, X_test, y_test, solver="cg", use_cache: bool = True, **solver_options):
        """``s_test = H^-1 grad L(z_test)`` and the solve's diagnostics.

        Cached on disk under ``cache_dir`` (when set), keyed by a hash of the model
        configuration, theta, the training data, the test points and the solver settings.
        """
        self._require_fit()
        solver_obj = self._get_solver(solver, solver_options)
        v = self.test_gradient(X_test, y_test)
        key = None
        if self.cache_dir is not None and use_cache:
            key = hash_arrays(self._cache_identity(), self.theta_, self.data_fingerprint_, np.asarray(X_test),
                              np.asarray(y_test), solver_obj.config())
            cached = result_store.load_solve(Path(self.cache_dir) / f"s_test-{key}.npz", key)
            if cached is not None:
                logger.info("s_test loaded from cache %s", key[:12])
                return cached
        result = solver_obj.solve(self, v)
        if key is not None:
            result_store.save_solve(Path(self.cache_dir) / f"s_test-{key}.npz", key, result)
        return result

    def influence_scores(self, s: np.ndarray, indices=None, include_regularizer: bool = True) -> np.ndarray:
        """``s . g(z_i)`` for the given training indices, via forward-mode JVPs (no n x p matrix)."""
        self._require_fit()
        idx = self._check_indices(indices)
        s = np.asarray(s, dtype=self.dtype).reshape(-1)
        if s.shape != (self.n_params,):
            raise ValueError(f"s must have {self.n_params} entries")
        out = self._map_train(self._tf_jvp_losses, self._theta_tf(), tf.constant(s), reduce="concat",
                              indices=None if indices is None else idx, desc="scores")
        if include_regularizer:
            out = out + self.weight_decay * float(np.dot(self.decay_mask_ * self.theta_, s))
        return out

    def influence_up_loss(self, X_test, y_test, indices=None, solver="cg",
                          include_regularizer: bool = True, **solver_options) -> np.ndarray:
        """``I_up,loss(z_i, z_test) = -s_test . g(z_i)`` for training points ``indices`` (default all)."""
        s = self.s_test(X_test, y_test, solver=solver, **solver_options).x
        return -self.influence_scores(s, indices, include_regularizer)

    def influence_matrix(self, X_test, y_test, indices=None, solver="cg", include_regularizer: bool = True,
                         out=None, test_chunk: int | None = None, resume: bool = False,
                         **solver_options) -> np.ndarray:
        """``I_up,loss(z_i, z_test_k)`` for every test point ``k`` and training point ``i``: shape (k, m).

        Each test point separately (not their mean, as :meth:`influence_up_loss` takes):
        one multi-right-hand-side solve ``S = (H + damping I)^-1 [grad L(z_test_1) ...
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
        """
        self._require_fit()
        X_test, y_test = self.as_batch(X_test, y_test)
        k = len(X_test)
        if k == 0:
            raise ValueError("no test points given")
        if test_chunk is not None and int(test_chunk) < 1:
            raise ValueError("test_chunk must be >= 1")
        tc = k if test_chunk is None else int(test_chunk)
        idx = self._check_indices(indices)
        if out is not None and Path(out).suffix != ".npy":
            raise ValueError(f"out must be a path ending in .npy, got {out!r}")
        if resume and out is None:
            raise ValueError("resume=True needs out=<path>.npy to write to")
        key = None
        if resume:
            key = hash_arrays(self._cache_identity(), self.theta_, self.data_fingerprint_, X_test, y_test, idx,
                              include_regularizer, self._get_solver(solver, solver_options).config(), tc)

        def fill(result, done, chunk_done):
            self._fill_influence_matrix(result, X_test, y_test, idx, tc, done, include_regularizer, solver,
                                        solver_options, chunk_done)

        return result_store.fill_matrix((k, len(idx)), fill, out, key)

    def _fill_influence_matrix(self, result, X_test, y_test, idx, tc, done, include_regularizer, solver,
                               solver_options, chunk_done=None):
        """Rows of the influence matrix, one multi-column solve per chunk of ``tc`` test
        points not in ``done`` (their start rows); ``chunk_done(start)`` after each chunk."""
        chunk = max(1, min(len(idx), self._rows_per_chunk()))
        for t in range(0, len(X_test), tc):
            if t in done:
                continue
            V = self.test_gradients(X_test[t:t + tc], y_test[t:t + tc])
            res = self.inverse_hvp(V.T, solver, **solver_options)
            logger.info("influence_matrix: %s solve for %d test points, %d iterations, relative residual %.2g",
                        res.solver, len(V), res.iterations, res.residual)
            S = res.x
            for j in progress(range(0, len(idx), chunk), total=-(-len(idx) // chunk), desc="influence_matrix",
                              enabled=self.progress and isinstance(result, np.memmap)):
                G = self.per_example_gradients(idx[j:j + chunk], include_regularizer)
                result[t:t + tc, j:j + chunk] = -(G @ S).T
            if chunk_done is not None:
                chunk_done(t)
        return result

    def predicted_loss_diffs(self, X_test, y_test, indices=None, solver="cg", **solver_options) -> np.ndarray:
        """Predicted change in test loss when each training point is removed: ``-I_up,loss / n``."""
        return -self.influence_up_loss(X_test, y_test, indices, solver, **solver_options) / self.n_train_

    def most_influential(self, X_test, y_test, k: int = 10, indices=None, solver="cg",
                         **solver_options) -> "InfluenceRanking":
        """The ``k`` most helpful and ``k`` most harmful training points for the test loss.

        Ranked by the predicted change in test loss on removal, ``-I_up,loss / n``:
        removing a *helpful* point raises the test loss (positive change), removing a
        *harmful* one lowers it (negative change). Points whose change has the other sign
        are never listed, so either list may be shorter than ``k``.
        """
        if int(k) < 1:
            raise ValueError("k must be >= 1")
        idx = self._check_indices(indices)
        change = self.predicted_loss_diffs(X_test, y_test, idx, solver, **solver_options)
        up, down = np.argsort(-change, kind="stable"), np.argsort(change, kind="stable")
        up, down = up[change[up] > 0][:k], down[change[down] < 0][:k]
        return InfluenceRanking(helpful=idx[up], helpful_change=change[up], harmful=idx[down],
                                harmful_change=change[down])

    def influence_up_params(self, indices, solver="cg", include_regularizer: bool = True,
                            **solver_options) -> np.ndarray:
        """``I_up,params(z_i) = -H^-1 g(z_i)``, shape (m, p); one multi-RHS solve."""
        G = self.per_example_gradients(indices, include_regularizer)
        return -self.inverse_hvp(G.T, solver, **solver_options).x.T

    def influence_pert_loss(self, X_test, y_test, indices, solver="cg", **solver_options) -> np.ndarray:
        """``I_pert,loss(z_i, z_test) = d/dx_i I_up,loss(z_i, z_test)``, shape (m, *x_shape).

        The regulariser part of ``g`` does not depend on x, so it drops out.
        """
        s = self.s_test(X_test, y_test, solver=solver, **solver_options).x
        return self.score_input_gradients(s, indices)

    def score_input_gradients(self, s, indices) -> np.ndarray:
        """``-d/dx_i (s . grad L(z_i))`` for the given training indices."""
        idx = self._check_indices(indices)
        st = tf.constant(np.asarray(s, dtype=self.dtype))
        return -self._map_train(self._tf_input_grad_of_score, self._theta_tf(), st, reduce="concat", indices=idx)

    def self_influence(self, indices=None, solver="exact", include_regularizer: bool = True,
                       **solver_options) -> np.ndarray:
        """``I_up,loss(z_i, z_i) = -g(z_i)^T H^-1 g(z_i)``; batched multi-RHS solves."""
        idx = self._check_indices(indices)
        out = np.empty(len(idx))
        chunk = max(1, min(len(idx), self._rows_per_chunk(), 1024))
        solver_obj = self._get_solver(solver, solver_options)
        for j in range(0, len(idx), chunk):
            G = self.per_example_gradients(idx[j:j + chunk], include_regularizer)
            X = solver_obj.solve(self, G.T).x
            out[j:j + chunk] = -np.einsum("pm,mp->m", X, G)
        return out

"""Leave-one-out (LOO) validation: retrain without each point, compare with influence.

For each chosen training index ``i``: re-fit without ``z_i`` (warm start from the
fitted theta, the objective normalised over ``n - 1``: :meth:`retrain_without`), and
measure the actual change in test loss ``L_test(theta_-i) - L_test(theta)``. Compare with
the predicted change ``-I_up,loss(z_i, z_test) / n``.

Retrains run in parallel through any :class:`concurrent.futures.Executor`: the default
is a local process pool (:func:`~influence.parallel.local_pool`, safe to call from a
script's top level); a Dask cluster works the same way::

    from dask.distributed import Client
    result = leave_one_out(model, x_test, y_test, idx, predicted, executor=Client().get_executor())

With the default local pool the model (with its training data) is shipped once per
worker process and each point is a task; with another executor it is shipped once per
chunk of points.

Group removal: :func:`retrain_test_losses` re-fits without whole groups of points, and
:func:`linear_datamodeling_score` uses it to score how influence adds up over random
subsets (the LDS).
"""
from __future__ import annotations

import logging
import os
import pickle
import time
from concurrent.futures import BrokenExecutor, Executor
from dataclasses import dataclass, field

import numpy as np
import scipy.stats

from .parallel import dumps, limit_threads, local_pool
from .result_store import Journal
from .utils import hash_arrays, progress_on

logger = logging.getLogger(__name__)


@dataclass
class LOOResult:
    """Actual vs predicted change in test loss for each removed training point."""

    indices: np.ndarray
    actual: np.ndarray
    predicted: np.ndarray | None
    base_loss: float
    wall_time_s: float
    info: dict = field(default_factory=dict)

    @property
    def pearson(self) -> float:
        return float(scipy.stats.pearsonr(self.actual, self.predicted)[0])

    @property
    def spearman(self) -> float:
        return float(scipy.stats.spearmanr(self.actual, self.predicted)[0])


def _retrain_chunk(model_bytes: bytes, groups, X_test, y_test, threads):
    """Worker: rebuild the model, retrain without each group, return the new test losses."""
    limit_threads(threads)
    model = pickle.loads(model_bytes)
    return _retrain_serial(model, groups, X_test, y_test)


_WORKER_MODEL = None


def _init_worker(model_bytes: bytes, threads):
    """Process-pool initializer: unpickle the model once per worker."""
    global _WORKER_MODEL
    limit_threads(threads)
    _WORKER_MODEL = pickle.loads(model_bytes)


def _retrain_in_worker(groups, X_test, y_test):
    return _retrain_serial(_WORKER_MODEL, groups, X_test, y_test)


def _retrain_serial(model, groups, X_test, y_test, done=None):
    """Per-test-point losses (len(groups), n_test) after re-fitting without each group
    (``done(j, losses)`` is called after each re-fit, e.g. to record it)."""
    losses = np.empty((len(groups), len(X_test)))
    for j, group in enumerate(groups):
        losses[j] = model.losses(X_test, y_test, model.retrain_without(group))
        if done is not None:
            done(j, losses[j])
    return losses


def _collect(futures, chunks, total, progress, done=None) -> np.ndarray:
    """Results in submission order, with a progress bar over points; ``done(j, losses)``
    for each group as its chunk arrives."""
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="LOO retrains", leave=False, disable=not progress)
    except ImportError:  # pragma: no cover
        bar = None
    parts, j = [], 0
    for fut, c in zip(futures, chunks):
        parts.append(fut.result())
        for row in parts[-1]:
            if done is not None:
                done(j, row)
            j += 1
        if bar is not None:
            bar.update(len(c))
    if bar is not None:
        bar.close()
    return np.concatenate(parts)


def _retrain_in_local_pool(model, groups, X_test, y_test, n_jobs, threads, done=None) -> np.ndarray:
    """Retrain in :func:`~influence.parallel.local_pool` workers (the model travels once per
    worker; one task per group, i.e. per point for leave-one-out). A model the workers cannot rebuild from its pickle (e.g. a
    subclassed Keras model whose class Keras cannot look up) is retrained in this process
    instead, with a warning."""
    try:
        blob = dumps(model)
        pickle.loads(blob)  # fail here, not in every worker
    except Exception as exc:  # noqa: BLE001 -- any unpicklable model
        logger.warning("the model cannot be sent to worker processes (%s: %s); retraining in this process "
                       "(n_jobs=1)", type(exc).__name__, str(exc).splitlines()[0][:200])
        return _retrain_serial(model, groups, X_test, y_test, done)
    pool = local_pool(n_jobs, initializer=_init_worker, initargs=(blob, threads))
    try:
        chunks = [[g] for g in groups]
        futures = [pool.submit(_retrain_in_worker, c, X_test, y_test) for c in chunks]
        return _collect(futures, chunks, len(groups), progress_on(model.progress), done)
    except BrokenExecutor as exc:
        logger.warning("the LOO worker processes failed (%s); retraining in this process (n_jobs=1)",
                       str(exc).splitlines()[0][:200])
        return _retrain_serial(model, groups, X_test, y_test, done)
    finally:
        pool.shutdown()


def refit_journal(model, X_test, y_test, path) -> Journal:
    """The :class:`~influence.result_store.Journal` of re-fits at ``path`` for this fitted
    model and these test points: its key hashes the model's class and configuration, theta,
    the training data, the optimiser state that re-training continues (``adam_state_``,
    where the model keeps one) and the test points."""
    state = getattr(model, "adam_state_", None)
    return Journal(path, {"what": "re-fit test losses", "model": model.cache_identity(),
                          "theta_and_data": [hash_arrays(model.theta_), model.data_fingerprint_],
                          "optimiser_state": None if state is None else hash_arrays(*state),
                          "test": hash_arrays(np.asarray(X_test), np.asarray(y_test))})


def _group_name(group) -> str:
    return hash_arrays(np.sort(np.asarray(group, dtype=np.int64)))[:20]


def retrain_test_losses(model, groups, X_test, y_test, executor: Executor | None = None, n_jobs: int | None = None,
                        threads_per_worker: int | None = 1, journal=None) -> np.ndarray:
    """Each test point's loss after re-fitting without each group of training indices.

    ``groups``: a list of index arrays (one re-fit each, warm-started, objective normalised
    over the points kept: :meth:`retrain_without`; an empty group is a control re-fit on all
    points). Returns shape (len(groups), n_test). Re-fits run as in :func:`leave_one_out`
    (``n_jobs``, ``executor``). ``journal``: a file (e.g. ``out/refits.jsonl``) where each
    finished re-fit is recorded at once (:func:`refit_journal`); a later call for the same
    model, test points and groups re-fits only those not recorded there, so a killed run
    of hours resumes where it stopped.
    """
    model.require_fit()
    groups = [model.check_indices(g) for g in groups]
    X_test, y_test = model.as_batch(X_test, y_test)
    if len(X_test) == 0:
        raise ValueError("no test points given: X_test is empty")
    losses = np.full((len(groups), len(X_test)), np.nan)
    todo = list(range(len(groups)))
    done = None
    if journal is not None:
        book = refit_journal(model, X_test, y_test, journal)
        names = [_group_name(g) for g in groups]
        usable = set()
        for j, name in enumerate(names):
            rec = book.get(name)
            if rec is None:
                continue
            row = np.asarray(rec, dtype=float) if isinstance(rec, list) and all(
                isinstance(v, (int, float)) for v in rec) else None
            if row is None or row.shape != (len(X_test),) or not np.all(np.isfinite(row)):
                logger.warning("%s: the record of re-fit %s is not %d finite test losses (%r); re-fitting it",
                               journal, name, len(X_test), rec if len(str(rec)) < 80 else str(rec)[:80] + "...")
                continue
            losses[j] = row
            usable.add(j)
        todo = [j for j in todo if j not in usable]
        if len(todo) < len(groups):
            logger.info("re-fits: %d of %d recorded in %s, %d to run", len(groups) - len(todo), len(groups),
                        journal, len(todo))

        def done(k, row):  # noqa: F811 -- k indexes `todo`
            book.add(names[todo[k]], [float(v) for v in row])

    if todo:
        losses[todo] = _run_refits(model, [groups[j] for j in todo], X_test, y_test, executor, n_jobs,
                                   threads_per_worker, done)
    return losses


def _run_refits(model, groups, X_test, y_test, executor, n_jobs, threads_per_worker, done) -> np.ndarray:
    n_jobs = n_jobs or os.cpu_count() or 1
    if (executor is None and n_jobs == 1) or len(groups) == 0:
        return _retrain_serial(model, groups, X_test, y_test, done)
    if executor is None:
        return _retrain_in_local_pool(model, groups, X_test, y_test, n_jobs, threads_per_worker, done)
    # any Executor: the model travels with each chunk, so send few chunks
    blob = dumps(model)
    bounds = np.array_split(np.arange(len(groups)), max(1, min(len(groups), 2 * n_jobs)))
    chunks = [[groups[i] for i in b] for b in bounds]
    futures = [executor.submit(_retrain_chunk, blob, c, X_test, y_test, threads_per_worker) for c in chunks]
    return _collect(futures, chunks, len(groups), progress_on(model.progress), done)


def leave_one_out(model, X_test, y_test, indices, predicted=None, executor: Executor | None = None,
                  n_jobs: int | None = None, threads_per_worker: int | None = 1, control: bool = False,
                  journal=None) -> LOOResult:
    """Retrain without each of ``indices`` and return actual (and predicted) loss changes.

    With ``control=True`` the baseline is not the fitted model's test loss but that of a
    control re-training on the full data by the same procedure from the same start, so
    the optimiser's own drift cancels (for models not trained to an exact optimum).
    ``n_jobs=1`` with no executor retrains in this process. Otherwise the chunks go to
    ``executor`` or to a local process pool of ``n_jobs`` workers (default: the number of
    CPUs; see :mod:`influence.parallel`), each limited to ``threads_per_worker`` TF threads.
    ``journal``: a file recording each finished re-fit (the control included), so that a
    killed run resumes (see :func:`retrain_test_losses`).
    """
    model.require_fit()
    indices = model.check_indices(indices)
    if predicted is not None:
        predicted = np.asarray(predicted, dtype=float)
        if predicted.shape != indices.shape:
            raise ValueError(f"predicted has shape {predicted.shape}, expected {indices.shape}")
    X_test, y_test = model.as_batch(X_test, y_test)
    if len(X_test) == 0:
        raise ValueError("no test points given: X_test is empty")
    t0 = time.perf_counter()
    base = model.mean_loss(X_test, y_test)
    info = {"fitted_test_loss": base}
    if not model.refits_by_own_training:  # the re-fits minimise the objective: theta should minimise it too
        gnorm = float(np.linalg.norm(model.gradient()))
        info["gradient_norm"] = gnorm
        if gnorm > model.stationarity_tol:
            logger.warning(
                "leave_one_out: theta is not a stationary point of the objective that the re-fits minimise "
                "(gradient norm %.3g > stationarity_tol %g): every re-fit moves towards that optimum, so the "
                "actual changes measure that drift, not the removed points%s. Call fit() first (the model's "
                "optimum), or re-fit by the model's own training (KerasModel(retrain=KerasRetrain(...)) with "
                "control=True)", gnorm, model.stationarity_tol,
                "" if control else " (control=True subtracts a re-fit on the full set, which only partly helps)")
    groups = ([[]] if control else []) + [[i] for i in indices]  # the control runs beside the re-fits
    losses = retrain_test_losses(model, groups, X_test, y_test, executor, n_jobs, threads_per_worker,
                                 journal=journal).mean(axis=1)
    if control:
        base, losses = float(losses[0]), losses[1:]
        info["control_test_loss"] = base
        info["control_drift"] = base - info["fitted_test_loss"]
    wall = time.perf_counter() - t0
    result = LOOResult(indices=indices, actual=losses - base, predicted=predicted, base_loss=base, wall_time_s=wall,
                       info=info)
    if predicted is not None and len(indices) > 2:
        logger.info("LOO over %d points in %.1fs: Pearson %.4f, Spearman %.4f", len(indices), wall,
                    result.pearson, result.spearman)
    return result


def additive_prediction(influence: np.ndarray, column_sets, n_train: int) -> np.ndarray:
    """First-order change in each test loss when each set of training points is removed:
    ``sum_{i in R_m} -I_up,loss(z_i, z_test) / n`` for every ``R_m`` in ``column_sets``
    (columns of ``influence``, shape (n_test, n_columns)). Returns (n_sets, n_test)."""
    return np.stack([-influence[:, cols].sum(axis=1) / n_train for cols in column_sets])


@dataclass
class LDSResult:
    """Actual vs additively predicted change in each test loss for re-fits without subsets."""

    removed: np.ndarray     # (n_subsets, subset_size) training indices removed in each re-fit
    actual: np.ndarray      # (n_subsets, n_test) loss after the re-fit minus the fitted model's
    predicted: np.ndarray   # (n_subsets, n_test) sum over the removed points of -I_up,loss / n
    wall_time_s: float

    @property
    def per_test(self) -> np.ndarray:
        """Spearman correlation over the subsets, for each test point."""
        return np.array([scipy.stats.spearmanr(self.actual[:, k], self.predicted[:, k])[0]
                         for k in range(self.actual.shape[1])])

    @property
    def score(self) -> float:
        """The linear datamodeling score: the mean over test points of :attr:`per_test`."""
        return float(np.nanmean(self.per_test))

    def rescored(self, influence, n_train: int, tests=None) -> "LDSResult":
        """The same re-fits scored with another estimate, no re-fit run: ``influence`` is
        I_up,loss of every training point (columns: training indices, ``n_train`` of them)
        for the test points ``tests`` (positions in this result; default all), so a slow
        estimator joins on a few of the test points. Its LDS is then comparable with
        ``self.rescored(other)`` or with the mean of ``per_test[tests]``."""
        tests = np.arange(self.actual.shape[1]) if tests is None else np.atleast_1d(np.asarray(tests))
        matrix = np.asarray(influence, dtype=float)
        if matrix.shape != (len(tests), n_train):
            raise ValueError(f"influence has shape {matrix.shape}, expected (len(tests), n_train) = "
                             f"{(len(tests), n_train)}")
        if not np.all(np.isfinite(matrix)):
            raise ValueError("influence contains NaN or infinite values")
        predicted = additive_prediction(matrix, self.removed, n_train)
        return LDSResult(removed=self.removed, actual=self.actual[:, tests], predicted=predicted,
                         wall_time_s=self.wall_time_s)


def linear_datamodeling_score(model, X_test, y_test, influence, n_subsets: int = 50, fraction: float = 0.5,
                              seed: int = 0, indices=None, executor: Executor | None = None,
                              n_jobs: int | None = None, threads_per_worker: int | None = 1,
                              journal=None) -> LDSResult | dict[str, LDSResult]:
    """Linear datamodeling score (LDS; Park et al. 2023) of influence estimates.

    Draws ``n_subsets`` random subsets ``R_m`` of ``round(fraction * len(indices))`` of
    the training points ``indices`` (default all; seeded), re-fits without each (as
    :func:`leave_one_out` does for one point), and compares each test point's actual
    change in loss with the additive first-order prediction
    ``sum_{i in R_m} -I_up,loss(z_i, z_test) / n``. The LDS of a test point is the
    Spearman correlation of the two over the subsets; the score is their mean. Unlike
    leave-one-out, it checks how influence adds up over large groups.

    ``influence``: ``I_up,loss`` of shape (n_test, len(indices)), e.g.
    ``model.influence_matrix(X_test, y_test, indices)``; or a dict of such matrices (say,
    one per solver), scored on the same re-fits: then a dict of results. ``journal``: a file
    recording each finished re-fit, so that a killed run resumes (:func:`retrain_test_losses`).
    """
    model.require_fit()
    idx = model.check_indices(indices)
    X_test, y_test = model.as_batch(X_test, y_test)
    named = dict(influence) if isinstance(influence, dict) else {None: influence}
    for name, matrix in named.items():
        matrix = named[name] = np.asarray(matrix, dtype=float)
        what = "influence" if name is None else f"influence[{name!r}]"
        if matrix.shape != (len(X_test), len(idx)):
            raise ValueError(f"{what} has shape {matrix.shape}, expected (n_test, n_indices) = "
                             f"{(len(X_test), len(idx))}")
        if not np.all(np.isfinite(matrix)):
            raise ValueError(f"{what} contains NaN or infinite values")
    size = int(round(fraction * len(idx)))
    if not 1 <= size < model.n_train_:
        raise ValueError(f"fraction {fraction} removes {size} of {len(idx)} points; need at least 1 and fewer "
                         f"than all {model.n_train_} training points")
    if n_subsets < 3:
        raise ValueError("n_subsets must be >= 3 for a rank correlation")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(len(idx), size=size, replace=False) for _ in range(n_subsets)])
    base = model.losses(X_test, y_test)
    losses = retrain_test_losses(model, [idx[p] for p in picks], X_test, y_test, executor, n_jobs,
                                 threads_per_worker, journal=journal)
    wall = time.perf_counter() - t0
    results = {}
    for name, matrix in named.items():
        predicted = additive_prediction(matrix, picks, model.n_train_)
        results[name] = LDSResult(removed=idx[picks], actual=losses - base, predicted=predicted, wall_time_s=wall)
        logger.info("LDS%s over %d subsets of %d points, %d test points: %.4f (%.1fs)",
                    "" if name is None else f" of {name}", n_subsets, size, len(X_test), results[name].score, wall)
    return results if isinstance(influence, dict) else results[None]

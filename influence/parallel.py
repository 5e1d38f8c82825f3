"""Local worker processes for retraining loops (LOO, the spam repeats).

Python's own ``spawn`` pool starts each worker by re-running the caller's main script,
so a script that calls :func:`~influence.refit_validation.leave_one_out` at top level (without
``if __name__ == "__main__":``) starts its whole job again in every worker, which then
dies while the parent blocks forever. The pool here is loky's (vendored by joblib, which
scikit-learn already needs): its workers never import ``__main__``, and what is sent to
them is pickled with cloudpickle (a joblib dependency), so model classes defined in a script or notebook travel
by value. Any other :class:`concurrent.futures.Executor` (e.g. a Dask client's) can be
passed to the functions instead.
"""
from __future__ import annotations

from concurrent.futures import Executor


def local_pool(n_jobs: int, initializer=None, initargs: tuple = ()) -> Executor:
    """A pool of ``n_jobs`` fresh worker processes that does not re-run ``__main__``."""
    from joblib.externals.loky import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=n_jobs, initializer=initializer, initargs=initargs)


def dumps(obj) -> bytes:
    """Pickle ``obj`` once for many workers (cloudpickle: classes from ``__main__`` by value)."""
    import cloudpickle

    return cloudpickle.dumps(obj)


def limit_threads(threads: int | None) -> None:
    """Cap TensorFlow's thread pools in a worker, so that workers do not oversubscribe the CPUs."""
    if not threads:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime is already initialised in this process
        pass

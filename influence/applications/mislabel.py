"""Finding mislabeled training points (Koh & Liang 2017, Sec. 5.4, Fig 6).

A fraction of training labels is flipped; a person then checks training points in an
order given by a strategy and fixes the flipped ones among those checked:

- ``influence``: largest |self-influence| first, |I_up,loss(z_i, z_i)|, i.e. the points
  whose removal would change their own loss most (closed form for logistic regression);
- ``loss``: largest training loss first;
- ``random``: a seeded random order.

:func:`run_repeat` runs one seeded repeat: flip, fit, rank, and for each checked
fraction fix, re-fit (warm start) and record the fraction of flips fixed and the test
accuracy. :func:`run_repeats` spreads repeats over any ``concurrent.futures.Executor``;
:func:`run_repeat_jobs` does the same for repeats on different train/test splits.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Executor

import numpy as np

from ..parallel import limit_threads, local_pool

STRATEGIES = ("influence", "loss", "random")


def flip_labels(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``int(fraction * n)`` binary labels chosen at random; return (new labels, flipped indices)."""
    y = np.asarray(y)
    flipped = np.sort(rng.choice(len(y), int(fraction * len(y)), replace=False))
    out = y.copy()
    out[flipped] = 1 - out[flipped]
    return out, flipped


def fix_checked(y_noisy: np.ndarray, y_true: np.ndarray, checked: np.ndarray) -> tuple[np.ndarray, int]:
    """Restore the true labels of the checked points; return (labels, number of flips fixed)."""
    checked = np.asarray(checked, dtype=int)
    out = y_noisy.copy()
    n_fixed = int(np.sum(y_noisy[checked] != y_true[checked]))
    out[checked] = y_true[checked]
    return out, n_fixed


def binary_accuracy(X, y, theta) -> float:
    """Test accuracy of ``sign(X theta)`` against labels {0, 1}; ``X`` dense or scipy.sparse."""
    return float(np.mean((np.asarray(X @ theta).ravel() > 0).astype(int) == np.asarray(y)))


def check_order(model, strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Training indices in the order a person would check them."""
    if strategy == "influence":
        return np.argsort(-np.abs(model.self_influence_closed_form()), kind="stable")
    if strategy == "loss":
        return np.argsort(-model.train_losses(), kind="stable")
    if strategy == "random":
        return rng.permutation(model.n_train_)
    raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")


def run_repeat(X_train, y_train, X_test, y_test, seed: int, flip_fraction: float, check_fractions,
               weight_decay: float, tol: float = 1e-8) -> dict:
    """One repeat; returns arrays of shape (len(STRATEGIES), len(check_fractions)).

    Fits use :func:`~influence.models.logistic.fit_binary_logistic` on a sparse copy of the
    features (the bag-of-words matrix is ~1% dense); influence uses the TF model at the
    fitted parameters, whose gradient norm is checked. ``X_train``/``X_test`` may be
    dense arrays or scipy.sparse matrices.
    """
    import scipy.sparse

    from ..models.logistic import BinaryLogisticRegression, fit_binary_logistic

    rng = np.random.default_rng(seed)
    y_noisy, flipped = flip_labels(y_train, flip_fraction, rng)
    Xs = scipy.sparse.csr_matrix(X_train)
    X_dense = X_train.toarray() if scipy.sparse.issparse(X_train) else np.asarray(X_train)

    def accuracy(theta):
        return binary_accuracy(X_test, y_test, theta)

    theta_noisy = fit_binary_logistic(Xs, y_noisy, weight_decay, tol=tol)
    model = BinaryLogisticRegression(weight_decay=weight_decay)
    model.set_training_data(X_dense, y_noisy).set_theta(theta_noisy)
    grad_norm = float(np.linalg.norm(model.gradient()))
    acc_noisy = accuracy(theta_noisy)
    n = len(y_train)
    fixed = np.zeros((len(STRATEGIES), len(check_fractions)))
    acc = np.zeros_like(fixed)
    for s, strategy in enumerate(STRATEGIES):
        order = check_order(model, strategy, rng)
        for f, frac in enumerate(check_fractions):
            y_fixed, n_fixed = fix_checked(y_noisy, y_train, order[:int(round(frac * n))])
            fixed[s, f] = n_fixed / max(len(flipped), 1)
            if n_fixed == 0:
                acc[s, f] = acc_noisy
                continue
            theta = fit_binary_logistic(Xs, y_fixed, weight_decay, theta0=theta_noisy, tol=tol)
            acc[s, f] = accuracy(theta)
    return {"seed": seed, "fraction_fixed": fixed, "test_accuracy": acc, "n_flipped": len(flipped),
            "test_accuracy_noisy": acc_noisy, "grad_norm_noisy_fit": grad_norm}


def _run_chunk(jobs, flip_fraction, check_fractions, weight_decay, threads):
    limit_threads(threads)
    # one small model per repeat compiles its own kernels; TF's "retracing" warning about
    # functions created in a loop is expected here and only clutters the log
    import tensorflow as tf

    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        return [run_repeat(*job, flip_fraction, check_fractions, weight_decay) for job in jobs]
    finally:
        tf_logger.setLevel(level)


def run_repeats(X_train, y_train, X_test, y_test, seeds, flip_fraction=0.1, check_fractions=None,
                weight_decay=1e-4, executor: Executor | None = None, n_jobs: int | None = None,
                threads_per_worker: int | None = 1) -> list[dict]:
    """Run :func:`run_repeat` for every seed on one train/test split, in parallel."""
    import scipy.sparse

    Xs, Xt = scipy.sparse.csr_matrix(X_train), scipy.sparse.csr_matrix(X_test)  # small to ship to workers
    jobs = [(Xs, y_train, Xt, y_test, s) for s in seeds]
    return run_repeat_jobs(jobs, flip_fraction, check_fractions, weight_decay, executor, n_jobs, threads_per_worker)


def run_repeat_jobs(jobs, flip_fraction=0.1, check_fractions=None, weight_decay=1e-4, executor: Executor | None = None,
                    n_jobs: int | None = None, threads_per_worker: int | None = 1) -> list[dict]:
    """Run :func:`run_repeat` for every job ``(X_train, y_train, X_test, y_test, seed)``, in parallel.

    Jobs may hold different train/test splits. They are sent in chunks (about two per
    worker) to any ``concurrent.futures.Executor`` (default: a process pool of ``n_jobs``);
    results come back in job order.
    """
    check_fractions = np.arange(0, 0.301, 0.025) if check_fractions is None else np.asarray(check_fractions)
    jobs = list(jobs)
    n_jobs = n_jobs or os.cpu_count() or 1
    if executor is None and n_jobs == 1:
        return _run_chunk(jobs, flip_fraction, check_fractions, weight_decay, None)
    bounds = np.array_split(np.arange(len(jobs)), min(len(jobs), 2 * n_jobs))
    chunks = [[jobs[i] for i in b] for b in bounds if len(b)]
    own = executor is None
    if own:
        executor = local_pool(n_jobs)
    try:
        futures = [executor.submit(_run_chunk, c, flip_fraction, check_fractions, weight_decay, threads_per_worker)
                   for c in chunks]
        return [r for fut in futures for r in fut.result()]
    finally:
        if own:
            executor.shutdown()

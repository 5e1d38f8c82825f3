"""An RBF-kernel SVM as a linear model on explicit kernel features (paper Sec. 5.1, Fig 4).

With ``K = exp(-gamma ||x_i - x_j||^2)`` over the stacked training and test points and
its Cholesky factor ``K = L L^T``, the rows of ``L`` are features whose inner products
reproduce the kernel exactly: a linear (smooth-hinge) SVM on them is the kernel SVM, and
influence functions apply unchanged. As the original code, ``gamma = 0.05 / n_train``
on inputs scaled to [-1, 1]. A jitter ``eps I`` is added only if the factorisation fails
(the kernel is positive definite in exact arithmetic for distinct points).
"""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def squared_distances(A: np.ndarray, B: np.ndarray | None = None, chunk: int = 256) -> np.ndarray:
    """``||a_i - b_j||^2`` (float64) for flattened rows, computed in chunks."""
    A = np.asarray(A).reshape(len(A), -1)
    B = A if B is None else np.asarray(B).reshape(len(B), -1)
    na = np.einsum("ij,ij->i", A, A, dtype=np.float64)
    nb = na if B is A else np.einsum("ij,ij->i", B, B, dtype=np.float64)
    D = np.empty((len(A), len(B)))
    for s in range(0, len(A), chunk):
        G = (A[s:s + chunk] @ B.T).astype(np.float64)
        D[s:s + chunk] = na[s:s + chunk, None] + nb[None, :] - 2.0 * G
    np.maximum(D, 0.0, out=D)
    if B is A:
        np.fill_diagonal(D, 0.0)
    return D


def rbf_kernel_from_distances(D: np.ndarray, gamma: float) -> np.ndarray:
    """``exp(-gamma D)``."""
    if gamma <= 0:
        raise ValueError("gamma must be positive")
    return np.exp(-gamma * D)


def cholesky_features(K: np.ndarray, max_jitter: float = 1e-6) -> tuple[np.ndarray, float]:
    """Lower-triangular ``L`` with ``L L^T = K + jitter I`` (jitter 0 unless needed), and the jitter."""
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"kernel matrix must be square, got {K.shape}")
    jitter = 0.0
    while True:
        try:
            return np.linalg.cholesky(K + jitter * np.eye(len(K))), jitter
        except np.linalg.LinAlgError:
            jitter = 1e-12 if jitter == 0 else jitter * 10
            if jitter > max_jitter:
                raise
            logger.warning("kernel matrix not numerically positive definite; adding jitter %.0e", jitter)


def rbf_features(X_train: np.ndarray, X_test: np.ndarray, gamma: float | None = None):
    """(F_train, F_test, info): rows of the Cholesky factor of the RBF kernel over train + test."""
    X = np.concatenate([np.asarray(X_train).reshape(len(X_train), -1), np.asarray(X_test).reshape(len(X_test), -1)])
    gamma = 0.05 / len(X_train) if gamma is None else gamma
    K = rbf_kernel_from_distances(squared_distances(X), gamma)
    L, jitter = cholesky_features(K)
    n = len(X_train)
    return L[:n], L[n:], {"gamma": gamma, "jitter": jitter, "kernel_min_offdiag": float(K[~np.eye(len(K), dtype=bool)].min())
                          if len(K) > 1 else 1.0}

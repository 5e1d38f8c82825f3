"""Weighted Gram matrices ``X^T diag(w) X`` of a design matrix whose columns are mostly zero.

The explicit curvature of a model whose outputs are linear in theta is a sum of weighted
Gram matrices of its inputs (softmax regression: ``k (k - 1) / 2`` of them, one per pair of
classes). Images with a blank background and bag-of-words features have many columns that
are zero in almost every row; a dense ``syrk`` spends most of its multiply-adds on them.

``ColumnSplit(X)`` drops the all-zero columns, orders the rest by their number of non-zeros
and keeps the ``r`` densest as a dense block ``Xd`` and the others as a sparse (CSR) block
``Xs``; in that column order (``index``)::

    X^T W X = [[Xd^T W Xd, (Xs^T W Xd)^T], [Xs^T W Xd, Xs^T W Xs]],   W = diag(w)

the dense block by BLAS (``n r^2 / 2`` multiply-adds), the others by sparse products
(``nnz(Xs) r`` and ``sum_i nnz(Xs_i)^2``). ``r`` minimises that count with a sparse
multiply-add priced at ``sparse_cost`` dense ones (the ratio of the BLAS's rate to SciPy's
sparse products'; its measurement is in docs/solvers.md). The result is exact (the same sums in
another order); the rows and columns of ``X^T W X`` not in ``index`` are zero.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse

class ColumnSplit:
    """A design matrix split into dense and sparse columns for weighted Gram matrices.

    Parameters
    ----------
    X : (n, d) array
    dtype : the arithmetic of the products (float64, or float32 for a preconditioner)
    sparse_cost : a sparse multiply-add's price in dense ones (for choosing the split)
    """

    def __init__(self, X, dtype=np.float64, sparse_cost: float = 50.0, plan=None):
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must be a (n, d) matrix, got shape {X.shape}")
        self.dtype = np.dtype(dtype)
        n, _ = X.shape
        dense, sparse = self.plan(X, sparse_cost) if plan is None else plan
        self.n_dense = len(dense)
        self.dense_columns, self.sparse_columns = dense.astype(np.int64), sparse.astype(np.int64)
        self.index = np.concatenate([dense, sparse]).astype(np.int64)
        self.n_rows, self.n_columns = n, X.shape[1]
        self._blocks: dict = {}
        self._dense = np.ascontiguousarray(X[:, dense], dtype=self.dtype)
        self._sparse = scipy.sparse.csr_matrix(np.asarray(X[:, sparse], dtype=self.dtype)) if len(sparse) else None
        if self._sparse is not None:
            self._rows = np.repeat(np.arange(n), np.diff(self._sparse.indptr))
        self._buffer = None

    @staticmethod
    def plan(X, sparse_cost: float = 50.0) -> tuple[np.ndarray, np.ndarray]:
        """``(dense, sparse)`` column indices (sorted; all-zero columns in neither): the ``r``
        densest columns dense, ``r`` minimising ``n r^2 / 2 + sparse_cost nnz_s (r + nnz_s / n)``
        (the dense block's syrk, the sparse block's products with the dense one and itself)."""
        n = X.shape[0]
        nnz = np.count_nonzero(X, axis=0)
        order = np.argsort(-nnz, kind="stable")
        order = order[nnz[order] > 0]
        tail = np.concatenate([np.cumsum(nnz[order][::-1])[::-1], [0]])  # tail[r]: non-zeros of columns r..
        r = np.arange(len(order) + 1)
        cost = n * r ** 2 / 2.0 + sparse_cost * tail * (r + tail / max(n, 1))
        cut = int(np.argmin(cost))
        return np.sort(order[:cut]), np.sort(order[cut:])

    @classmethod
    def if_worthwhile(cls, X, dtype=np.float64, max_dense_fraction: float = 0.9, max_bytes: int = 2 ** 31):
        """A split of ``X`` if its dense part has at most ``max_dense_fraction`` of the columns
        and its copy at most ``max_bytes`` (else None: a plain pass over ``X`` reads about as
        much, or the copy would cost too much memory; no copy is made)."""
        dense, sparse = cls.plan(X)
        copy = X.shape[0] * len(dense) * np.dtype(dtype).itemsize
        if len(dense) > max_dense_fraction * X.shape[1] or copy > max_bytes:
            return None
        return cls(X, dtype=dtype, plan=(dense, sparse))

    def astype(self, dtype) -> "ColumnSplit":
        """The same split with its blocks in ``dtype`` (no second pass over ``X``)."""
        converted = object.__new__(ColumnSplit)
        converted.__dict__.update(self.__dict__)
        converted.dtype = np.dtype(dtype)
        converted._dense = self._dense.astype(converted.dtype)
        converted._sparse = None if self._sparse is None else self._sparse.astype(converted.dtype)
        converted._blocks, converted._buffer = {}, None
        return converted

    @property
    def size(self) -> int:
        return len(self.index)

    def rows(self, start: int, stop: int):
        """Rows ``start:stop`` as ``(dense (rows, r) array, sparse (rows, s) CSR or None)`` (the
        sparse slices are kept: a product visits the same row blocks every time)."""
        xd = self._dense[start:stop]
        if self._sparse is None:
            return xd, None
        key = (start, stop)
        if key not in self._blocks:
            if len(self._blocks) > 4096:
                self._blocks.clear()
            self._blocks[key] = self._sparse[start:stop]
        return xd, self._blocks[key]

    def gram(self, w: np.ndarray) -> np.ndarray:
        """``X^T diag(w) X`` restricted to ``index`` (``w`` >= 0, one weight per row), (m, m) in dtype."""
        w = np.asarray(w, dtype=self.dtype)
        if w.shape != (self.n_rows,):
            raise ValueError(f"w must have shape ({self.n_rows},), got {w.shape}")
        if np.any(w < 0):
            raise ValueError("ColumnSplit.gram takes non-negative weights")
        r, m = self.n_dense, self.size
        out = np.empty((m, m), dtype=self.dtype)
        if r:
            if self._buffer is None:
                self._buffer = np.empty_like(self._dense)
            np.multiply(np.sqrt(w)[:, None], self._dense, out=self._buffer)
            out[:r, :r] = self._buffer.T @ self._buffer  # numpy calls syrk for a product with its own transpose
        if self._sparse is not None:
            S = self._sparse
            Sw = scipy.sparse.csr_matrix((S.data * w[self._rows], S.indices, S.indptr), shape=S.shape)
            if r:
                cross = np.asarray(Sw.T @ self._dense)  # (m - r, r)
                out[r:, :r] = cross
                out[:r, r:] = cross.T
            tail = (Sw.T @ S).toarray()  # (w x_a) x_b and (w x_b) x_a round differently: symmetrise
            out[r:, r:] = 0.5 * (tail + tail.T)
        return out

"""Logistic regression models (convex; float64; trained to the optimum with L-BFGS).

``LogisticRegression``: multiclass softmax with no bias, ``theta = W`` of shape (d, k)
as in the paper; ``L(z) = -log softmax(W^T x)_y``.

``BinaryLogisticRegression``: ``w`` in R^d, no bias, labels in {0, 1};
``L(z) = log(1 + exp(w.x)) - y w.x``. Its Hessian has the closed form
``X^T diag(p(1-p)) X / n + wd I``, used for the explicit Hessian.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..validation import check_number
from ..generic_neural_net import ParamBlock
from .base import Model


class LinearCurvature:
    """The closed-form loss curvature of a logistic model (outputs linear in theta, so H = G):
    what the curvature operators use in place of autodiff products
    (:meth:`GenericNeuralNet.closed_form_curvature`). Every method takes theta explicitly.

    - ``batch_sum(theta, x, y, V)``: ``sum_i nabla^2 L(z_i) V`` over a batch, as TF ops;
    - ``numpy_sum(theta, x, V, weights)``: the same in numpy for a block of rows;
    - ``weights(theta, x)``: what the products need of theta per row (computed once per state);
    - ``split()`` / ``split_sum(split, V, weights, rows)``: the training inputs' column split
      (:class:`~influence.curvature.gram.ColumnSplit`, made once and shared by the operators
      given this object; None for dense inputs) and the whole-set product over it;
    - ``matrix(theta, indices)``: the explicit (p, p) matrix with the regulariser;
    - ``blocks(theta, indices, dtype, split, weights)``: the structured explicit matrix
      (index, B) over the parameters with loss curvature (softmax regression).
    """

    def __init__(self, model):
        self.model = model
        self.has_split_sum = hasattr(model, "_curvature_sum_split_np")
        self.has_blocks = hasattr(model, "_closed_form_curvature")
        self._split = None  # (data fingerprint, split)

    def batch_sum(self, theta, x, y, V):
        return self.model._curvature_sum(theta, x, y, V)

    def numpy_sum(self, theta, x, V, weights=None):
        return self.model._curvature_sum_np(theta, x, V, weights=weights)

    def weights(self, theta, x):
        return self.model._curvature_weights_np(theta, x)

    def split(self):
        from ..curvature.gram import ColumnSplit

        m = self.model
        key = (m.data_fingerprint_, np.dtype(m.dtype).str)
        if self._split is None or self._split[0] != key:
            self._split = (key, ColumnSplit.if_worthwhile(m.X_train_np_, dtype=m.dtype))
        return self._split[1]

    def split_sum(self, split, V, weights, rows):
        return self.model._curvature_sum_split_np(split, V, weights, rows)

    def matrix(self, theta, indices=None):
        return self.model._closed_form_hessian(theta, indices)

    def blocks(self, theta, indices=None, dtype=np.float64, split=None, weights=None):
        return self.model._closed_form_curvature(theta, indices, dtype=dtype, split=split, weights=weights)


class ConvexClassifier(Model):
    """A convex linear model fitted by L-BFGS (+ Newton polish) to a tight tolerance.

    ``tol`` is L-BFGS's max-abs-gradient stopping point; ``max_iter`` its iteration cap;
    ``polish`` adds Newton-CG steps after L-BFGS on :meth:`fit` (gradient norm ~1e-10).
    """

    linear_outputs = True

    def __init__(self, weight_decay: float = 0.01, tol: float = 1e-8, max_iter: int = 5000,
                 batch_size: int = 65536, polish: bool = True, **kwargs):
        super().__init__(weight_decay=weight_decay, batch_size=batch_size, **kwargs)
        self.tol = tol
        self.max_iter = max_iter
        self.polish = polish

    def _flat_blocks(self, x_shape, shape):
        if len(x_shape) != 1:
            raise ValueError(f"{type(self).__name__} takes flat feature vectors, got example shape {x_shape}")
        return [ParamBlock("W" if len(shape) == 2 else "w", shape, decay=True)]

    def _train(self, theta0):
        return self.minimize_lbfgs(theta0, tol=self.tol, maxiter=self.max_iter, newton_polish=self.polish)

    def _kfac_taps(self, params, x):
        """One Dense block: input ``x``, pre-activation = the outputs (bias as a second block, if any)."""
        from .keras_taps import Tap

        out = self._forward(params, x)
        return out, [Tap("dense", x, out, 0, 1 if len(self.blocks_) > 1 else None, type(self).__name__)]

    def _retrain(self, theta0):
        # warm-started LOO re-fit: L-BFGS to max|grad| <= tol already changes the test
        # loss by < 1e-6 relative to the Newton-polished optimum; skip the polish
        return self.minimize_lbfgs(theta0, tol=self.tol, maxiter=self.max_iter, newton_polish=False)

    def predict_proba(self, X) -> np.ndarray:
        raise NotImplementedError

    def predict(self, X) -> np.ndarray:
        return np.argmax(self.predict_proba(X), axis=1)

    def score(self, X, y) -> float:
        """Accuracy."""
        return float(np.mean(self.predict(X) == np.asarray(y)))


class LogisticRegression(ConvexClassifier):
    """Multiclass logistic regression without bias; ``theta`` = W (d x n_classes).

    Objective ``mean CE + (wd/2)||W||^2`` (see :mod:`influence.generic_neural_net`).
    ``n_classes=None`` takes ``max(y) + 1`` at fit time.
    """

    def __init__(self, n_classes: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.n_classes = check_number("n_classes", n_classes, low=2, integer=True, allow_none=True)

    def _param_blocks(self, x_shape, y):
        if self.n_classes is None:
            y = np.asarray(y)
            if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
                raise ValueError("class labels must be finite integers (n_classes is taken from them)")
            k = int(np.max(y)) + 1
            if k < 2 or len(np.unique(y)) < 2:
                raise ValueError(f"the training labels hold {len(np.unique(y))} class(es) only; a classifier needs "
                                 f"n_classes >= 2 (influence in a one-class model is 0 for every point)")
            self.n_classes = k
        return self._flat_blocks(x_shape, (x_shape[0], self.n_classes))

    def _encode_targets(self, y):
        y = np.asarray(y)
        if len(y) and np.any(y != np.round(y)):
            raise ValueError("class labels must be integers")
        if len(y) and (y.min() < 0 or y.max() >= self.n_classes):
            raise ValueError(f"class labels must lie in [0, {self.n_classes - 1}]")
        return y.astype(np.int32)

    predictive = "softmax"

    def _forward(self, params, x):
        return tf.matmul(x, params[0])

    def _curvature_sum(self, theta, x, y, V):
        """``sum_i nabla^2 L(z_i) V`` over a batch in closed form (= G: linear outputs): with
        ``A = x [W, V_1 .. V_m]`` in one pass over x, ``P = softmax(x W)`` and
        ``B_j = P * A_j - P (P . A_j)``, the product is ``x^T [B_1 .. B_m]`` (a second pass)."""
        d, k = self.blocks_[0].shape
        m = tf.shape(V)[1]
        Vm = tf.reshape(tf.transpose(tf.reshape(V, [d, k, m]), [0, 2, 1]), [d, -1])  # (d, m k): column j's W
        A = tf.matmul(x, tf.concat([tf.reshape(theta, [d, k]), Vm], axis=1))
        P = tf.nn.softmax(A[:, :k])
        A = tf.reshape(A[:, k:], [-1, m, k])
        PA = P[:, None, :] * A
        B = PA - P[:, None, :] * tf.reduce_sum(PA, axis=2, keepdims=True)
        out = tf.matmul(x, tf.reshape(B, [-1, m * k]), transpose_a=True)  # (d, m k)
        return tf.reshape(tf.transpose(tf.reshape(out, [d, m, k]), [0, 2, 1]), [d * k, m])

    def _curvature_sum_np(self, theta, x, V, weights=None):
        """:meth:`_curvature_sum` in numpy for a block of rows ``x`` (the operators' products: the
        BLAS behind numpy multiplies float64 matrices faster than TF's on CPU: docs/solvers.md). Row-major
        ``vec(W)`` makes ``V.reshape(d, k m)`` each column's W side by side, class-major. Computed
        transposed, ``A^T = [W, V]^T x^T`` and ``B^T x``: the BLAS runs these wide-by-skinny shapes
        faster for one column (docs/solvers.md; the same numbers to 1e-15)."""
        d, k = self.blocks_[0].shape
        m = V.shape[1]
        if weights is None:
            AT = np.concatenate([theta.reshape(d, k), V.reshape(d, k * m)], axis=1).T @ x.T  # (k (1 + m), rows)
            P, AV = self._softmax_columns(AT[:k]), AT[k:]
        else:  # the probabilities at this theta, computed once by the operator
            P, AV = weights.T, V.reshape(d, k * m).T @ x.T
        self._weigh_in_place(AV.reshape(k, m, -1), P)  # (class, column, row), a view
        return (AV @ x).T.reshape(d * k, m)

    @staticmethod
    def _weigh_in_place(A3, P):
        """``B_c = P_c A_c - P_c sum_e P_e A_e`` in place on ``A3`` (class, column, row), ``P``
        (class, row): one pass to weigh, one to sum, one to subtract (class by class, so that no
        full-size temporary is made)."""
        A3 *= P[:, None, :]
        s = A3.sum(axis=0)
        for c in range(A3.shape[0]):
            A3[c] -= P[c] * s

    def _curvature_sum_split_np(self, split, V, weights, rows):
        """:meth:`_curvature_sum_np` over the whole training set from its
        :class:`~influence.curvature.gram.ColumnSplit`: ``A = Xd Vd + Xs Vs`` (the dense columns
        by BLAS, the sparse ones by sparse products, the all-zero ones not at all), then the
        same weighting and ``X^T B`` by parts. The same sums in another order (MNIST: 454 of
        784 columns dense, the other 261 non-zero ones hold 0.7% of the non-zeros)."""
        d, k = self.blocks_[0].shape
        m = V.shape[1]
        V2 = V.reshape(d, k * m)
        Vd = V2[split.dense_columns].T  # (k m, r)
        Vs = V2[split.sparse_columns]  # (s, k m)
        out_d = np.zeros((k * m, len(split.dense_columns)))
        out_s = np.zeros((len(split.sparse_columns), k * m))
        for start in range(0, split.n_rows, rows):
            stop = min(start + rows, split.n_rows)
            xd, xs = split.rows(start, stop)
            AT = Vd @ xd.T  # (k m, rows)
            if xs is not None:
                AT += (xs @ Vs).T
            self._weigh_in_place(AT.reshape(k, m, -1), weights[start:stop].T)
            out_d += AT @ xd
            if xs is not None:
                out_s += xs.T @ AT.T
        out = np.zeros((d, k * m))
        out[split.dense_columns] = out_d.T
        out[split.sparse_columns] = out_s
        return out.reshape(d * k, m)

    @staticmethod
    def _softmax_columns(Z):
        P = np.exp(Z - Z.max(axis=0, keepdims=True))
        return P / P.sum(axis=0, keepdims=True)

    def _curvature_weights_np(self, theta, x):
        """``softmax(x W)`` (rows, k): what :meth:`_curvature_sum_np` needs of theta, the same for
        every product at one theta (the operator keeps it per state)."""
        d, k = self.blocks_[0].shape
        return self._softmax_columns(theta.reshape(d, k).T @ x.T).T

    def closed_form_curvature(self) -> LinearCurvature:
        return LinearCurvature(self)

    def _closed_form_curvature(self, theta, indices=None, dtype=np.float64, split=None, weights=None):
        """The loss part of the explicit Hessian (= G), ``(1/n) sum_i S_i kron (x_i x_i^T)`` with
        ``S_i = diag(P_i) - P_i P_i^T``, over the training points ``indices`` (None: all), as
        ``(index, B)``: ``B`` (dtype) is that matrix restricted to the parameters ``index``; it is
        zero outside them (the weights of pixels that are zero in every row).

        Block (c, e) of row-major ``vec(W)`` is ``X^T diag(S_ce) X``. Only the k (k - 1) / 2
        off-diagonal blocks are formed, ``-X^T diag(P_c P_e) X`` (non-negative weights: one
        weighted Gram matrix each, :class:`~influence.curvature.gram.ColumnSplit`, which skips
        the all-zero columns and takes the sparse ones by sparse products); the diagonal blocks
        follow from ``sum_e S_ce = P_c (1 - sum_e P_e) = 0``: block (c, c) is minus the sum of
        row c's others (more accurate than ``P_c (1 - P_c)`` for confident rows). ``B`` is
        ordered class-major over ``index``'s pixels; ``split``: the rows' ColumnSplit if one exists
        (the products' own, in ``dtype``), ``weights`` the rows' softmax if known. MNIST (55,000 x 784, 19% non-zero): 45
        Gram matrices of 715 columns, 454 of them dense."""
        from ..curvature.gram import ColumnSplit

        X = self.X_train_np_ if indices is None else self.X_train_np_[np.asarray(indices)]
        d, k = self.blocks_[0].shape
        n = max(X.shape[0], 1)
        theta = np.asarray(theta, dtype=np.float64)
        rows = int(max(256, 2 ** 22 // max(d, 1)))
        if weights is not None:
            P = weights
        elif X.shape[0]:
            P = np.concatenate([self._curvature_weights_np(theta, np.asarray(X[s:s + rows], dtype=np.float64))
                                for s in range(0, X.shape[0], rows)])
        else:
            P = np.zeros((0, k))
        split = ColumnSplit(X, dtype=dtype) if split is None else split  # ``split``: of these rows
        m = split.size
        B = np.zeros((k, m, k, m), dtype=split.dtype)
        for c in range(k):
            for e in range(c + 1, k):
                G = split.gram(P[:, c] * P[:, e])
                G /= -n
                B[c, :, e, :] = G
                B[e, :, c, :] = G
        for c in range(k):
            B[c, :, c, :] = -B[c].sum(axis=1)  # the (c, c) block is still zero here
        index = (split.index[None, :] * k + np.arange(k)[:, None]).ravel()  # class-major
        return index, B.reshape(k * m, k * m)

    def _closed_form_hessian(self, theta, indices=None):
        """The explicit Hessian (= G) ``(1/n) sum_i S_i kron (x_i x_i^T) + wd diag(mask)`` in
        float64 (:meth:`_closed_form_curvature`, placed in the full (p, p) matrix)."""
        index, B = self._closed_form_curvature(theta, indices)
        H = np.zeros((self.n_params, self.n_params))
        order = np.argsort(index)
        pos = index[order]
        H[np.ix_(pos, pos)] = B[np.ix_(order, order)]
        H[np.diag_indices(self.n_params)] += self.weight_decay * self.decay_mask_
        return H

    def _loss(self, logits, y):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

    def predict_proba(self, X):
        z = self.outputs(X)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


class BinaryLogisticRegression(ConvexClassifier):
    """Binary logistic regression without bias, labels {0, 1}; ``theta = w`` in R^d."""

    def _param_blocks(self, x_shape, y):
        return self._flat_blocks(x_shape, (x_shape[0],))

    def _encode_targets(self, y):
        y = np.asarray(y)
        if len(y) and not np.all((y == 0) | (y == 1)):
            raise ValueError("BinaryLogisticRegression labels must be 0 or 1")
        return y.astype(self.dtype)

    predictive = "sigmoid"

    def _forward(self, params, x):
        return tf.linalg.matvec(x, params[0])

    def _curvature_sum(self, theta, x, y, V):
        """``sum_i nabla^2 L(z_i) V = x^T diag(s (1 - s)) x V`` over a batch (= G), ``s = sigmoid(x theta)``."""
        A = tf.matmul(x, tf.concat([theta[:, None], V], axis=1))
        s = tf.sigmoid(A[:, 0])
        return tf.matmul(x, (s * (1 - s))[:, None] * A[:, 1:], transpose_a=True)

    def _curvature_sum_np(self, theta, x, V, weights=None):
        """:meth:`_curvature_sum` in numpy for a block of rows ``x`` (see LogisticRegression's)."""
        if weights is None:
            AT = np.concatenate([theta[:, None], V], axis=1).T @ x.T  # transposed, as LogisticRegression's
            weights, AV = self._curvature_weights_np(theta, None, AT[0]), AT[1:]
        else:
            AV = V.T @ x.T
        return ((weights[None, :] * AV) @ x).T

    @staticmethod
    def _curvature_weights_np(theta, x, z=None):
        """``s (1 - s)`` with ``s = sigmoid(x theta)`` (rows,): the same for every product at one theta."""
        s = 0.5 * (1.0 + np.tanh(0.5 * (x @ theta if z is None else z)))  # sigmoid, overflow-free
        return s * (1 - s)

    def _loss(self, z, y):
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z)

    def predict_proba(self, X):
        p1 = 1.0 / (1.0 + np.exp(-self.outputs(X)))
        return np.stack([1 - p1, p1], axis=1)

    def self_influence_closed_form(self, indices=None) -> np.ndarray:
        """``I_up,loss(z_i, z_i) = -(p_i - y_i)^2 x_i^T H^-1 x_i`` for many points at once.

        The loss gradient of z_i is ``(p_i - y_i) x_i``, so self-influence needs only the
        diagonal of ``X H^-1 X^T``: one Cholesky factor and one triangular solve, no
        per-point solves. Uses the loss gradient without the regulariser (equals
        ``self_influence(include_regularizer=False)``).
        """
        import scipy.linalg

        idx = self.check_indices(indices)
        X = self.X_train_np_[idx]
        L = scipy.linalg.cholesky(self.hessian(), lower=True)
        Z = scipy.linalg.solve_triangular(L, X.T, lower=True)
        r = 1.0 / (1.0 + np.exp(-(X @ self.theta_))) - self.y_train_np_[idx]
        return -(r ** 2) * np.sum(Z * Z, axis=0)

    def closed_form_curvature(self) -> LinearCurvature:
        return LinearCurvature(self)

    def _closed_form_hessian(self, theta, indices=None):
        """Closed form ``X^T diag(p(1-p)) X / n + wd I`` (= G: the outputs are linear in theta)
        over the training points ``indices`` (None: all); the curvature operators' explicit matrix."""
        X = self.X_train_np_ if indices is None else self.X_train_np_[np.asarray(indices)]
        p = 1.0 / (1.0 + np.exp(-(X @ np.asarray(theta))))
        H = (X.T * (p * (1 - p))) @ X / max(X.shape[0], 1)
        return 0.5 * (H + H.T) + self.weight_decay * np.diag(self.decay_mask_)


def fit_binary_logistic(X, y, weight_decay: float, theta0=None, tol: float = 1e-8, max_iter: int = 20000):
    """Minimise BinaryLogisticRegression's objective with SciPy L-BFGS on a (sparse) matrix.

    Same objective, ``mean log(1 + exp(w.x)) - y w.x + (wd/2)||w||^2``, for inputs where the
    TF path is wasteful: scipy.sparse matrices (bag-of-words) make each iteration cost
    O(nnz) instead of O(n d). Used for the many re-fits of the mislabel experiment; the
    result can be handed to :meth:`BinaryLogisticRegression.set_theta` for influence.
    """
    import scipy.optimize
    import scipy.special

    n, d = X.shape
    y = np.asarray(y, dtype=np.float64)

    def fg(w):
        z = X @ w
        loss = np.logaddexp(0.0, z) - y * z
        r = scipy.special.expit(z) - y
        return loss.mean() + 0.5 * weight_decay * (w @ w), X.T @ r / n + weight_decay * w

    w0 = np.zeros(d) if theta0 is None else np.asarray(theta0, dtype=np.float64)
    res = scipy.optimize.minimize(fg, w0, jac=True, method="L-BFGS-B",
                                  options=dict(maxiter=max_iter, maxcor=30, gtol=tol, ftol=1e-15, maxls=50))
    return res.x

"""Linear SVM with the smooth hinge loss (Koh & Liang 2017, Sec. 4.3).

    SmoothHinge(s, t) = t * log(1 + exp((1 - s) / t)),   s = y * (w . x [+ b])

with labels y in {-1, +1}. As t -> 0 it approaches the hinge max(0, 1 - s); t = 0 *is*
the hinge, whose Hessian is zero almost everywhere (so influence reduces to
``-g_test . g_i / wd``). The loss is computed as ``t * softplus((1 - s) / t)``, stable for
small t. Objective: ``mean loss + (wd/2)||w||^2`` (and ``b`` too when ``use_bias``: the
bias is a regularised constant feature, as liblinear does).

Training: t = 0 uses scikit-learn's ``LinearSVC`` (hinge, ``C = 1/(n wd)``, which is the
same objective scaled by 1/wd); t > 0 uses L-BFGS then Newton steps to a gradient norm
below 1e-8.
"""
from __future__ import annotations

import warnings

import numpy as np
import tensorflow as tf

from ..validation import check_number
from ..generic_neural_net import ParamBlock
from .logistic import ConvexClassifier


def smooth_hinge(s, t: float):
    """SmoothHinge(s, t) in NumPy (t = 0: the hinge)."""
    s = np.asarray(s, dtype=float)
    if t == 0:
        return np.maximum(0.0, 1.0 - s)
    return t * np.logaddexp(0.0, (1.0 - s) / t)


class SmoothHingeSVM(ConvexClassifier):
    """Linear SVM with the smooth hinge loss at temperature ``temp`` (labels -1/+1)."""

    def margin_function(self):
        """TRAK's output function ``m = y z`` and ``Q = -dL/dm`` of the smooth hinge
        ``t log(1 + exp((1 - m) / t))`` (a step at ``t = 0``)."""
        temp = float(self.temp)

        def margin(out, y):
            return tf.cast(y, out.dtype) * out

        def weight(m):
            return tf.sigmoid((1 - m) / temp) if temp > 0 else tf.cast(m < 1, m.dtype)

        return margin, weight

    def __init__(self, temp: float = 0.0, use_bias: bool = False, weight_decay: float = 0.01,
                 svc_tol: float = 1e-8, svc_max_iter: int = 100000, **kwargs):
        super().__init__(weight_decay=weight_decay, **kwargs)
        self.temp = check_number("temp", temp, low=0.0)
        self.use_bias = use_bias
        self.svc_tol = svc_tol
        self.svc_max_iter = svc_max_iter

    def _param_blocks(self, x_shape, y):
        blocks = self._flat_blocks(x_shape, (x_shape[0],))
        if self.use_bias:
            blocks.append(ParamBlock("b", (), decay=True))
        return blocks

    def _encode_targets(self, y):
        y = np.asarray(y)
        if len(y) and not np.all((y == -1) | (y == 1)):
            raise ValueError("SmoothHingeSVM labels must be -1 or +1")
        return y.astype(self.dtype)

    def _forward(self, params, x):
        z = tf.linalg.matvec(x, params[0])
        return z + params[1] if self.use_bias else z

    def _loss(self, z, y):
        s = y * z
        if self.temp == 0:
            return tf.nn.relu(1.0 - s)
        return self.temp * tf.nn.softplus((1.0 - s) / self.temp)

    def _fit_linear_svc(self) -> np.ndarray:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import LinearSVC

        svc = LinearSVC(C=1.0 / (self.n_train_ * self.weight_decay), loss="hinge", dual=True, tol=self.svc_tol,
                        max_iter=self.svc_max_iter, fit_intercept=self.use_bias, intercept_scaling=1.0,
                        random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            svc.fit(self.X_train_np_, self.y_train_np_)
        theta = svc.coef_.ravel()
        return np.append(theta, svc.intercept_[0]) if self.use_bias else theta

    def _train(self, theta0):
        if self.temp == 0:
            return self._fit_linear_svc()
        return self.minimize_lbfgs(theta0, tol=self.tol, maxiter=self.max_iter)

    def _retrain(self, theta0):
        return self._train(theta0)

    def decision_function(self, X) -> np.ndarray:
        return self.outputs(X)

    def predict(self, X) -> np.ndarray:
        return np.where(self.outputs(X) >= 0, 1, -1)

"""Binary logistic regression on Inception v3 features, usable end to end from pixels.

``p(fish | x) = sigmoid(w . f(x))`` with ``f`` the frozen 2048-d Inception features, no
bias, weight decay 0.001 (the paper's Sec. 5.1 model). As in the paper only the top
layer ``w`` is the parameter vector theta: the model is fitted, and its Hessian and
inverse-HVPs computed, on cached features exactly as :class:`BinaryLogisticRegression`.
With a feature network attached (:meth:`attach`), the same quantities run from pixels:

    I_up,loss(z, z_test) = -s_test . grad_w L(z),   grad_w L(z) = (sigmoid(w.f(x)) - y) f(x)

and its gradient with respect to the training image's pixels, ``d I_up,loss / d x``,
which is the paper's I_pert,loss direction used by the training-set attack (Fig 5).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from influence.models.logistic import BinaryLogisticRegression


class BinaryInceptionModel(BinaryLogisticRegression):
    """Top-layer logistic regression (theta = w in R^2048) over an Inception feature network."""

    def __init__(self, weight_decay: float = 0.001, **kwargs):
        super().__init__(weight_decay=weight_decay, **kwargs)
        self.feature_model_ = None
        self.preprocessing_ = None

    def attach(self, feature_model, preprocessing) -> "BinaryInceptionModel":
        """Attach the (frozen) Keras feature network and its pixel preprocessing."""
        self.feature_model_ = feature_model
        self.preprocessing_ = preprocessing
        self._tf_input_terms = None
        self._tf_forward = None
        return self

    @property
    def input_dtype(self) -> str:
        """dtype of the feature network's input (float32 for Inception)."""
        self._require_features()
        return str(getattr(self.feature_model_.inputs[0], "dtype", "float32")).replace("tf.", "")

    def _require_features(self):
        if self.feature_model_ is None:
            raise RuntimeError("no feature network attached: call attach(model, preprocessing) first")

    def features(self, inputs, batch_size: int = 32) -> np.ndarray:
        """Features (float64) of preprocessed inputs (n, 299, 299, 3).

        The forward pass is a compiled ``tf.function`` (one trace for any batch size):
        called once per attack iteration on a few images, an eager Keras call costs
        about twice as much as the compiled forward *and* backward pass.
        """
        from .features import apply_batched

        self._require_features()
        if getattr(self, "_tf_forward", None) is None:
            fm = self.feature_model_
            self._tf_forward = tf.function(lambda x: fm(x, training=False), reduce_retracing=True)
        inputs = np.asarray(inputs, dtype=self.input_dtype)
        if len(inputs) == 0:
            return np.zeros((0, self.feature_model_.output_shape[-1]), np.float64)
        return apply_batched(lambda x, training=False: self._tf_forward(tf.constant(x)), inputs,
                             batch_size).astype(np.float64)

    def _input_kernel(self):
        if getattr(self, "_tf_input_terms", None) is None:
            fm, dt = self.feature_model_, self.tf_dtype

            @tf.function(reduce_retracing=True)
            def terms(theta, x, y, s, reg):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    f = tf.cast(fm(x, training=False), dt)
                    z = tf.linalg.matvec(f, theta)
                    r = tf.sigmoid(z) - y
                    infl = -(r * tf.linalg.matvec(f, s)) - reg * tf.reduce_sum(s * theta)
                    total = tf.reduce_sum(infl)
                return infl, tape.gradient(total, x)

            self._tf_input_terms = terms
        return self._tf_input_terms

    def influence_from_inputs(self, s: np.ndarray, inputs, y, batch_size: int = 16,
                              include_regularizer: bool = True, with_gradient: bool = False):
        """``I_up,loss(z_j, z_test) = -s . grad_w L(z_j)`` from preprocessed images ``inputs``.

        ``s`` is ``s_test = H^-1 grad L(z_test)``. With ``with_gradient`` also returns the
        gradient of each value with respect to that image's inputs (same shape as
        ``inputs``): images are independent (BatchNorm in inference mode), so one backward
        pass over a batch gives every image's gradient.
        """
        self.require_fit()
        inputs = np.asarray(inputs, dtype=self.input_dtype)
        y = np.asarray(y, dtype=self.dtype).reshape(-1)
        if len(inputs) != len(y):
            raise ValueError(f"{len(inputs)} images but {len(y)} labels")
        s = tf.constant(np.asarray(s, dtype=self.dtype).reshape(-1))
        theta = tf.constant(self.theta_)
        reg = tf.constant(self.weight_decay if include_regularizer else 0.0, self.tf_dtype)
        kernel = self._input_kernel()
        vals, grads = [], []
        for start in range(0, len(inputs), batch_size):
            v, g = kernel(theta, tf.constant(inputs[start:start + batch_size]), tf.constant(y[start:start + batch_size]),
                          s, reg)
            vals.append(v.numpy())
            if with_gradient:
                grads.append(g.numpy())
        vals = np.concatenate(vals)
        return (vals, np.concatenate(grads)) if with_gradient else vals

    def predict_proba_from_inputs(self, inputs) -> np.ndarray:
        """(n, 2) class probabilities (dog, fish) from preprocessed images."""
        p1 = 1.0 / (1.0 + np.exp(-(self.features(inputs) @ self.theta_)))
        return np.stack([1 - p1, p1], axis=1)

"""The paper's small all-convolutional network (All-CNN-C variant) for 28x28 MNIST.

Layers (Keras 3, all convolutions VALID with tanh)::

    conv 3x3 s1 -> conv 3x3 s2 -> conv 3x3 s1 -> conv 3x3 s2 -> conv 3x3 s1   (8 channels each)
    -> conv 1x1 to 10 channels -> global average pool -> dense 10 -> 10

2,616 parameters. Convolution kernels start from a normal with std 2/sqrt(k^2 c_in), the
dense kernel from std 1/sqrt(10), biases at zero; weight decay applies to kernels only.
The forward pass is the Keras model's ``stateless_call`` on the flat parameter vector, so
gradients, HVPs and per-example gradients come from :class:`GenericNeuralNet`.

Training (:meth:`AllCNN._train`), documented because the paper's 500k Adam steps on a
GPU do not fit a CPU budget: ``adam_steps`` minibatch Adam steps (learning rate
``learning_rate``, batch ``train_batch_size``, the rate divided by 10 after
``decay_fractions`` of the steps, as the original's step decay), optionally followed by
``lbfgs_iter`` full-batch L-BFGS iterations (default 0). The final Adam moments, step
count and learning rate are kept (``adam_state_``, ``final_learning_rate_``).
``checkpoints=k`` saves ``(theta, learning rate)`` k times, evenly, during Adam
(``checkpoints_``: TracIn's checkpoints; the run itself is unchanged).

Leave-one-out re-training (:meth:`AllCNN.retrain_without`), as the paper: Adam continues
from the fitted parameters with that optimiser state and learning rate for
``retrain_steps`` steps. The minibatch sequence is fixed by ``retrain_seed`` and the
left-out point only gets weight 0 inside its batches, so a control re-training on the full
set (``retrain_without([])``) sees exactly the same batches: subtracting it cancels the
optimiser's drift and the minibatch noise, leaving the effect of the removed point.
``retrain="lbfgs"`` instead restarts L-BFGS on the reduced set for ``retrain_iter``
iterations.
"""
from __future__ import annotations

import logging
import os

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

from ..validation import check_number
from ..generic_neural_net import ParamBlock  # noqa: E402
from .base import Model  # noqa: E402
from ..utils import BatchSequence, bar, progress_on  # noqa: E402

logger = logging.getLogger(__name__)


class AllCNN(Model):
    """All-convolutional net; see the module docstring for layers, init and training."""

    #: the re-fit protocol's settings change no fitted result (re-fit journals are keyed by them)
    mutable_config = Model.mutable_config + ("retrain_iter", "retrain_steps", "retrain_seed",
                                             "retrain_learning_rate", "checkpoints")

    def __init__(self, n_classes: int = 10, channels: tuple = (8, 8, 8, 8, 8), strides: tuple = (1, 2, 1, 2, 1),
                 kernel_size: int = 3, weight_decay: float = 0.001, learning_rate: float = 1e-4,
                 adam_steps: int = 20000, train_batch_size: int = 500, decay_fractions: tuple = (0.5, 0.75),
                 lbfgs_iter: int = 0, lbfgs_tol: float = 1e-8, retrain_iter: int | None = None,
                 retrain: str = "adam", retrain_steps: int = 2000, retrain_seed: int = 17,
                 retrain_learning_rate: float | None = None, checkpoints: int = 0,
                 dtype: str = "float64", batch_size: int = 1000, **kwargs):
        super().__init__(weight_decay=weight_decay, dtype=dtype, batch_size=batch_size, **kwargs)
        self.n_classes = check_number("n_classes", n_classes, low=2, integer=True)
        self.channels = tuple(check_number("channels", c, low=1, integer=True) for c in channels)
        self.strides = tuple(check_number("strides", s_, low=1, integer=True) for s_ in strides)
        if len(self.strides) != len(self.channels):
            raise ValueError(f"strides must have one entry per conv layer ({len(self.channels)}), got {self.strides}")
        self.kernel_size = check_number("kernel_size", kernel_size, low=1, integer=True)
        self.learning_rate = check_number("learning_rate", learning_rate, low=0.0, low_open=True)
        self.adam_steps = check_number("adam_steps", adam_steps, low=0, integer=True)
        self.train_batch_size = check_number("train_batch_size", train_batch_size, low=1, integer=True)
        self.decay_fractions = tuple(check_number("decay_fractions", f, low=0.0, high=1.0) for f in decay_fractions)
        self.lbfgs_iter = check_number("lbfgs_iter", lbfgs_iter, low=0, integer=True)
        self.lbfgs_tol = check_number("lbfgs_tol", lbfgs_tol, low=0.0, low_open=True)
        self.retrain_iter = check_number("retrain_iter", retrain_iter, low=0, integer=True, allow_none=True)
        if retrain not in ("adam", "lbfgs"):
            raise ValueError("retrain must be 'adam' or 'lbfgs'")
        self.retrain = retrain
        self.retrain_steps = check_number("retrain_steps", retrain_steps, low=0, integer=True)
        self.retrain_seed = check_number("retrain_seed", retrain_seed, low=0, integer=True)
        self.retrain_learning_rate = check_number("retrain_learning_rate", retrain_learning_rate, low=0.0,
                                                  low_open=True, allow_none=True)
        self.checkpoints = int(checkpoints)
        self.checkpoints_ = []
        self.adam_state_ = None
        self.final_learning_rate_ = None

    # ------------------------------------------------------------------ architecture
    def build_keras_model(self, input_shape):
        """The Keras model whose ``stateless_call`` is the forward pass."""
        import keras

        if len(self.channels) != len(self.strides):
            raise ValueError("channels and strides must have the same length")
        inp = keras.Input(tuple(input_shape), dtype=self.dtype)
        x = inp
        for i, (ch, st) in enumerate(zip(self.channels, self.strides)):
            x = keras.layers.Conv2D(ch, self.kernel_size, strides=st, padding="valid", activation="tanh",
                                    dtype=self.dtype, name=f"conv{i + 1}")(x)
        x = keras.layers.Conv2D(self.n_classes, 1, activation="tanh", dtype=self.dtype, name="conv_1x1")(x)
        x = keras.layers.GlobalAveragePooling2D(dtype=self.dtype, name="pool")(x)
        out = keras.layers.Dense(self.n_classes, dtype=self.dtype, name="logits")(x)
        return keras.Model(inp, out, name="all_cnn_c")

    def _param_blocks(self, x_shape, y):
        if len(x_shape) != 3:
            raise ValueError(f"AllCNN takes images of shape (height, width, channels), got {x_shape}")
        self.keras_model_ = self.build_keras_model(x_shape)
        return [ParamBlock(v.path, tuple(v.shape), decay=v.path.endswith("kernel"))
                for v in self.keras_model_.trainable_variables]

    def _init_theta(self, rng):
        parts = []
        for b in self.blocks_:
            if b.name.endswith("bias"):
                parts.append(np.zeros(b.size))
            elif len(b.shape) == 4:
                k, _, c_in, _ = b.shape
                parts.append(rng.normal(0, 2.0 / np.sqrt(k * k * c_in), b.size))
            else:
                parts.append(rng.normal(0, 1.0 / np.sqrt(b.shape[0]), b.size))
        return np.concatenate(parts)

    predictive = "softmax"

    def _forward(self, params, x):
        return self.keras_model_.stateless_call(params, [], x)[0]

    def _kfac_taps(self, params, x):
        from .keras_taps import chain_taps

        block_of = {id(v): i for i, v in enumerate(self.keras_model_.trainable_variables)}
        return chain_taps(self.keras_model_, params, [], x, block_of, {})

    def _loss(self, logits, y):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

    def _encode_targets(self, y):
        y = np.asarray(y)
        if len(y) and (np.any(y != np.round(y)) or y.min() < 0 or y.max() >= self.n_classes):
            raise ValueError(f"class labels must be integers in [0, {self.n_classes - 1}]")
        return y.astype(np.int32)

    def predict(self, X) -> np.ndarray:
        return np.argmax(self.outputs(X), axis=1)

    def score(self, X, y) -> float:
        return float(np.mean(self.predict(X) == np.asarray(y)))

    # ------------------------------------------------------------------ training
    def _lr_schedule(self, steps: int) -> np.ndarray:
        step = np.arange(steps)
        return self.learning_rate * np.where(step < self.decay_fractions[0] * steps, 1.0,
                                             np.where(step < self.decay_fractions[1] * steps, 0.1, 0.01))

    def adam(self, theta0: np.ndarray, steps: int, seed: int | None = None, chunk: int = 100,
             state: tuple | None = None, learning_rates: np.ndarray | None = None,
             example_weights: np.ndarray | None = None, desc: str | None = "Adam",
             record_every: int | None = None, record: list | None = None) -> tuple[np.ndarray, tuple]:
        """Minibatch Adam on the objective; returns ``(theta, (m, v, t))``.

        Batches: epochs of a permutation of all n training indices drawn with ``seed``.
        ``example_weights`` (n,) re-weights the examples inside each batch, the batch
        gradient being ``sum_j w_j grad L_j / sum_j w_j`` (+ weight decay): a weight of 0
        removes a point while every other point keeps its place in the batch sequence,
        which couples a leave-one-out run to a control run step by step. ``state``
        continues from a previous run's moments and step count; ``learning_rates``
        (steps,) overrides the step-decay schedule. ``record_every`` steps, ``(theta, learning
        rate)`` is appended to ``record`` (TracIn's checkpoints; the batches are the same).
        """
        dt = self.tf_dtype
        n, b = self.n_train_, min(self.train_batch_size, self.n_train_)
        p = self.n_params
        run, (theta, m, v, t, weights) = self._adam_kernel()
        theta.assign(np.asarray(theta0, dtype=self.dtype))
        m.assign(np.zeros(p) if state is None else state[0])
        v.assign(np.zeros(p) if state is None else state[1])
        t.assign(0 if state is None else int(state[2]))
        weights.assign(np.ones(n) if example_weights is None else np.asarray(example_weights, float))
        lrs_all = self._lr_schedule(steps) if learning_rates is None else np.asarray(learning_rates, float)
        if len(lrs_all) != steps:
            raise ValueError(f"learning_rates must have {steps} entries")
        sequence = BatchSequence(n, b, self.seed if seed is None else seed)
        if record_every:
            chunk = min(chunk, int(record_every))
        shown = bar(total=steps, desc=desc, unit="step", enabled=progress_on(self.progress) and desc is not None)
        try:  # the bar counts steps (a heartbeat shows "Adam: 300/2000", not "0/1" for minutes)
            for start in range(0, steps, chunk):
                k = min(chunk, steps - start)
                run(self.X_train_, self.y_train_, tf.constant(sequence.take(k)),
                    tf.constant(lrs_all[start:start + k], dt))
                shown.update(k)
                if record_every and record is not None and (start + k) % int(record_every) == 0:
                    record.append((theta.numpy().copy(), float(lrs_all[start + k - 1])))
        finally:
            shown.close()
        return theta.numpy(), (m.numpy(), v.numpy(), int(t.numpy()))

    def _adam_kernel(self):
        """One compiled Adam loop per model and training-set size (variables re-assigned per call)."""
        key = (self.n_train_, self.n_params, self.dtype)
        cached = getattr(self, "_adam_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        dt = self.tf_dtype
        p, n = self.n_params, self.n_train_
        theta = tf.Variable(tf.zeros(p, dt))
        m = tf.Variable(tf.zeros(p, dt))
        v = tf.Variable(tf.zeros(p, dt))
        t = tf.Variable(0, dtype=tf.int64)
        weights = tf.Variable(tf.ones(n, dt))
        mask = tf.constant(self.decay_mask_, dt)
        wd = tf.constant(self.weight_decay, dt)
        b1, b2, eps = 0.9, 0.999, 1e-8

        def losses(th, x, y):
            return self._loss(self._forward(self.unflatten(th), x), y)

        @tf.function(reduce_retracing=True)
        def run(X, Y, batches, lrs):
            for j in tf.range(tf.shape(batches)[0]):
                idx = batches[j]
                w = tf.gather(weights, idx)
                with tf.GradientTape() as tape:
                    tape.watch(theta)
                    total = tf.reduce_sum(w * losses(theta, tf.gather(X, idx), tf.gather(Y, idx)))
                g = tape.gradient(total, theta) / tf.maximum(tf.reduce_sum(w), 1e-12) + wd * mask * theta
                t.assign_add(1)
                m.assign(b1 * m + (1 - b1) * g)
                v.assign(b2 * v + (1 - b2) * g * g)
                tf_t = tf.cast(t, dt)
                theta.assign_sub(lrs[j] * (m / (1 - b1 ** tf_t)) / (tf.sqrt(v / (1 - b2 ** tf_t)) + eps))

        self._adam_cache = (key, run, (theta, m, v, t, weights))
        return run, (theta, m, v, t, weights)

    def _train(self, theta0):
        theta = theta0
        if self.adam_steps:
            every = max(1, self.adam_steps // self.checkpoints) if self.checkpoints > 0 else None
            self.checkpoints_ = []
            theta, self.adam_state_ = self.adam(theta0, self.adam_steps, record_every=every, record=self.checkpoints_)
            self.final_learning_rate_ = float(self._lr_schedule(self.adam_steps)[-1])
        logger.info("after Adam: objective %.6g, gradient norm %.3g", *self._obj_and_gnorm(theta))
        if self.lbfgs_iter:
            theta = self._lbfgs(theta, self.lbfgs_iter)
            logger.info("after L-BFGS: objective %.6g, gradient norm %.3g", *self._obj_and_gnorm(theta))
        return theta

    def _retrain(self, theta0):
        return self._lbfgs(theta0, self.lbfgs_iter if self.retrain_iter is None else self.retrain_iter)

    @property
    def refits_by_own_training(self) -> bool:
        return self.retrain == "adam"

    def retrain_without(self, indices) -> np.ndarray:
        """Leave-out re-training from the fitted parameters (see the module docstring).

        ``retrain="adam"``: ``retrain_steps`` Adam steps continuing the training run's
        moments at its final learning rate, on the batch sequence of ``retrain_seed`` with
        the left-out points' weights set to 0 (an empty ``indices`` is the control run,
        which sees exactly the same batches). ``retrain="lbfgs"``: L-BFGS on the reduced set.
        """
        if self.retrain != "adam":
            return super().retrain_without(indices)
        self.require_fit()
        if getattr(self, "adam_state_", None) is None:
            raise RuntimeError("retrain='adam' needs the Adam state of training (fit with adam_steps > 0)")
        w = np.ones(self.n_train_)
        w[self.check_indices(indices)] = 0.0
        lrs = np.full(self.retrain_steps, self.final_learning_rate_ if self.retrain_learning_rate is None
                      else self.retrain_learning_rate)
        theta, _ = self.adam(self.theta_.copy(), self.retrain_steps, seed=self.retrain_seed, state=self.adam_state_,
                             learning_rates=lrs, example_weights=w, desc=None)
        return theta

    def restore_fit(self, X, y, theta, adam_state=None, final_learning_rate=None) -> "AllCNN":
        """Hold the training set and a fit recorded earlier (theta, and the Adam state and final
        learning rate that ``retrain='adam'`` continues from) without training again."""
        self.set_training_data(X, y).set_theta(theta)
        self.restore_training_state(adam_state, final_learning_rate)
        self.grad_norm_ = float(np.linalg.norm(self.gradient()))
        return self

    def restore_training_state(self, adam_state, final_learning_rate) -> "AllCNN":
        """The Adam state ``(m, v, t)`` and final learning rate of the training that produced
        theta (recorded by an earlier run), for ``retrain='adam'``."""
        if adam_state is not None:
            m, v, t = adam_state
            m, v = np.asarray(m, dtype=self.dtype), np.asarray(v, dtype=self.dtype)
            if m.shape != (self.n_params,) or v.shape != (self.n_params,):
                raise ValueError(f"adam_state: m and v must have {self.n_params} entries, got {m.shape}, {v.shape}")
            adam_state = (m, v, int(t))
        self.adam_state_ = adam_state
        self.final_learning_rate_ = (None if final_learning_rate is None else
                                     check_number("final_learning_rate", final_learning_rate, low=0.0, low_open=True))
        return self

    def __getstate__(self):
        state = super().__getstate__()
        state["adam_state"] = getattr(self, "adam_state_", None)
        state["final_learning_rate"] = getattr(self, "final_learning_rate_", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.adam_state_ = state.get("adam_state")
        self.final_learning_rate_ = state.get("final_learning_rate")

    def _lbfgs(self, theta0, iters):
        if not iters:
            return theta0
        return self.minimize_lbfgs(theta0, tol=self.lbfgs_tol, maxiter=iters, newton_polish=False)

    def _obj_and_gnorm(self, theta):
        f, g = self.objective_and_gradient(theta)
        return f, float(np.linalg.norm(g))

"""The base class every model derives from: objective, gradients, HVPs and influence.

Conventions (used everywhere in this package)
---------------------------------------------
Parameters of interest ``theta`` are one flat vector of length ``p``, the concatenation
of the blocks a subclass declares (:class:`ParamBlock`). The training objective over
the ``n`` training points is::

    R(theta) = (1/n) sum_i L(z_i, theta) + (wd/2) * ||theta_decay||^2

where ``theta_decay`` holds the blocks declared with ``decay=True`` (weights, not
biases), exactly as the original code's ``wd * l2_loss(w)``. ``H`` is the Hessian of
``R`` at the fitted parameters.

Curvature: with ``curvature="gauss-newton"`` every solver uses, in place of ``H``, the
generalised Gauss-Newton matrix::

    G = (1/n) sum_i J_i^T [d^2 L / d f^2](f_i) J_i + wd * diag(decay mask)

with ``f_i`` the model's outputs (logits) on ``z_i`` and ``J_i = d f_i / d theta``. It
drops the term of ``H`` that carries the outputs' own curvature, ``sum_k dL/df_k
d^2 f_k / d theta^2``, so ``G`` is positive semi-definite for every loss that is convex
in the outputs (softmax, sigmoid, squared, smooth hinge) even where ``H`` is not (a
non-convex network, or away from a minimum), and CG needs no damping heuristic. ``G = H``
exactly when the outputs are linear in ``theta`` (the logistic models, the SVM, a
network's last layer over frozen features).

Influence quantities (Koh & Liang 2017, Sec. 2), for a training point ``z`` and test
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

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize
import tensorflow as tf

from .utils import atomic_path, hash_arrays

logger = logging.getLogger(__name__)


class _DropPforWhileLoopWarnings(logging.Filter):
    """vectorized_map cannot vectorise some ops (e.g. Conv2DBackpropFilter) and warns once
    per trace; the per-example gradients are still right, so the warning only clutters logs."""

    def filter(self, record):
        return "uses a while_loop" not in record.getMessage()


tf.get_logger().addFilter(_DropPforWhileLoopWarnings())


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


@dataclass(frozen=True)
class ParamBlock:
    """One block of the flat parameter vector: a name, a shape, and whether it is decayed."""

    name: str
    shape: tuple[int, ...]
    decay: bool = True

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def _progress(iterable, total=None, desc=None, enabled=True):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


class GenericNeuralNet:
    """Base class: a differentiable model with a flat parameter vector and influence tools.

    Subclasses implement :meth:`_param_blocks` (shapes), :meth:`_forward` (outputs from
    parameters and inputs) and :meth:`_loss` (per-example loss from outputs and encoded
    targets), and may override :meth:`_encode_targets`, :meth:`_init_theta` and
    :meth:`_train`. Every constructor argument must be stored as an attribute of the
    same name (used by :meth:`get_config`, :meth:`clone` and pickling).

    Parameters
    ----------
    weight_decay : float
        ``wd`` in the objective (see module docstring).
    dtype : str
        Floating type of parameters and computation ("float64" for convex models).
    batch_size : int
        Examples per batch in sums over the training set (objective, HVP, scores).
    cache_dir : str or None
        Where ``s_test`` vectors are cached (None: no cache).
    seed : int
        Seed for parameter initialisation and stochastic solvers.
    max_hessian_params : int
        Largest ``p`` for which an explicit Hessian is formed.
    progress : bool
        Show tqdm progress bars on long loops.
    curvature : {"hessian", "gauss-newton"}
        The matrix every solver inverts: the Hessian ``H`` of the objective, or the
        Gauss-Newton matrix ``G`` (module docstring). May be changed after fitting.
    strategy : tf.distribute.Strategy or None
        When given, every sum over the training set (objective, gradient, HVP) and every
        per-example pass (scores, per-example gradients) splits each batch across the
        strategy's replicas (e.g. ``MirroredStrategy`` over several GPUs) and combines the
        results; numbers equal the single-device ones up to summation order.
    """

    multi_output_targets = False  # targets of shape (n, ...) (e.g. several regression outputs), not only (n,)

    def __init__(self, weight_decay: float = 0.0, dtype: str = "float64", batch_size: int = 8192,
                 cache_dir: str | None = None, seed: int = 0, max_hessian_params: int = 10000,
                 progress: bool = False, curvature: str = "hessian", strategy=None):
        self.weight_decay = float(weight_decay)
        self.curvature = _check_curvature(curvature)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.cache_dir = cache_dir
        self.seed = int(seed)
        self.max_hessian_params = int(max_hessian_params)
        self.progress = progress
        self.strategy = strategy
        self._built = False

    # ------------------------------------------------------------------ subclass hooks
    def _param_blocks(self, x_shape: tuple[int, ...], y: np.ndarray) -> list[ParamBlock]:
        raise NotImplementedError

    def _forward(self, params: list[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def _loss(self, outputs: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Per-example loss, shape (batch,)."""
        raise NotImplementedError

    def _encode_targets(self, y: np.ndarray) -> np.ndarray:
        """Validate labels and convert them to what :meth:`_loss` takes."""
        return np.asarray(y)

    def _init_theta(self, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(self.n_params)

    def _train(self, theta0: np.ndarray) -> np.ndarray:
        """Minimise the objective from ``theta0``; default: L-BFGS, then Newton-CG polish."""
        return self.minimize_lbfgs(theta0)

    def _retrain(self, theta0: np.ndarray) -> np.ndarray:
        """Re-fit after the training set changed (LOO); default: same as :meth:`_train`."""
        return self._train(theta0)

    # ------------------------------------------------------------------ configuration
    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, read back from the attributes of the same names."""
        cfg = {}
        for cls in type(self).__mro__:
            if "__init__" not in cls.__dict__:
                continue
            for name, par in inspect.signature(cls.__init__).parameters.items():
                if name == "self" or par.kind in (par.VAR_POSITIONAL, par.VAR_KEYWORD) or name in cfg:
                    continue
                cfg[name] = getattr(self, name)
        return cfg

    def _cache_identity(self) -> dict:
        """What, besides theta and the data, tells this model's cached results apart: the
        class and its configuration (subclasses add what the configuration's strings miss)."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}",
                **{k: str(v) for k, v in self.get_config().items() if k not in ("cache_dir", "progress", "strategy")}}

    def clone(self) -> "GenericNeuralNet":
        """A new, unfitted model with the same configuration."""
        return type(self)(**self.get_config())

    def __getstate__(self):
        state = {"config": {**self.get_config(), "strategy": None}}  # a strategy does not cross processes
        if self._built:
            state.update(theta=self.theta_, X=self.X_train_np_, y=self.y_train_np_)
        return state

    def __setstate__(self, state):
        self.__init__(**state["config"])
        if "theta" in state:
            self.set_training_data(state["X"], state["y"])
            self.set_theta(state["theta"])

    # ------------------------------------------------------------------ data and params
    @property
    def tf_dtype(self) -> tf.DType:
        return tf.as_dtype(self.dtype)

    def _check_x(self, X, name="X") -> np.ndarray:
        X = np.asarray(X)
        if X.ndim < 2:
            raise ValueError(f"{name} must have shape (n_examples, ...features), got shape {X.shape}")
        if self._built and X.shape[1:] != self.x_shape_:
            raise ValueError(f"{name} has example shape {X.shape[1:]}, the model was built for {self.x_shape_}")
        if not np.issubdtype(X.dtype, np.number):
            raise ValueError(f"{name} must be numeric, got dtype {X.dtype}")
        X = X.astype(self.dtype, copy=False)
        if not np.all(np.isfinite(X)):
            raise ValueError(f"{name} contains NaN or infinite values")
        return X

    def _check_xy(self, X, y, name="X") -> tuple[np.ndarray, np.ndarray]:
        X = self._check_x(X, name)
        y = np.asarray(y)
        if self.multi_output_targets:
            if y.ndim < 1 or len(y) != len(X) or (self._built and y.shape[1:] != self.y_shape_):
                want = self.y_shape_ if self._built else ("...",)
                raise ValueError(f"targets must have shape {(len(X), *want)}, got {y.shape}")
        elif y.ndim != 1 or len(y) != len(X):
            raise ValueError(f"labels must have shape ({len(X)},), got {y.shape}")
        if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)):
            raise ValueError("labels contain NaN or infinite values")
        return X, self._encode_targets(y)

    def set_training_data(self, X, y) -> "GenericNeuralNet":
        """Store the training set (builds the parameter layout on first call)."""
        X = self._check_x(X, "X_train")
        if not self._built:
            self.x_shape_ = tuple(X.shape[1:])
            self.y_shape_ = tuple(np.shape(y)[1:])
            self.blocks_ = list(self._param_blocks(self.x_shape_, np.asarray(y)))
            self.n_params = sum(b.size for b in self.blocks_)
            self.decay_mask_ = np.concatenate(
                [np.full(b.size, 1.0 if b.decay else 0.0) for b in self.blocks_]).astype(self.dtype)
            self._compile()
            self._built = True
            if not hasattr(self, "theta_"):
                self.theta_ = self._init_theta(np.random.default_rng(self.seed)).astype(self.dtype)
        X, y_enc = self._check_xy(X, y, "X_train")
        if len(X) == 0:
            raise ValueError("the training set is empty")
        self.X_train_np_, self.y_train_np_ = X, np.asarray(y)
        self.X_train_ = tf.constant(X)
        self.y_train_ = tf.constant(y_enc)
        self.n_train_ = len(X)
        self._data_fingerprint = None
        self._hessian_cache = None
        return self

    @property
    def data_fingerprint_(self) -> str:
        """Hash of the training set (computed on first use)."""
        if self._data_fingerprint is None:
            self._data_fingerprint = hash_arrays(self.X_train_np_, self.y_train_np_)
        return self._data_fingerprint

    @property
    def state_key_(self) -> tuple:
        """What a cached solve depends on: theta, the training data and the curvature."""
        return hash_arrays(self.theta_), self.data_fingerprint_, self.curvature

    def set_theta(self, theta) -> "GenericNeuralNet":
        theta = np.asarray(theta, dtype=self.dtype).reshape(-1)
        if theta.shape != (self.n_params,):
            raise ValueError(f"theta must have {self.n_params} entries, got {theta.size}")
        if not np.all(np.isfinite(theta)):
            raise ValueError("theta contains NaN or infinite values")
        self.theta_ = theta
        self._hessian_cache = None
        return self

    def fit(self, X, y, theta0=None) -> "GenericNeuralNet":
        """Store the training set and minimise the objective (warm start from ``theta0``)."""
        self.set_training_data(X, y)
        if theta0 is not None:
            self.set_theta(theta0)
        self.set_theta(self._train(self.theta_.copy()))
        self.grad_norm_ = float(np.linalg.norm(self.gradient()))
        logger.info("%s fitted: objective %.10g, gradient norm %.3g", type(self).__name__,
                    self.objective(), self.grad_norm_)
        return self

    def retrain_without(self, indices) -> np.ndarray:
        """Parameters re-fitted without the given training points, warm-started from theta.

        The objective is normalised over the remaining points. The model itself is left
        as it was. Subclasses with a different retraining protocol override this.
        """
        self._require_fit()
        keep = np.ones(self.n_train_, dtype=bool)
        keep[self._check_indices(indices)] = False
        X, y, theta = self.X_train_np_, self.y_train_np_, self.theta_
        try:
            self.set_training_data(X[keep], y[keep])
            self.set_theta(theta)
            return self._retrain(theta.copy())
        finally:
            self.set_training_data(X, y)
            self.set_theta(theta)

    def _require_fit(self):
        if not self._built:
            raise RuntimeError(f"{type(self).__name__} has no training data: call fit() first")

    def unflatten(self, theta: tf.Tensor) -> list[tf.Tensor]:
        """Split the flat vector into the blocks' shapes."""
        parts = tf.split(theta, [b.size for b in self.blocks_])
        return [tf.reshape(t, b.shape) for t, b in zip(parts, self.blocks_)]

    def params(self) -> dict[str, np.ndarray]:
        """The fitted parameters by block name."""
        return {b.name: t.numpy() for b, t in zip(self.blocks_, self.unflatten(tf.constant(self.theta_)))}

    # ------------------------------------------------------------------ compiled kernels
    def _compile(self):
        """Build the tf.function kernels; each takes theta and a batch explicitly."""
        dt = self.tf_dtype
        mask = tf.constant(self.decay_mask_, dtype=dt)
        wd = tf.constant(self.weight_decay, dtype=dt)
        self._mask_tf = mask

        def losses(theta, x, y):
            return self._loss(self._forward(self.unflatten(theta), x), y)

        def loss_sum_and_grad(theta, x, y):
            with tf.GradientTape() as tape:
                tape.watch(theta)
                total = tf.reduce_sum(losses(theta, x, y))
            return total, tape.gradient(total, theta)

        def hvp_sum(theta, x, y, v):
            # double backprop: grad_theta( grad_theta(sum L) . v )
            with tf.GradientTape() as outer:
                outer.watch(theta)
                _, g = loss_sum_and_grad(theta, x, y)
                gv = tf.reduce_sum(g * tf.stop_gradient(v))
            return outer.gradient(gv, theta)

        def hvp_sum_many(theta, x, y, V):
            # V: (p, k); returns (p, k) = sum_i H_i V, vectorised over the k columns
            with tf.GradientTape() as outer:
                outer.watch(theta)
                _, g = loss_sum_and_grad(theta, x, y)
                gV = tf.linalg.matvec(tf.stop_gradient(V), g, transpose_a=True)
            return tf.transpose(outer.jacobian(gV, theta, experimental_use_pfor=True))

        def gnvp_sum(theta, x, y, v):
            # sum_i J_i^T [d2L/df2] J_i v: forward mode for J v, the outputs' loss Hessian on
            # it by double backprop through the loss only, reverse mode for J^T
            with tf.GradientTape() as tape:
                tape.watch(theta)
                with tf.autodiff.ForwardAccumulator(theta, v) as acc:
                    out = self._forward(self.unflatten(theta), x)
                jv = tf.stop_gradient(acc.jvp(out, unconnected_gradients=tf.UnconnectedGradients.ZERO))
            f = tf.stop_gradient(out)
            with tf.GradientTape() as outer:
                outer.watch(f)
                with tf.GradientTape() as inner:
                    inner.watch(f)
                    total = tf.reduce_sum(self._loss(f, y))
                gjv = tf.reduce_sum(inner.gradient(total, f) * jv)
            hjv = tf.stop_gradient(outer.gradient(gjv, f, unconnected_gradients=tf.UnconnectedGradients.ZERO))
            return tape.gradient(out, theta, output_gradients=hjv,
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)

        def gnvp_sum_many(theta, x, y, V):
            return tf.transpose(tf.vectorized_map(lambda v: gnvp_sum(theta, x, y, v), tf.transpose(V)))

        def per_example_grads(theta, x, y):
            def one(args):
                xi, yi = args
                return loss_sum_and_grad(theta, xi[None], yi[None])[1]
            return tf.vectorized_map(one, (x, y))

        def jvp_losses(theta, x, y, s):
            # s . grad L(z_i) for every i in the batch: one forward-mode pass
            with tf.autodiff.ForwardAccumulator(theta, s) as acc:
                out = losses(theta, x, y)
            return acc.jvp(out, unconnected_gradients=tf.UnconnectedGradients.ZERO)

        def input_grad_of_score(theta, x, y, s):
            # d/dx_i [ s . grad_theta L(z_i) ] for every i (each score depends on x_i only)
            with tf.GradientTape() as outer:
                outer.watch(x)
                _, g = loss_sum_and_grad(theta, x, y)
                score = tf.reduce_sum(g * tf.stop_gradient(s))
            return outer.gradient(score, x)

        def lissa_loop(theta, X, Y, v, idx, scale, damping, limit, gauss_newton):
            curv_sum = gnvp_sum if gauss_newton else hvp_sum
            depth = tf.shape(idx)[0]
            b = tf.cast(tf.shape(idx)[1], dt)

            def cond(j, est, norm):
                return (j < depth) & tf.math.is_finite(norm) & (norm < limit)

            def body(j, est, norm):
                xb = tf.gather(X, idx[j])
                yb = tf.gather(Y, idx[j])
                hv = curv_sum(theta, xb, yb, est) / b + wd * mask * est + damping * est
                est = v + est - hv / scale
                return j + 1, est, tf.norm(est)

            return tf.while_loop(cond, body, (tf.constant(0), v, tf.norm(v)))

        fn = lambda f: tf.function(f, reduce_retracing=True)  # noqa: E731
        self._tf_losses = fn(losses)
        self._tf_loss_sum_and_grad = fn(loss_sum_and_grad)
        self._tf_hvp_sum = fn(hvp_sum)
        self._tf_hvp_sum_many = fn(hvp_sum_many)
        self._tf_gnvp_sum = fn(gnvp_sum)
        self._tf_gnvp_sum_many = fn(gnvp_sum_many)
        self._tf_per_example_grads = fn(per_example_grads)
        self._tf_jvp_losses = fn(jvp_losses)
        self._tf_input_grad_of_score = fn(input_grad_of_score)
        self._tf_lissa_loop = fn(lissa_loop)

    # ------------------------------------------------------------------ batching helpers
    def _theta_tf(self, theta=None) -> tf.Tensor:
        return tf.constant(self.theta_ if theta is None else np.asarray(theta, dtype=self.dtype))

    def _slices(self, n: int, batch_size: int | None = None):
        bs = batch_size or self.batch_size
        return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]

    def _train_batches(self, indices=None, batch_size=None):
        """Yield (x, y) tensors over the training set or the given indices."""
        if indices is None:
            for sl in self._slices(self.n_train_, batch_size):
                yield self.X_train_[sl], self.y_train_[sl]
        else:
            indices = np.asarray(indices)
            for sl in self._slices(len(indices), batch_size):
                idx = tf.constant(indices[sl])
                yield tf.gather(self.X_train_, idx), tf.gather(self.y_train_, idx)

    def _map_train(self, kernel, theta, *extra, reduce: str = "sum", indices=None, batch_size=None,
                   desc: str | None = None):
        """Apply ``kernel(theta, x, y, *extra)`` to every training batch; sum or concatenate.

        Under a distribution strategy each batch is split into one contiguous shard per
        replica; sums add the replicas' results, concatenations keep the shards' order.
        """
        n = self.n_train_ if indices is None else len(indices)
        batches = self._train_batches(indices, batch_size)
        total, parts = None, []
        for x, y in _progress(batches, total=len(self._slices(n, batch_size)), desc=desc,
                              enabled=self.progress and desc is not None):
            out = self._run_on_replicas(kernel, theta, x, y, extra, reduce)
            if reduce == "sum":
                total = out if total is None else tf.nest.map_structure(np.add, total, out)
            else:
                parts.append(out)
        if reduce == "sum":
            return total
        return np.concatenate(parts) if parts else None

    def _run_on_replicas(self, kernel, theta, x, y, extra, reduce):
        strategy = self.strategy
        replicas = 1 if strategy is None else strategy.num_replicas_in_sync
        if replicas == 1 or int(x.shape[0]) < replicas:
            return tf.nest.map_structure(lambda t: t.numpy(), kernel(theta, x, y, *extra))
        bounds = np.linspace(0, int(x.shape[0]), replicas + 1).astype(int)

        def shard(t):
            return strategy.experimental_distribute_values_from_function(
                lambda ctx: t[bounds[ctx.replica_id_in_sync_group]:bounds[ctx.replica_id_in_sync_group + 1]])

        per_replica = strategy.run(kernel, args=(theta, shard(x), shard(y), *extra))
        local = [tf.nest.map_structure(lambda t: t.numpy(), r)
                 for r in zip(*[strategy.experimental_local_results(o) for o in tf.nest.flatten(per_replica)])]
        local = [tf.nest.pack_sequence_as(per_replica, list(r)) for r in local]
        if reduce == "sum":
            out = local[0]
            for r in local[1:]:
                out = tf.nest.map_structure(np.add, out, r)
            return out
        return np.concatenate(local)

    def _check_indices(self, indices) -> np.ndarray:
        if indices is None:
            return np.arange(self.n_train_)
        idx = np.atleast_1d(np.asarray(indices))
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"training indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        if len(idx) and (idx.min() < -self.n_train_ or idx.max() >= self.n_train_):
            raise IndexError(f"training index out of range for {self.n_train_} training points")
        return idx % self.n_train_

    def _rows_per_chunk(self) -> int:
        """How many p-vectors (e.g. per-example gradients) to hold at once: about 2e7 numbers."""
        return max(1, int(2e7 // max(self.n_params, 1)))

    def as_batch(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` as a batch: a single example (shape ``x_shape_``) gains a leading axis."""
        X, y = np.asarray(X), np.asarray(y)
        if X.ndim == len(self.x_shape_):
            return X[None], (y[None] if y.shape == self.y_shape_ else y)
        return X, y

    def _reg_value(self, theta: np.ndarray) -> float:
        return 0.5 * self.weight_decay * float(np.sum((self.decay_mask_ * theta) ** 2))

    # ------------------------------------------------------------------ objective & derivatives
    def objective_and_gradient(self, theta=None) -> tuple[float, np.ndarray]:
        """``R(theta)`` and its gradient over the whole training set."""
        self._require_fit()
        th_np = self.theta_ if theta is None else np.asarray(theta, dtype=self.dtype)
        total, grad = self._map_train(self._tf_loss_sum_and_grad, self._theta_tf(th_np))
        total = float(total)
        n = self.n_train_
        return (total / n + self._reg_value(th_np),
                grad / n + self.weight_decay * self.decay_mask_ * th_np)

    def objective(self, theta=None) -> float:
        return self.objective_and_gradient(theta)[0]

    def gradient(self, theta=None) -> np.ndarray:
        return self.objective_and_gradient(theta)[1]

    def losses(self, X, y, theta=None) -> np.ndarray:
        """Per-example loss (no regulariser) on any examples."""
        self._require_fit()
        X, y = self._check_xy(X, y)
        th = self._theta_tf(theta)
        return np.concatenate([self._tf_losses(th, tf.constant(X[sl]), tf.constant(y[sl])).numpy()
                               for sl in self._slices(len(X))]) if len(X) else np.zeros(0)

    def mean_loss(self, X, y, theta=None) -> float:
        return float(np.mean(self.losses(X, y, theta)))

    def train_losses(self, indices=None) -> np.ndarray:
        """Per-example training loss (no regulariser)."""
        idx = self._check_indices(indices)
        return self.losses(self.X_train_np_[idx], self.y_train_np_[idx])

    def outputs(self, X, theta=None) -> np.ndarray:
        """The model's raw outputs (logits or margins) on ``X``."""
        self._require_fit()
        X = self._check_x(X)
        th = self.unflatten(self._theta_tf(theta))
        return np.concatenate([self._forward(th, tf.constant(X[sl])).numpy() for sl in self._slices(len(X))])

    def loss_gradient(self, X, y, theta=None) -> np.ndarray:
        """Gradient of the mean loss (no regulariser) over the given examples."""
        self._require_fit()
        X, y = self._check_xy(X, y)
        if len(X) == 0:
            raise ValueError("no examples given")
        th = self._theta_tf(theta)
        g = np.zeros(self.n_params)
        for sl in self._slices(len(X)):
            g += self._tf_loss_sum_and_grad(th, tf.constant(X[sl]), tf.constant(y[sl]))[1].numpy()
        return g / len(X)

    def per_example_gradients(self, indices=None, include_regularizer: bool = True,
                              batch_size: int | None = None) -> np.ndarray:
        """Gradients ``g(z_i)`` for the given training indices, shape (m, p); vectorised."""
        self._require_fit()
        idx = self._check_indices(indices)
        th = self._theta_tf()
        bs = batch_size or min(self.batch_size, self._rows_per_chunk())
        if len(idx) == 0:
            return np.zeros((0, self.n_params))
        out = self._map_train(self._tf_per_example_grads, th, reduce="concat", indices=idx, batch_size=bs)
        if include_regularizer:
            out += self.weight_decay * self.decay_mask_ * self.theta_
        return out

    def hvp(self, v: np.ndarray, indices=None) -> np.ndarray:
        """``H v`` (or ``H V`` for a (p, k) matrix), H = Hessian of the objective.

        With ``curvature="gauss-newton"``: ``G v`` (module docstring). With ``indices``, the
        loss part is averaged over those training points only (a sub-sampled Hessian, as
        LiSSA uses); the regulariser is always included.
        """
        self._require_fit()
        v = np.asarray(v, dtype=self.dtype)
        if v.shape[0] != self.n_params or v.ndim not in (1, 2):
            raise ValueError(f"v must have shape ({self.n_params},) or ({self.n_params}, k), got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("v contains NaN or infinite values")
        th = self._theta_tf()
        vt = tf.constant(v)
        if _check_curvature(self.curvature) == "gauss-newton":
            kernel = self._tf_gnvp_sum if v.ndim == 1 else self._tf_gnvp_sum_many
        else:
            kernel = self._tf_hvp_sum if v.ndim == 1 else self._tf_hvp_sum_many
        idx = None if indices is None else self._check_indices(indices)
        n = self.n_train_ if idx is None else len(idx)
        out = self._map_train(kernel, th, vt, indices=idx)
        mask = self.decay_mask_ if v.ndim == 1 else self.decay_mask_[:, None]
        return out / n + self.weight_decay * mask * v

    def hessian(self) -> np.ndarray:
        """Explicit (p, p) Hessian of the objective, built from batched HVPs (cached per theta).

        With ``curvature="gauss-newton"``: the Gauss-Newton matrix ``G`` instead.
        """
        self._check_hessian_size()
        key = hash_arrays(self.theta_, self.curvature)
        if self._hessian_cache is not None and self._hessian_cache[0] == key:
            return self._hessian_cache[1]
        p = self.n_params
        chunk = min(p, 128)  # columns per batched HVP
        H = np.empty((p, p))
        for j in _progress(range(0, p, chunk), total=-(-p // chunk), desc="Hessian", enabled=self.progress):
            E = np.zeros((p, min(chunk, p - j)))
            E[np.arange(j, j + E.shape[1]), np.arange(E.shape[1])] = 1.0
            H[:, j:j + E.shape[1]] = self.hvp(E)
        H = 0.5 * (H + H.T)
        self._hessian_cache = (key, H)
        return H

    def _check_hessian_size(self):
        self._require_fit()
        if self.n_params > self.max_hessian_params:
            raise ValueError(f"explicit Hessian refused for p = {self.n_params} > max_hessian_params = "
                             f"{self.max_hessian_params}; use the 'cg' or 'lissa' solver")

    def hessian_eigenvalue_bounds(self, tol: float = 1e-4, maxiter: int | None = None) -> tuple[float, float]:
        """(smallest, largest) eigenvalue of H (or G, see ``curvature``) by Lanczos (ARPACK) on HVPs.

        A negative smallest eigenvalue means H is not positive definite at theta
        (non-convex model or not at a minimum): use damping at least its magnitude. Both
        come from ``eigsh`` at tolerance ``tol``, so the smallest is good only to about
        ``tol * largest`` in absolute terms: a small positive value does not prove H
        positive definite (``damping="auto"`` allows for this).
        """
        import scipy.sparse.linalg as spla

        self._require_fit()
        p = self.n_params
        if p <= 2:
            w = np.linalg.eigvalsh(self.hessian())
            return float(w[0]), float(w[-1])
        op = spla.LinearOperator((p, p), matvec=lambda v: self.hvp(np.ravel(v)), dtype=np.float64)
        v0 = np.random.default_rng(self.seed).standard_normal(p)
        maxiter = maxiter or max(100, 10 * p)
        lmax = spla.eigsh(op, k=1, which="LA", tol=tol, v0=v0, maxiter=maxiter, return_eigenvectors=False)[0]
        # smallest via the largest of (lmax I - H), which converges faster than which="SA"
        shifted = spla.LinearOperator((p, p), matvec=lambda v: lmax * np.ravel(v) - self.hvp(np.ravel(v)),
                                      dtype=np.float64)
        top = spla.eigsh(shifted, k=1, which="LA", tol=tol, v0=v0, maxiter=maxiter, return_eigenvectors=False)[0]
        lmin = float(lmax - top)
        if lmin < 0 and self.curvature == "hessian":
            logger.warning("Hessian has a negative eigenvalue (%.3g): the objective is not convex at theta; "
                           "use damping of at least %.3g for CG or LiSSA, or curvature='gauss-newton'", lmin, -lmin)
        elif lmin < 0:
            logger.warning("Gauss-Newton matrix has a negative eigenvalue (%.3g), which only round-off can give "
                           "(or a loss that is not convex in the outputs)", lmin)
        return lmin, float(lmax)

    # ------------------------------------------------------------------ training helpers
    def minimize_lbfgs(self, theta0: np.ndarray, tol: float = 1e-8, maxiter: int = 5000,
                       newton_polish: bool = True) -> np.ndarray:
        """Minimise R with scipy's L-BFGS-B, then (convex models) a few Newton-CG steps.

        L-BFGS stops at a max-abs gradient of ``tol``; the Newton polish (exact HVPs, CG
        inner solves) then drives the gradient norm towards machine precision, which makes
        leave-one-out differences of 1e-6 measurable.
        """
        res = scipy.optimize.minimize(self.objective_and_gradient, theta0, jac=True, method="L-BFGS-B",
                                      options=dict(maxiter=maxiter, maxcor=30, gtol=tol, ftol=1e-15, maxls=50))
        theta = res.x
        logger.debug("L-BFGS: %s iterations, %s", res.nit, res.message)
        if newton_polish:
            theta = self.newton_polish(theta, tol=tol)
        return theta

    def newton_polish(self, theta: np.ndarray, tol: float = 1e-8, max_steps: int = 5,
                      inner_tol: float = 1e-3) -> np.ndarray:
        """Inexact Newton steps ``theta -= H^-1 grad`` (inner CG to ``inner_tol``).

        Stops once ``||grad|| <= tol * 1e-2``, or when a step does not decrease the
        objective (e.g. a non-convex region).
        """
        from .solvers import conjugate_gradient

        saved = self.theta_
        try:
            f, g = self.objective_and_gradient(theta)
            for _ in range(max_steps):
                gn = np.linalg.norm(g)
                if gn <= tol * 1e-2 or not np.isfinite(gn):
                    break
                self.theta_ = np.asarray(theta, dtype=self.dtype)
                step, _, _ = conjugate_gradient(self.hvp, g, tol=inner_tol, maxiter=max(50, min(self.n_params, 500)))
                new = theta - step
                f_new, g_new = self.objective_and_gradient(new)
                if not f_new <= f + 1e-12 * abs(f):
                    break  # not a descent step: keep what we have
                theta, f, g = new, f_new, g_new
        finally:
            self.theta_ = saved
        return theta

    # ------------------------------------------------------------------ influence
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
            cached = _load_cached(Path(self.cache_dir) / f"s_test-{key}.npz", key)
            if cached is not None:
                logger.info("s_test loaded from cache %s", key[:12])
                return cached
        result = solver_obj.solve(self, v)
        if key is not None:
            _save_cached(Path(self.cache_dir) / f"s_test-{key}.npz", key, result)
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
        if out is None:
            return self._fill_influence_matrix(np.empty((k, len(idx))), X_test, y_test, idx, tc, set(),
                                               include_regularizer, solver, solver_options)
        if not resume:
            with atomic_path(out, suffix=".npy") as tmp:
                result = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=(k, len(idx)))
                self._fill_influence_matrix(result, X_test, y_test, idx, tc, set(), include_regularizer, solver,
                                            solver_options)
                result.flush()
                del result
            return np.load(out, mmap_mode="r")
        out = Path(out)
        partial, checkpoint = out.with_name(out.name + ".partial.npy"), out.with_name(out.name + ".partial.json")
        key = hash_arrays(self._cache_identity(), self.theta_, self.data_fingerprint_, X_test, y_test, idx,
                          include_regularizer, self._get_solver(solver, solver_options).config(), tc)
        done = _read_checkpoint(checkpoint, key) if partial.is_file() else None
        if done is None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            result, done = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float64, shape=(k, len(idx))), set()
            _write_checkpoint(checkpoint, key, done)
        else:
            result = np.load(partial, mmap_mode="r+")
            logger.info("influence_matrix: resuming %s, %d of %d test chunks already done", partial, len(done),
                        -(-k // tc))
        self._fill_influence_matrix(result, X_test, y_test, idx, tc, done, include_regularizer, solver,
                                    solver_options, checkpoint=(checkpoint, key))
        result.flush()
        del result
        os.replace(partial, out)
        checkpoint.unlink()
        return np.load(out, mmap_mode="r")

    def _fill_influence_matrix(self, result, X_test, y_test, idx, tc, done, include_regularizer, solver,
                               solver_options, checkpoint=None):
        """Rows of the influence matrix, one multi-column solve per chunk of ``tc`` test
        points not in ``done`` (their start rows); checkpointed after each chunk."""
        chunk = max(1, min(len(idx), self._rows_per_chunk()))
        for t in range(0, len(X_test), tc):
            if t in done:
                continue
            V = self.test_gradients(X_test[t:t + tc], y_test[t:t + tc])
            res = self.inverse_hvp(V.T, solver, **solver_options)
            logger.info("influence_matrix: %s solve for %d test points, %d iterations, relative residual %.2g",
                        res.solver, len(V), res.iterations, res.residual)
            S = res.x
            for j in _progress(range(0, len(idx), chunk), total=-(-len(idx) // chunk), desc="influence_matrix",
                               enabled=self.progress and isinstance(result, np.memmap)):
                G = self.per_example_gradients(idx[j:j + chunk], include_regularizer)
                result[t:t + tc, j:j + chunk] = -(G @ S).T
            if checkpoint is not None:
                result.flush()
                done.add(t)
                _write_checkpoint(*checkpoint, done)
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


CURVATURES = ("hessian", "gauss-newton")


def _read_checkpoint(path: Path, key: str) -> set | None:
    """The test-chunk start rows recorded as done in a checkpoint for ``key`` (None: no
    usable checkpoint, e.g. another computation's)."""
    import json

    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return set(info["done"]) if info.get("key") == key else None


def _write_checkpoint(path: Path, key: str, done: set) -> None:
    from .utils import write_json

    write_json(path, {"key": key, "done": sorted(done)})


def _check_curvature(curvature: str) -> str:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    return curvature


def _load_cached(path: Path, key: str):
    from .solvers import SolveResult

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            import json
            info = json.loads(str(f["info"]))
            return SolveResult(x=f["x"], **info)
    except Exception as exc:  # a broken cache file is recomputed, never trusted
        logger.warning("ignoring unreadable cache file %s (%s)", path, exc)
        return None


def _save_cached(path: Path, key: str, result) -> None:
    import json

    info = {k: v for k, v in result.as_dict().items() if k != "x"}
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, key=key, x=result.x, info=json.dumps(info, default=float))

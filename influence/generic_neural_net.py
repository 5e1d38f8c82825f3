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

The model holds the parameters, the forward pass, the per-example loss, the data, fit
and re-fit. The curvature is an operator object (:mod:`influence.curvature`), solvers are
fitted on it (:mod:`influence.solvers`), and the influence quantities are an
:class:`~influence.estimators.InfluenceFunction` over model, operator and solver; the
concrete models' ``hvp``, ``s_test``, ``influence_matrix``, ... are thin wrappers over a
per-model :class:`~influence.facade.Influence` (:mod:`influence.facade`).

The public model protocol (docs/architecture.md) is all that operators, solvers and
estimators use of a model: ``theta_``, ``n_params``, ``n_train_``, ``dtype``, ``weight_decay``,
``decay_mask_``, ``blocks_``, ``unflatten``, ``forward``, ``pointwise_loss``, ``kernels``,
``train_batches`` / ``map_train``, ``per_example_gradients``, ``test_gradients``,
``check_indices`` / ``check_xy``, ``closed_form_curvature`` (optional), ``kfac_taps``
(optional). Hyperparameters that determine a fitted result are fixed once the model holds
training data, and the training data and theta are private read-only copies, so nothing a
cache depends on can change behind it.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.optimize
import tensorflow as tf

from .curvature import check_curvature
from .model_kernels import GradientKernels
from .utils import bar, frozen_copy, hash_arrays, progress, progress_on
from .validation import check_choice, check_number

logger = logging.getLogger(__name__)


NONSTATIONARY = ("warn", "raise", "ignore")  # what fit() does when theta is not a stationary point


class NotStationaryError(RuntimeError):
    """The fitted theta is not a stationary point of the objective (``nonstationary="raise"``)."""


@dataclass(frozen=True)
class ParamBlock:
    """One block of the flat parameter vector: a name, a shape, and whether it is decayed."""

    name: str
    shape: tuple[int, ...]
    decay: bool = True

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


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
    progress : bool or "auto"
        Show tqdm progress bars on long loops (CG, L-BFGS fit, Lanczos, K-FAC, scoring,
        re-fits), each leaving a one-line summary. "auto" (default): when standard error is a
        terminal or a Jupyter kernel runs (``INFLUENCE_PROGRESS=0/1`` overrides).
    curvature : {"hessian", "gauss-newton"}
        The default matrix of the convenience methods (``s_test`` ...; each also takes
        ``curvature=``): the Hessian ``H`` of the objective, or the Gauss-Newton matrix
        ``G`` (module docstring).
    stationarity_tol : float
        Largest gradient norm ``||grad R(theta)||`` at which a fitted theta counts as a
        stationary point (influence functions assume one).
    nonstationary : {"warn", "raise", "ignore"}
        What :meth:`fit` does when the fit ends above ``stationarity_tol``: a WARNING with
        the gradient norm (default), :class:`NotStationaryError`, or nothing. Every solve
        records the gradient norm of the last fit in its ``info``.
    strategy : tf.distribute.Strategy or None
        When given, every sum over the training set (objective, gradient, HVP) and every
        per-example pass (scores, per-example gradients) splits each batch across the
        strategy's replicas (e.g. ``MirroredStrategy`` over several GPUs) and combines the
        results; numbers equal the single-device ones up to summation order.
    """

    multi_output_targets = False  # targets of shape (n, ...) (e.g. several regression outputs), not only (n,)
    #: the outputs are linear in theta (then H = G, and per-example curvatures are exact)
    linear_outputs = False
    #: most columns one batched HVP pass carries (a wider V is split): a many-column HVP holds one
    #: copy of the batch's activations per column. None: 1024 where the outputs are linear in
    #: theta, else 8 (see :meth:`influence.curvature.CurvatureOperator.columns_per_pass`).
    hvp_max_columns: int | None = None
    #: constructor arguments that may change after the model holds training data (they change
    #: no fitted result: progress bars, caches on disk, batch sizes, thresholds); every other
    #: one is fixed then (:meth:`__setattr__`)
    mutable_config = ("progress", "cache_dir", "strategy", "batch_size", "max_hessian_params", "curvature",
                      "stationarity_tol", "nonstationary", "retrain")

    def __init__(self, weight_decay: float = 0.0, dtype: str = "float64", batch_size: int = 8192,
                 cache_dir: str | None = None, seed: int = 0, max_hessian_params: int = 10000,
                 progress: bool | str = "auto", curvature: str = "hessian", strategy=None,
                 stationarity_tol: float = 1e-5, nonstationary: str = "warn"):
        self.weight_decay = check_number("weight_decay", weight_decay, low=0.0)
        self.curvature = check_curvature(curvature)
        if str(dtype) not in ("float32", "float64"):
            raise ValueError(f"dtype must be one of ('float32', 'float64'), got {dtype!r}")
        self.dtype = str(dtype)
        self.batch_size = check_number("batch_size", batch_size, low=1, integer=True)
        self.cache_dir = cache_dir
        self.seed = check_number("seed", seed, low=0, integer=True)
        self.max_hessian_params = check_number("max_hessian_params", max_hessian_params, low=1, integer=True)
        self.stationarity_tol = check_number("stationarity_tol", stationarity_tol, low=0.0)
        self.nonstationary = check_choice("nonstationary", nonstationary, NONSTATIONARY)
        if progress not in (True, False, "auto"):
            raise ValueError(f"progress must be True, False or 'auto', got {progress!r}")
        self.progress = progress
        self.strategy = strategy
        self._built = False

    @classmethod
    def _config_names(cls) -> frozenset:
        """The constructor arguments of this class (read from the signatures; kept on the class)."""
        names = cls.__dict__.get("_config_names_cache")
        if names is None:
            names = set()
            for klass in cls.__mro__:
                if "__init__" in klass.__dict__:
                    for name, par in inspect.signature(klass.__init__).parameters.items():
                        if name != "self" and par.kind not in (par.VAR_POSITIONAL, par.VAR_KEYWORD):
                            names.add(name)
            names = frozenset(names)
            type.__setattr__(cls, "_config_names_cache", names)
        return names

    def __setattr__(self, name, value):
        """Hyperparameters that determine a fitted result (``weight_decay``, ``dtype``, ``seed``,
        a subclass's own, ...: every constructor argument but :attr:`mutable_config`) are fixed
        once the model holds training data: theta, the compiled kernels and every cache keyed
        on the model depend on them. Use :meth:`with_config` for a copy with other values."""
        if (self.__dict__.get("_built") and name in self._config_names() and name not in self.mutable_config
                and name in self.__dict__):
            old = self.__dict__[name]
            same = old is value
            if not same:
                try:
                    same = bool(old == value) and type(old) is type(value)
                except Exception:  # arrays, objects without a plain equality
                    same = False
            if not same:
                raise AttributeError(
                    f"{type(self).__name__}.{name} is fixed once the model holds training data (now {old!r}; "
                    f"got {value!r}): theta, the compiled kernels and every cached factor depend on it. Use "
                    f"model.with_config({name}=...) for a copy at the same theta and data, or build a new "
                    f"model and fit it")
        object.__setattr__(self, name, value)

    def with_config(self, **changes) -> "GenericNeuralNet":
        """A new model with these constructor arguments changed, holding the same training data
        and theta (not re-fitted: call :meth:`fit` for the optimum of the new objective)."""
        unknown = sorted(set(changes) - set(self.get_config()))
        if unknown:
            raise ValueError(f"with_config: {unknown} are not constructor arguments of {type(self).__name__} "
                             f"(allowed: {sorted(self.get_config())})")
        new = type(self)(**{**self.get_config(), **changes})
        if self._built:
            new.set_training_data(self.X_train_np_, self.y_train_np_)
            new.set_theta(self.theta_)
        return new

    # ------------------------------------------------------------------ the public protocol
    def forward(self, params: list[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
        """The model's outputs (logits, margins) from the parameter blocks and a batch of inputs."""
        return self._forward(params, x)

    def pointwise_loss(self, outputs: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Per-example loss (batch,) from outputs and encoded targets (no regulariser)."""
        return self._loss(outputs, y)

    def kfac_taps(self, params: list[tf.Tensor], x: tf.Tensor):
        """``(outputs, taps)`` with each Dense/Conv2D layer's input and pre-activation exposed."""
        return self._kfac_taps(params, x)

    def sample_targets(self, outputs: tf.Tensor, seed: tf.Tensor, dtype) -> tf.Tensor:
        """Targets drawn from the model's predictive distribution at ``outputs`` (seeded)."""
        return self._sample_targets(outputs, seed, dtype)

    @property
    def kernels(self) -> GradientKernels:
        """The model's compiled gradient kernels (losses, gradients, per-example gradients, JVPs)."""
        self.require_fit()
        return self._kernels

    def margin_function(self):
        """``(margin(outputs, y), weight(margin))`` as TF functions where the model's output function
        for TRAK is not the log-odds of its predictive distribution (the smooth-hinge SVM), else None."""
        return None

    def closed_form_curvature(self):
        """An object with the model's closed-form curvature (products, explicit matrix), or None.

        The linear models return one (:class:`influence.models.logistic.SoftmaxCurvature`); the
        curvature operators use it in place of autodiff products where it applies."""
        return None

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

    #: the likelihood behind the loss ("softmax", "sigmoid", "squared"; None: none), whose
    #: targets the Monte Carlo Fisher of the Kronecker-factored solvers samples
    predictive: str | None = None

    def _kfac_taps(self, params: list[tf.Tensor], x: tf.Tensor):
        """``(outputs, taps)``: the forward pass with each Dense/Conv2D layer's input and
        pre-activation exposed (:class:`~influence.models.keras_taps.Tap`), for the
        Kronecker-factored solvers (``solver="kfac"`` / ``"ekfac"``)."""
        raise NotImplementedError(f"{type(self).__name__} declares no Kronecker-factorable layers; use another solver")

    def _sample_targets(self, outputs: tf.Tensor, seed: tf.Tensor, dtype) -> tf.Tensor:
        """Targets drawn from the model's predictive distribution at ``outputs`` (stateless, seeded)."""
        if self.predictive == "softmax":
            return tf.cast(tf.random.stateless_categorical(outputs, 1, seed)[:, 0], dtype)
        if self.predictive == "sigmoid":
            u = tf.random.stateless_uniform(tf.shape(outputs), seed, dtype=outputs.dtype)
            return tf.cast(u < tf.sigmoid(outputs), dtype)
        if self.predictive == "squared":  # L = (f - y)^2 / 2: y ~ N(f, 1)
            return tf.cast(outputs + tf.random.stateless_normal(tf.shape(outputs), seed, dtype=outputs.dtype), dtype)
        raise ValueError(f"{type(self).__name__}: its loss is not a likelihood the Monte Carlo Fisher can sample "
                         "from; use fisher='expectation'")

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

    def cache_identity(self) -> dict:
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
        if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
            raise ValueError(f"{name} must be real-valued and numeric, got dtype {X.dtype}")
        X = X.astype(self.dtype, copy=False)
        if not np.all(np.isfinite(X)):
            raise ValueError(f"{name} contains NaN or infinite values")
        return X

    def check_differentiable_inputs(self) -> None:
        """Raise where the loss has no gradient with respect to the inputs (``influence_pert_loss``)."""

    def _normalise_targets(self, y) -> np.ndarray:
        """Targets as the loss takes them (a subclass may accept other layouts, e.g. (n, 1) for one output)."""
        return np.asarray(y)

    def check_xy(self, X, y, name="X") -> tuple[np.ndarray, np.ndarray]:
        X = self._check_x(X, name)
        y = self._normalise_targets(y)
        if self.multi_output_targets:
            if y.ndim < 1 or len(y) != len(X) or (self._built and y.shape[1:] != self.y_shape_):
                want = self.y_shape_ if self._built else ("...",)
                raise ValueError(f"targets must have shape {(len(X), *want)}, got {y.shape}")
        elif y.ndim != 1 or len(y) != len(X):
            raise ValueError(f"labels must have shape ({len(X)},), got {y.shape}")
        if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)):
            raise ValueError("labels contain NaN or infinite values")
        return X, self._encode_targets(y)

    def _restoring_on_failure(self, fn, *args):
        """``fn(*args)``; if it raises, the model's attributes are put back as they were, so a
        failed call leaves no half-built layout (feature count, classes) behind."""
        saved = dict(vars(self))
        try:
            return fn(*args)
        except BaseException:
            vars(self).clear()
            vars(self).update(saved)
            raise

    def set_training_data(self, X, y) -> "GenericNeuralNet":
        """Store the training set (builds the parameter layout on first call)."""
        return self._restoring_on_failure(self._set_training_data, X, y)

    def _set_training_data(self, X, y) -> "GenericNeuralNet":
        X_in = X
        X = self._check_x(X, "X_train")
        y = self._normalise_targets(y)
        if len(X) == 0:
            raise ValueError("the training set is empty")
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
                self.theta_ = frozen_copy(self._init_theta(np.random.default_rng(self.seed)).astype(self.dtype))
        y_in = y
        X, y_enc = self.check_xy(X, y, "X_train")
        # private read-only copies: a caller's later `X *= 2` cannot change the fitted model
        self.X_train_np_, self.y_train_np_ = frozen_copy(X, X_in, y_in), frozen_copy(y, X_in, y_in)
        self.X_train_ = tf.constant(X)
        self.y_train_ = tf.constant(y_enc)
        self.n_train_ = len(X)
        self._data_fingerprint = None
        return self

    @property
    def data_fingerprint_(self) -> str:
        """Hash of the training set (computed on first use)."""
        if self._data_fingerprint is None:
            self._data_fingerprint = hash_arrays(self.X_train_np_, self.y_train_np_)
        return self._data_fingerprint

    def set_theta(self, theta) -> "GenericNeuralNet":
        theta = np.asarray(theta, dtype=self.dtype).reshape(-1)
        if theta.shape != (self.n_params,):
            raise ValueError(f"theta must have {self.n_params} entries, got {theta.size}")
        if not np.all(np.isfinite(theta)):
            raise ValueError("theta contains NaN or infinite values")
        self.theta_ = frozen_copy(theta, theta)  # the caller's array may change later; ours cannot
        return self

    def fit(self, X, y, theta0=None) -> "GenericNeuralNet":
        """Store the training set and minimise the objective (warm start from ``theta0``).

        A fit that fails (or ends at a non-finite objective) leaves the model as it was.
        Ending above ``stationarity_tol`` warns, raises or passes (``nonstationary``)."""
        return self._restoring_on_failure(self._fit, X, y, theta0)

    def _fit(self, X, y, theta0):
        self.set_training_data(X, y)
        if theta0 is not None:
            self.set_theta(theta0)
        theta = np.asarray(self._train(self.theta_.copy()))
        if not np.all(np.isfinite(theta)):
            raise FloatingPointError(f"{type(self).__name__}.fit diverged (theta not finite); scale the features or "
                                     f"raise weight_decay (now {self.weight_decay})")
        self.set_theta(theta)
        f, g = self.objective_and_gradient()
        self.grad_norm_ = float(np.linalg.norm(g))
        if not (np.isfinite(f) and np.isfinite(self.grad_norm_)):
            raise FloatingPointError(f"{type(self).__name__}.fit ended at objective {f} with gradient norm "
                                     f"{self.grad_norm_}: scale the features (their largest magnitude is "
                                     f"{float(np.max(np.abs(self.X_train_np_))):.3g})")
        logger.info("%s fitted: objective %.10g, gradient norm %.3g", type(self).__name__, f, self.grad_norm_)
        if self.grad_norm_ > self.stationarity_tol and self.nonstationary != "ignore":
            msg = (f"{type(self).__name__}.fit ended at gradient norm {self.grad_norm_:.3g} > stationarity_tol = "
                   f"{self.stationarity_tol:g}: theta is not a stationary point of the objective, and influence "
                   f"there is a different quantity (raise the optimiser's iterations, or pass "
                   f"nonstationary='ignore' if this is intended)")
            if self.nonstationary == "raise":
                raise NotStationaryError(msg)
            logger.warning(msg)
        return self

    #: whether :meth:`retrain_without` continues the model's own training (then theta need not be
    #: a stationary point of the objective: a control re-fit cancels the drift) rather than
    #: minimising the objective (then theta should be its minimiser)
    refits_by_own_training = False

    def retrain_without(self, indices) -> np.ndarray:
        """Parameters re-fitted without the given training points, warm-started from theta.

        The objective is normalised over the remaining points. The model itself is left
        as it was. Subclasses with a different retraining protocol override this.
        """
        self.require_fit()
        keep = np.ones(self.n_train_, dtype=bool)
        keep[self.check_indices(indices)] = False
        sub = self.on_training_subset(np.flatnonzero(keep))
        return sub._retrain(np.array(self.theta_))

    def _shallow_copy(self) -> "GenericNeuralNet":
        """A copy sharing the compiled kernels and the read-only arrays (:meth:`_after_copy` runs)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._after_copy()
        return new

    def _after_copy(self) -> None:
        """Hook: what a shallow copy must not share with its original (the facade's caches)."""

    def at_theta(self, theta) -> "GenericNeuralNet":
        """A copy of this model at other parameters (same configuration, data and compiled
        kernels); this model is left as it is."""
        self.require_fit()
        return self._shallow_copy().set_theta(theta)

    def on_training_subset(self, indices) -> "GenericNeuralNet":
        """A copy of this model (same configuration, compiled kernels and theta) whose training set
        is the given points; this model is left as it is (nothing is swapped in place)."""
        self.require_fit()
        idx = self.check_indices(indices)
        new = self._shallow_copy()  # shares the compiled kernels and the read-only arrays
        new.set_training_data(self.X_train_np_[idx], self.y_train_np_[idx])
        new.set_theta(self.theta_)
        return new

    def require_fit(self):
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
        """Build the model's gradient kernels (:class:`influence.model_kernels.GradientKernels`)."""
        self._kernels = GradientKernels(self)

    # ------------------------------------------------------------------ batching helpers
    def theta_tensor(self, theta=None) -> tf.Tensor:
        return tf.constant(self.theta_ if theta is None else np.asarray(theta, dtype=self.dtype))

    def slices(self, n: int, batch_size: int | None = None):
        bs = batch_size or self.batch_size
        return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]

    def train_batches(self, indices=None, batch_size=None):
        """Yield (x, y) tensors over the training set or the given indices."""
        if indices is None:
            for sl in self.slices(self.n_train_, batch_size):
                yield self.X_train_[sl], self.y_train_[sl]
        else:
            indices = np.asarray(indices)
            for sl in self.slices(len(indices), batch_size):
                idx = tf.constant(indices[sl])
                yield tf.gather(self.X_train_, idx), tf.gather(self.y_train_, idx)

    def map_train(self, kernel, theta, *extra, reduce: str = "sum", indices=None, batch_size=None,
                   desc: str | None = None):
        """Apply ``kernel(theta, x, y, *extra)`` to every training batch; sum or concatenate.

        Under a distribution strategy each batch is split into one contiguous shard per
        replica; sums add the replicas' results, concatenations keep the shards' order.
        """
        n = self.n_train_ if indices is None else len(indices)
        batches = self.train_batches(indices, batch_size)
        total, parts = None, []
        for x, y in progress(batches, total=len(self.slices(n, batch_size)), desc=desc,
                              enabled=progress_on(self.progress) and desc is not None):
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

    def check_indices(self, indices) -> np.ndarray:
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

    def rows_per_chunk(self) -> int:
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
        self.require_fit()
        th_np = self.theta_ if theta is None else np.asarray(theta, dtype=self.dtype)
        total, grad = self.map_train(self._kernels.loss_sum_and_grad, self.theta_tensor(th_np))
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
        self.require_fit()
        X, y = self.check_xy(X, y)
        th = self.theta_tensor(theta)
        return np.concatenate([self._kernels.losses(th, tf.constant(X[sl]), tf.constant(y[sl])).numpy()
                               for sl in self.slices(len(X))]) if len(X) else np.zeros(0)

    def mean_loss(self, X, y, theta=None) -> float:
        return float(np.mean(self.losses(X, y, theta)))

    def train_losses(self, indices=None) -> np.ndarray:
        """Per-example training loss (no regulariser)."""
        idx = self.check_indices(indices)
        return self.losses(self.X_train_np_[idx], self.y_train_np_[idx])

    def outputs(self, X, theta=None) -> np.ndarray:
        """The model's raw outputs (logits or margins) on ``X``."""
        self.require_fit()
        X = self._check_x(X)
        th = self.unflatten(self.theta_tensor(theta))
        return np.concatenate([self._forward(th, tf.constant(X[sl])).numpy() for sl in self.slices(len(X))])

    def loss_gradient(self, X, y, theta=None) -> np.ndarray:
        """Gradient of the mean loss (no regulariser) over the given examples."""
        self.require_fit()
        X, y = self.check_xy(X, y)
        if len(X) == 0:
            raise ValueError("no examples given")
        th = self.theta_tensor(theta)
        g = np.zeros(self.n_params)
        for sl in self.slices(len(X)):
            g += self._kernels.loss_sum_and_grad(th, tf.constant(X[sl]), tf.constant(y[sl]))[1].numpy()
        return g / len(X)

    def test_gradient(self, X_test, y_test) -> np.ndarray:
        """``grad L(z_test)``: gradient of the mean test loss, without the regulariser."""
        return self.loss_gradient(*self.as_batch(X_test, y_test))

    def test_gradients(self, X_test, y_test) -> np.ndarray:
        """``grad L(z_test_k)`` for each test point separately, shape (k, p); vectorised."""
        self.require_fit()
        X_test, y_test = self.check_xy(X_test, y_test, "X_test")
        th = self.theta_tensor()
        if len(X_test) == 0:
            return np.zeros((0, self.n_params))
        bs = min(self.batch_size, self.rows_per_chunk())
        kernel = self._kernels.per_example_grads
        return np.concatenate([kernel(th, tf.constant(X_test[sl]), tf.constant(y_test[sl])).numpy()
                               for sl in self.slices(len(X_test), bs)])

    def per_example_gradients(self, indices=None, include_regularizer: bool = True,
                              batch_size: int | None = None) -> np.ndarray:
        """Gradients ``g(z_i)`` for the given training indices, shape (m, p); vectorised."""
        self.require_fit()
        idx = self.check_indices(indices)
        th = self.theta_tensor()
        bs = batch_size or min(self.batch_size, self.rows_per_chunk())
        if len(idx) == 0:
            return np.zeros((0, self.n_params))
        out = self.map_train(self._kernels.per_example_grads, th, reduce="concat", indices=idx, batch_size=bs)
        if include_regularizer:
            out += self.weight_decay * self.decay_mask_ * self.theta_
        return out

    # ------------------------------------------------------------------ training helpers
    def minimize_lbfgs(self, theta0: np.ndarray, tol: float = 1e-8, maxiter: int = 5000,
                       newton_polish: bool = True) -> np.ndarray:
        """Minimise R with scipy's L-BFGS-B, then (convex models) a few Newton-CG steps.

        L-BFGS stops at a max-abs gradient of ``tol``; the Newton polish (exact HVPs, CG
        inner solves) then drives the gradient norm towards machine precision, which makes
        leave-one-out differences of 1e-6 measurable.
        """
        shown = bar(total=maxiter, desc="L-BFGS fit", enabled=progress_on(self.progress))

        def tick(intermediate_result):
            shown.set_postfix_str(f"objective {float(intermediate_result.fun):.10g}", refresh=False)
            shown.update(1)

        try:
            res = scipy.optimize.minimize(self.objective_and_gradient, theta0, jac=True, method="L-BFGS-B",
                                          callback=tick,
                                          options=dict(maxiter=maxiter, maxcor=30, gtol=tol, ftol=1e-15, maxls=50))
        finally:
            shown.close()
        theta = res.x
        logger.debug("L-BFGS: %s iterations, %s", res.nit, res.message)  # fit() checks where it ended
        if newton_polish:
            theta = self.newton_polish(theta, tol=tol)
        return theta

    def newton_polish(self, theta: np.ndarray, tol: float = 1e-8, max_steps: int = 5,
                      inner_tol: float = 1e-3) -> np.ndarray:
        """Inexact Newton steps ``theta -= H^-1 grad`` (inner CG to ``inner_tol``).

        Stops once ``||grad|| <= tol * 1e-2``, or when a step does not decrease the
        objective (e.g. a non-convex region).
        """
        from .curvature import HessianOperator
        from .solvers import conjugate_gradient

        op = None
        f, g = self.objective_and_gradient(theta)
        for _ in range(max_steps):
            gn = np.linalg.norm(g)
            if gn <= tol * 1e-2 or not np.isfinite(gn):
                break
            # H at this theta (the model's own theta is not touched; compiled products shared)
            op = HessianOperator(self, theta=theta) if op is None else op.at(theta)
            step, _, _ = conjugate_gradient(op.hvp, g, tol=inner_tol, maxiter=max(50, min(self.n_params, 500)))
            new = theta - step
            f_new, g_new = self.objective_and_gradient(new)
            if not f_new <= f + 1e-12 * abs(f):
                break  # not a descent step: keep what we have
            theta, f, g = new, f_new, g_new
        return theta

"""Influence functions for your own Keras 3 model.

:class:`KerasModel` wraps a built ``keras.Model`` that maps a batch of inputs to logits
(or to predictions, for the squared loss). Its parameters of interest ``theta`` are the
model's trainable variables, or only those of the layers named in ``trainable`` (e.g.
the last layer over a frozen feature extractor, as the paper's Inception model); every
other variable, and the non-trainable state (batch-norm statistics), stays fixed at its
current value. The forward pass is the model's ``stateless_call`` in inference mode, so
gradients, HVPs, per-example gradients and every influence quantity come from
:class:`~influence.generic_neural_net.GenericNeuralNet` unchanged.

The objective is the base class's ``(1/n) sum_i L(z_i) + (wd/2) ||theta_decay||^2`` with
``L`` one of

- ``"softmax"``: cross-entropy of integer labels in ``[0, k)`` on logits of shape (b, k);
- ``"sigmoid"``: cross-entropy of 0/1 labels on logits of shape (b,) or (b, 1);
- ``"squared"``: ``(prediction - y)^2 / 2`` for real targets, predictions (b,) or (b, 1);
  several outputs (b, k) with targets (b, k): summed over the outputs;
- any callable ``loss(outputs, y) -> (b,)`` of TF ops: the per-example loss, given the
  model's outputs as they come and the targets (integers as int32, else the model's
  float type). It must be twice differentiable in the outputs for HVPs.

and decay on the variables whose path ends in ``kernel`` (not biases, not batch-norm).
The frozen weights and state are read once, when the wrapper first sees training data;
``theta`` lives in the wrapper (``update_keras_model`` copies it back).

Two ways in::

    wrapped = KerasModel(keras_model, loss="softmax", weight_decay=1e-3)
    wrapped.set_training_data(X_train, y_train)   # theta = the model's current weights
    wrapped.fit(X_train, y_train)                  # or: re-fit theta by L-BFGS from them

Leave-one-out re-fits (``retrain_without``, :func:`~influence.refit_validation.leave_one_out`):
by default L-BFGS on the objective above from the current theta (right after :meth:`fit`);
``retrain=KerasRetrain(steps=..., batch_size=...)`` instead continues training the way Keras
trained the network: minibatch steps of the network's compiled optimizer (a fresh copy of it:
same class and settings, new moments) on the objective above, over a batch sequence fixed by
its ``seed`` in which a left-out point keeps its place with weight 0, so that the control
re-fit (``leave_one_out(..., control=True)``) sees the same batches and cancels the
optimiser's drift. ``retrain=callable(net, X, y)`` trains a copy of the network (holding the
current theta) in place on the kept points, as you like.

Influence functions assume ``theta`` minimises the objective: after training with Keras
(different regulariser, early stopping, minibatch noise) check ``wrapped.gradient()``,
and for a non-convex model use ``damping`` (``hessian_eigenvalue_bounds`` tells how much)
or ``curvature="gauss-newton"`` (positive semi-definite wherever the weights are).
Use ``dtype="float64"`` layers for the tightest numbers; the wrapper computes in the
model's own dtype.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

from ..generic_neural_net import ParamBlock  # noqa: E402
from .base import Model  # noqa: E402
from ..utils import frozen_copy  # noqa: E402

LOSSES = ("softmax", "sigmoid", "squared")


class KerasModel(Model):
    """A built Keras model as a :class:`GenericNeuralNet` (see the module docstring).

    Parameters
    ----------
    model : keras.Model
        Built (called once or created from ``keras.Input``); outputs logits or predictions.
    loss : {"softmax", "sigmoid", "squared"} or callable ``(outputs, y) -> per-example loss``
    trainable : list of str or None
        Names of the model's (top-level, ``model.layers``) layers whose trainable variables are
        ``theta``; None: all of them.
    weight_decay, batch_size, ... : see :class:`GenericNeuralNet`. ``dtype`` defaults to
        the model's variable dtype.
    retrain : None, KerasRetrain or callable ``(net, X, y) -> None``
        How leave-one-out re-fits (module docstring): None, L-BFGS on the objective.
    feature_cache : {"auto", True, False}
        When ``trainable`` names only top layers of a chain (Sequential or functional chain),
        the frozen layers below them map each training set to features once (kept with the
        wrapper, keyed by the inputs and the frozen weights), and every pass over the training
        set (objective, gradients, HVPs, scores, re-fits) runs the head only. "auto": where it
        applies and the features' shape differs from the inputs'; True: required (an error
        says why it cannot apply); False: off. ``influence_pert_loss`` (input gradients of
        training points) needs it off.
    """

    def __init__(self, model, loss="softmax", trainable: list | tuple | None = None,
                 weight_decay: float = 0.0, dtype: str | None = None, retrain=None, feature_cache="auto",
                 **kwargs):
        if not (callable(loss) or loss in LOSSES):
            raise ValueError(f"loss must be one of {LOSSES} or a callable (outputs, y) -> per-example loss, "
                             f"got {loss!r}")
        variables = list(getattr(model, "trainable_variables", None) or [])
        if not variables:
            raise ValueError("model has no trainable variables: pass a built keras.Model (call it once, or build it "
                             "from keras.Input)")
        net_dtype = str(variables[0].dtype)
        compute = str(getattr(model, "compute_dtype", net_dtype) or net_dtype)
        if dtype is not None and str(dtype) not in (net_dtype, compute):
            raise ValueError(f"dtype={dtype!r}, but the network's layers compute in {compute} (variables {net_dtype}): "
                             f"the influence computation would mix the two. Omit dtype (computes in {compute}), or "
                             f"build the network in {dtype} (keras.config.set_floatx({str(dtype)!r}) before building "
                             f"it, or dtype={str(dtype)!r} on every layer and the Input)")
        dtype = dtype or net_dtype
        super().__init__(weight_decay=weight_decay, dtype=dtype, **kwargs)
        self.model = model
        self.loss = loss
        self.trainable = None if trainable is None else tuple(trainable)
        if self.trainable is not None:
            names = {layer.name for layer in model.layers}
            unknown = [t for t in self.trainable if t not in names]
            if unknown:
                raise ValueError(f"no layer named {unknown} in the model (layers: {sorted(names)})")
        if self.trainable is None:
            self._selected = [True] * len(variables)
        else:
            chosen = {id(v) for layer in model.layers if layer.name in self.trainable
                      for v in layer.trainable_variables}
            self._selected = [id(v) in chosen for v in variables]
        if not any(self._selected):
            raise ValueError(f"the layers {list(self.trainable)} have no trainable variables")
        if retrain is not None and not isinstance(retrain, KerasRetrain) and not callable(retrain):
            raise TypeError(f"retrain must be None (L-BFGS on the objective), a KerasRetrain or a callable "
                            f"(net, X, y) -> None; got {type(retrain).__name__}")
        if isinstance(retrain, KerasRetrain) and retrain.optimizer is None:
            compiled = getattr(model, "optimizer", None)
            if compiled is None:
                raise ValueError("retrain=KerasRetrain(optimizer=None) continues with the network's compiled "
                                 "optimizer, but the network is not compiled: compile it, or pass optimizer= "
                                 "(e.g. 'adam' or keras.optimizers.Adam(1e-3))")
            retrain = retrain.with_optimizer(compiled)
        self.retrain = retrain
        if feature_cache not in (True, False, "auto"):
            raise ValueError(f"feature_cache must be True, False or 'auto', got {feature_cache!r}")
        if feature_cache is True and trainable is None:
            raise ValueError("feature_cache=True caches the features of the frozen layers below theta, but "
                             "trainable=None puts every layer in theta (nothing is frozen): name the layers of theta "
                             "(trainable=[...]) or leave feature_cache='auto'")
        self.feature_cache = feature_cache
        self._split = None  # index of the first layer of the head when the frozen features are cached
        if self.loss in ("softmax", "sigmoid"):
            squashed = final_activation(model)
            if squashed in ("softmax", "sigmoid"):
                raise ValueError(squashed_message(model, self.loss, squashed))

    def _check_raw_inputs(self) -> None:
        inputs = getattr(self.model, "inputs", None)
        dtype = str(inputs[0].dtype) if inputs else ""
        if "int" in dtype or "bool" in dtype:
            raise ValueError(f"the model takes {dtype} inputs (e.g. token ids): the loss has no gradient with respect "
                             f"to them, so influence_pert_loss is undefined; influence_up_loss and influence_matrix "
                             f"apply")

    def _single_output(self) -> bool:
        outputs = getattr(self.model, "outputs", None)
        if not outputs:
            return False
        shape = tuple(outputs[0].shape[1:])
        return shape in ((), (1,))

    def _normalise_targets(self, y):
        """(n, 1) targets of a one-output model are the same as (n,): Keras's habit, taken as is
        (left as they are they would broadcast against the (n,) predictions)."""
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1 and (self.loss == "softmax" or self._single_output()):
            return y[:, 0]
        return y

    # ------------------------------------------------------------------ GenericNeuralNet hooks
    def _set_training_data(self, X, y):
        if not self._built:
            X = np.asarray(X)
            expected = tuple(self.model.inputs[0].shape[1:]) if getattr(self.model, "inputs", None) else None
            fits = expected is None or None in expected or expected == tuple(X.shape[1:])
            if fits and len(X) and np.issubdtype(X.dtype, np.number) and not np.issubdtype(X.dtype, np.complexfloating):
                self._check_probabilities(X[:64].astype(self.dtype) if np.issubdtype(X.dtype, np.floating) else X[:64])
        raw = None if self._split is not None and self._is_features(X) else np.asarray(X)
        out = super()._set_training_data(X, y)
        self.X_train_raw_ = frozen_copy(raw, X) if self._split is not None else None  # for a retrain callable
        return out

    def _is_features(self, X) -> bool:
        return self._split is not None and tuple(np.shape(X)[1:]) == self._feature_shape

    def _check_x(self, X, name="X") -> np.ndarray:
        """Inputs checked against the model's input shape; with the feature cache on, mapped to
        the frozen layers' features (arrays of features, e.g. a subset of the training set's,
        pass as they are)."""
        if self._is_features(X):
            X = np.asarray(X)
            if not np.all(np.isfinite(X)):
                raise ValueError(f"{name} contains NaN or infinite values")
            return X
        X = super()._check_x(X, name)
        return self._features(X) if self._split is not None else X

    # ------------------------------------------------------------------ frozen-feature cache
    def _plan_feature_cache(self, x_shape):
        """Decide (at build) whether the frozen layers' features are cached: ``self._split``."""
        self._split = None
        if self.feature_cache is False or self.trainable is None:
            return
        from .keras_taps import chain_layers

        why = None
        try:
            layers = chain_layers(self.model)
        except ValueError as exc:
            layers, why = None, f"the model is not a chain of layers ({exc})"
        if layers is not None:
            first = next(i for i, layer in enumerate(layers) if layer.name in self.trainable)
            if first == 0:
                why = "no frozen layer lies below the first layer of theta"
            elif any(v.trainable and layer.name not in self.trainable for layer in layers[first:]
                     for v in layer.trainable_variables):
                why = "a frozen layer with weights lies above a layer of theta"
            else:
                from ..utils import hash_arrays

                self._layers, self._split = layers, first
                self._frozen_key = hash_arrays(*[f.numpy() for f in self._frozen if f is not None],
                                               *[t.numpy() for t in self._state])  # the snapshot's, fixed
                probe = self._apply(layers[:first], np.zeros((1, *x_shape), dtype=self._input_dtype()), self._values())
                self._feature_shape = tuple(probe.shape[1:])
                if self._feature_shape == tuple(x_shape):
                    self._split, why = None, (f"the features have the inputs' shape {tuple(x_shape)} (a batch could "
                                              f"not be told apart)")
        if why is not None and self.feature_cache is True:
            raise ValueError(f"feature_cache=True cannot apply: {why}")

    def _input_dtype(self):
        inputs = getattr(self.model, "inputs", None)
        return str(inputs[0].dtype) if inputs else self.dtype

    def _values(self, params=None) -> dict:
        """``id(variable) -> value``: theta's blocks (``params``), the frozen weights and the state."""
        value = {id(v): f for v, f in zip(self.model.trainable_variables, self._frozen) if f is not None}
        if params is not None:
            it = iter(params)
            value.update({id(v): next(it) for v, sel in zip(self.model.trainable_variables, self._selected) if sel})
        value.update({id(v): t for v, t in zip(self.model.non_trainable_variables, self._state)})
        return value

    def _apply(self, layers, x, value):
        h = tf.cast(x, self._input_dtype())
        for layer in layers:
            kwargs = self._call_kwargs if getattr(layer, "_call_has_training_arg", False) else {}
            h = layer.stateless_call([value[id(v)] for v in layer.trainable_variables],
                                     [value[id(v)] for v in layer.non_trainable_variables], h, **kwargs)[0]
        return h

    def _features(self, X) -> np.ndarray:
        """The frozen layers' outputs for inputs ``X`` (one batched pass; kept for the last inputs
        seen, keyed by their hash and the frozen weights)."""
        from ..utils import hash_arrays

        key = (hash_arrays(np.asarray(X)), self._frozen_key)
        hit = getattr(self, "_feature_memo", None)
        if hit is not None and hit[0] == key:
            return hit[1]
        if getattr(self, "_prefix", None) is None or self._prefix[0] != self._frozen_key:  # one trace per snapshot
            value = self._values()
            self._prefix = (self._frozen_key, tf.function(lambda x: self._apply(self._layers[:self._split], x, value),
                                                          reduce_retracing=True))
        parts = [self._prefix[1](tf.constant(X[sl])).numpy() for sl in self.slices(len(X))]
        feats = np.concatenate(parts).astype(self.dtype) if parts else np.zeros((0, *self._feature_shape), self.dtype)
        self._feature_memo = (key, feats)
        return feats


    def _check_probabilities(self, x):
        """Refuse outputs that are probabilities where loss='softmax' takes logits (rows that are
        non-negative and sum to 1: a softmax applied inside the model, e.g. by a custom layer)."""
        if self.loss != "softmax":
            return
        out = np.asarray(self.model(x, training=False))
        if out.ndim == 2 and out.shape[1] > 1 and np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-6):
            raise ValueError(squashed_message(self.model, self.loss, "softmax (its outputs' rows sum to 1)"))

    def _param_blocks(self, x_shape, y):
        expected = tuple(self.model.inputs[0].shape[1:]) if getattr(self.model, "inputs", None) else None
        if expected is not None and all(d is not None for d in expected) and expected != tuple(x_shape):
            raise ValueError(f"the model takes inputs of shape {expected}, got examples of shape {tuple(x_shape)}")
        variables = self.model.trainable_variables
        n_out = None if not getattr(self.model, "outputs", None) else tuple(self.model.outputs[0].shape[1:])
        y = np.asarray(y)
        if self.loss == "squared" and n_out is not None and None not in n_out and \
                tuple(y.shape[1:]) not in (tuple(n_out), tuple(d for d in n_out if d != 1)):
            raise ValueError(f"loss='squared': targets of shape {tuple(y.shape[1:])} per example do not match the "
                             f"model's outputs {tuple(n_out)}")
        # frozen trainable variables and the non-trainable state enter stateless_call as constants
        self._frozen = [None if sel else tf.constant(v.numpy()) for v, sel in zip(variables, self._selected)]
        self._state = [tf.constant(v.numpy()) for v in self.model.non_trainable_variables]
        # inference mode (batch-norm statistics, no dropout); a custom call() may not take the flag
        params = inspect.signature(self.model.call).parameters.values()
        self._call_kwargs = ({"training": False} if any(p.name == "training" or p.kind == p.VAR_KEYWORD
                                                         for p in params) else {})
        self._plan_feature_cache(tuple(x_shape))
        return [ParamBlock(v.path, tuple(v.shape), decay=v.path.endswith("kernel"))
                for v, sel in zip(variables, self._selected) if sel]

    def _init_theta(self, rng):
        """The model's current weights (so ``set_training_data`` alone studies the model as it is)."""
        return np.concatenate([v.numpy().reshape(-1) for v, sel in zip(self.model.trainable_variables, self._selected)
                               if sel]).astype(self.dtype)

    def _forward(self, params, x):
        if self._split is not None:  # every input arrives as the frozen layers' features: the head
            out = self._apply(self._layers[self._split:], x, self._values(params))
            if self.loss in ("sigmoid", "squared") and len(out.shape) == 2 and out.shape[1] == 1:
                out = out[:, 0]
            return out
        it = iter(params)
        values = [next(it) if frozen is None else frozen for frozen in self._frozen]
        out = self.model.stateless_call(values, self._state, x, **self._call_kwargs)[0]
        if self.loss in ("sigmoid", "squared") and len(out.shape) == 2 and out.shape[1] == 1:
            out = out[:, 0]
        return out

    @property
    def predictive(self):  # the likelihood the Monte Carlo Fisher samples from (K-FAC)
        return self.loss if self.loss in LOSSES else None

    def _kfac_taps(self, params, x):
        from .keras_taps import chain_taps

        it = iter(params)
        values = [next(it) if frozen is None else frozen for frozen in self._frozen]
        selected = [v for v, sel in zip(self.model.trainable_variables, self._selected) if sel]
        block_of = {id(v): i for i, v in enumerate(selected)}
        if self._split is not None:
            out, taps = self._head_taps(params, x, block_of)
        else:
            out, taps = chain_taps(self.model, values, self._state, x, block_of, self._call_kwargs)
        if self.loss in ("sigmoid", "squared") and len(out.shape) == 2 and out.shape[1] == 1:
            out = out[:, 0]
        return out, taps

    def _head_taps(self, params, x, block_of):
        """K-FAC taps of the head on cached features (the head's layers as a chain)."""
        from .keras_taps import _factorable

        value = self._values(params)
        taps, h = [], tf.cast(x, self.tf_dtype)
        for layer in self._layers[self._split:]:
            ours = [v for v in layer.trainable_variables if id(v) in block_of]
            if ours and type(layer).__name__ in ("Dense", "Conv2D"):
                h = _factorable(layer, h, value, block_of, taps)
                continue
            if ours:
                raise ValueError(f"Kronecker-factored curvature covers Dense and Conv2D layers only: layer "
                                 f"{layer.name!r} ({type(layer).__name__}) has parameters of interest")
            h = self._apply([layer], h, value)
        return h, taps

    def check_differentiable_inputs(self) -> None:
        if self._split is not None:
            raise ValueError("influence_pert_loss differentiates with respect to the training inputs, but the frozen "
                             "layers' features are cached (feature_cache): wrap the model with feature_cache=False")
        self._check_raw_inputs()

    def _loss(self, outputs, y):
        if callable(self.loss):
            out = self.loss(outputs, y)
            if out.shape.rank != 1:
                raise ValueError(f"the loss callable must return one value per example, shape (batch,); got shape "
                                 f"{out.shape}")
            return out
        if self.loss == "softmax":
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=outputs)
        if self.loss == "sigmoid":
            return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=outputs)
        sq = 0.5 * tf.square(outputs - y)
        return tf.reduce_sum(sq, axis=1) if sq.shape.rank == 2 else sq

    @property
    def multi_output_targets(self) -> bool:  # several outputs: the squared loss, or your own
        return callable(self.loss) or self.loss == "squared"

    def _encode_targets(self, y):
        y = np.asarray(y)
        if callable(self.loss):
            return y.astype(np.int32) if np.issubdtype(y.dtype, np.integer) else y.astype(self.dtype)
        if self.loss == "softmax":
            outputs = getattr(self.model, "outputs", None)
            k = outputs[0].shape[-1] if outputs else None
            if len(y) and (np.any(y != np.round(y)) or y.min() < 0 or (k is not None and y.max() >= k)):
                raise ValueError(f"class labels must be integers in [0, {k if k is not None else 'n_classes'}) "
                                 "for loss='softmax'")
            return y.astype(np.int32)
        if self.loss == "sigmoid" and len(y) and not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be 0 or 1 for loss='sigmoid'")
        return y.astype(self.dtype)

    def cache_identity(self) -> dict:
        """The base class's, plus the architecture and the weights outside theta: two Keras
        models with the same configuration string (``<Sequential name=...>``) but different
        layers, activations or frozen weights must not share cached ``s_test`` vectors."""
        from ..utils import hash_arrays

        ident = super().cache_identity()
        ident["model"] = architecture_fingerprint(self.model)
        if self._built:  # every weight that changes the outputs: the frozen ones and the layers' state too
            ident["fixed_weights"] = hash_arrays(*[f.numpy() for f in self._frozen if f is not None],
                                                 *[t.numpy() for t in self._state])
        if callable(self.loss):
            ident["loss"] = function_fingerprint(self.loss)
        return ident

    # ------------------------------------------------------------------ re-fits
    @property
    def refits_by_own_training(self) -> bool:
        """Whether re-fits continue the user's training (``retrain`` given), not L-BFGS."""
        return self.retrain is not None

    def retrain_without(self, indices) -> np.ndarray:
        """Parameters re-fitted without ``indices`` (``retrain``, module docstring; an empty
        ``indices`` is the control re-fit). The model itself is left as it was."""
        if self.retrain is None:
            return super().retrain_without(indices)
        self.require_fit()
        drop = self.check_indices(indices)
        if isinstance(self.retrain, KerasRetrain):
            weights = np.ones(self.n_train_)
            weights[drop] = 0.0
            return self._continue_training(weights)
        return self._user_retrain(drop)

    def _user_retrain(self, drop):
        import keras

        keep = np.ones(self.n_train_, dtype=bool)
        keep[drop] = False
        net = keras.models.clone_model(self.model)
        net.set_weights(self.model.get_weights())
        selected = [v for v, sel in zip(net.trainable_variables, self._selected) if sel]
        for var, value in zip(selected, self.unflatten(tf.constant(self.theta_))):
            var.assign(tf.cast(value, var.dtype))
        X = self.X_train_np_ if self._split is None else self.X_train_raw_
        if X is None:
            raise RuntimeError("retrain: the raw training inputs are not held (the training set was given as "
                               "features); wrap the model with feature_cache=False")
        self.retrain(net, X[keep], self.y_train_np_[keep])
        theta = np.concatenate([v.numpy().reshape(-1) for v, sel in zip(net.trainable_variables, self._selected)
                                if sel]).astype(self.dtype)
        if not np.all(np.isfinite(theta)):
            raise FloatingPointError("retrain: the network's weights are not finite after the user's training")
        return theta

    def _continue_training(self, weights) -> np.ndarray:
        """``retrain=KerasRetrain``: minibatch steps of the (fresh) Keras optimizer on
        ``sum_j w_j L_j / sum_j w_j + (wd/2) ||theta_decay||^2`` over the fixed batch sequence."""
        spec = self.retrain
        n = self.n_train_
        b = min(spec.batch_size, n)
        steps = spec.steps if spec.steps is not None else int(np.ceil(spec.epochs * n / b))
        run, (variables, w, optimizer) = self._refit_kernel()
        for var, value in zip(variables, self.unflatten(tf.constant(self.theta_))):
            var.assign(value)
        for var in optimizer.variables:  # a fresh optimizer state (moments, step count) for every re-fit
            if var.path.endswith("learning_rate"):
                continue
            var.assign(tf.zeros_like(var))
        w.assign(np.asarray(weights, dtype=self.dtype))
        from ..utils import BatchSequence

        sequence, chunk = BatchSequence(n, b, spec.seed), 256
        for start in range(0, steps, chunk):
            run(self.X_train_, self.y_train_, tf.constant(sequence.take(min(chunk, steps - start))))
        theta = np.concatenate([v.numpy().reshape(-1) for v in variables])
        if not np.all(np.isfinite(theta)):
            raise FloatingPointError("retrain=KerasRetrain diverged (theta not finite): lower its learning_rate")
        return theta

    def _refit_kernel(self):
        """One compiled step loop per wrapper (variables re-assigned per re-fit)."""
        import keras

        cached = getattr(self, "_refit_cache", None)
        if cached is not None and cached[0] == (self.n_train_, self.retrain):
            return cached[1], cached[2]
        spec = self.retrain
        dt = self.tf_dtype
        variables = [tf.Variable(t) for t in self.unflatten(tf.constant(self.theta_))]
        optimizer = keras.optimizers.deserialize(spec.optimizer)
        if spec.learning_rate is not None:
            optimizer.learning_rate = spec.learning_rate
        optimizer.build(variables)
        w = tf.Variable(tf.ones(self.n_train_, dt))
        decays = [tf.constant(float(blk.decay), dt) for blk in self.blocks_]
        wd = tf.constant(self.weight_decay, dt)

        @tf.function(reduce_retracing=True)
        def run(X, Y, batches):
            for j in tf.range(tf.shape(batches)[0]):
                idx = batches[j]
                wb = tf.gather(w, idx)
                with tf.GradientTape() as tape:
                    losses = self._loss(self._forward(variables, tf.gather(X, idx)), tf.gather(Y, idx))
                    total = tf.reduce_sum(wb * losses) / tf.maximum(tf.reduce_sum(wb), 1e-12)
                    total += 0.5 * wd * tf.add_n([m * tf.reduce_sum(tf.square(v)) for m, v in zip(decays, variables)])
                optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))

        self._refit_cache = ((self.n_train_, self.retrain), run, (variables, w, optimizer))
        return run, (variables, w, optimizer)

    # ------------------------------------------------------------------ convenience
    def update_keras_model(self) -> None:
        """Write ``theta`` back into the wrapped Keras model's variables."""
        self.require_fit()
        selected = [v for v, sel in zip(self.model.trainable_variables, self._selected) if sel]
        for var, value in zip(selected, self.unflatten(tf.constant(self.theta_))):
            var.assign(tf.cast(value, var.dtype))

    def predict(self, X) -> np.ndarray:
        out = self.outputs(X)
        if self.loss == "softmax":
            return np.argmax(out, axis=1)
        if self.loss == "sigmoid":
            return (out > 0).astype(int)
        return out


def final_activation(model) -> str | None:
    """Name of the activation the model's last layer applies ("softmax", "sigmoid", ...), or None."""
    import keras

    layers = [layer for layer in getattr(model, "layers", []) if not isinstance(layer, keras.layers.InputLayer)]
    if not layers:
        return None
    last = layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return "softmax"
    act = getattr(last, "activation", None)
    name = getattr(act, "__name__", None) if act is not None else None
    return name if name in ("softmax", "sigmoid") else None


def squashed_message(model, loss, what) -> str:
    return (f"loss={loss!r} takes logits, but the model's last layer applies {what}: the {loss} would be applied "
            f"twice and the objective and every influence would be wrong. Wrap the logits instead: "
            f"`KerasModel(logits_model(net), loss={loss!r}, ...)` (influence.models.keras_model.logits_model copies "
            f"the network with its last activation removed; the network itself is not changed).")


def logits_model(model):
    """A copy of a Sequential or functional ``model`` whose last layer outputs its pre-activation
    (the same weights, copied; ``model`` is not changed): logits for ``loss="softmax"``/``"sigmoid"``."""
    import keras

    last = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)][-1]
    if isinstance(last, keras.layers.Softmax):  # a separate softmax layer: its input is the logits
        return keras.Model(model.inputs, last.input)

    def clone(layer):
        cfg = layer.get_config()
        if layer is last:
            cfg["activation"] = "linear"
        return type(layer).from_config(cfg)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def architecture_fingerprint(model) -> str:
    """A string that changes with the model's architecture: its JSON config where Keras can
    serialise it, else the class and each layer's class and config (a subclassed model's
    own ``call`` source is added where Python can read it)."""
    try:
        return model.to_json()
    except Exception:  # noqa: BLE001 -- subclassed models without get_config
        parts = [f"{type(model).__module__}.{type(model).__qualname__}"]
        try:
            parts.append(inspect.getsource(type(model).call))
        except (OSError, TypeError):
            pass
        for layer in model.layers:
            try:
                cfg = layer.get_config()
            except Exception:  # noqa: BLE001
                cfg = None
            parts.append(f"{layer.name}:{type(layer).__qualname__}:{cfg}")
        return "\n".join(parts)


def function_fingerprint(fn) -> str:
    """A string that changes with a function's code: its qualified name and source, or its
    bytecode and constants where the source cannot be read."""
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    try:
        return name + "\n" + inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        return name if code is None else f"{name}\n{code.co_code.hex()}\n{code.co_consts!r}"


@dataclass(frozen=True)
class KerasRetrain:
    """Leave-one-out re-fits by continued Keras-style training (see the module docstring).

    Parameters
    ----------
    steps, epochs : int / float
        How long each re-fit trains: ``steps`` minibatch steps, or ``epochs`` passes over the
        training set (exactly one of the two).
    batch_size : int
        Examples per step (Keras's default 32).
    seed : int
        Seed of the batch sequence (the same for every re-fit and for the control).
    optimizer : None, str, dict or keras optimizer
        None: a fresh copy of the network's compiled optimizer (class and settings).
    learning_rate : float or None
        Overrides the optimizer's learning rate (e.g. its final, decayed one).
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    seed: int = 0
    optimizer: Any = None
    learning_rate: float | None = None

    def __post_init__(self):
        from ..validation import check_number

        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"KerasRetrain: give exactly one of steps and epochs, got steps={self.steps!r}, "
                             f"epochs={self.epochs!r}")
        check_number("steps", self.steps, low=1, integer=True, allow_none=True)
        check_number("epochs", self.epochs, low=0.0, low_open=True, allow_none=True)
        check_number("batch_size", self.batch_size, low=1, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        check_number("learning_rate", self.learning_rate, low=0.0, low_open=True, allow_none=True)
        if self.optimizer is not None:
            object.__setattr__(self, "optimizer", _serialized_optimizer(self.optimizer))

    def with_optimizer(self, optimizer) -> "KerasRetrain":
        return KerasRetrain(self.steps, self.epochs, self.batch_size, self.seed, optimizer, self.learning_rate)

    def __hash__(self):
        return hash(repr(self))

    def __eq__(self, other):
        return isinstance(other, KerasRetrain) and repr(self) == repr(other)


def _serialized_optimizer(optimizer) -> dict:
    """A Keras optimizer (instance, name or config) as its serialized config (picklable; a fresh
    instance is rebuilt from it for every set of re-fits)."""
    import keras

    if isinstance(optimizer, dict) and "class_name" in optimizer:
        keras.optimizers.deserialize(optimizer)  # fail here on a bad config
        return optimizer
    try:
        opt = keras.optimizers.get(optimizer)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"KerasRetrain: optimizer={optimizer!r} is not a Keras optimizer ({exc})") from None
    return keras.optimizers.serialize(opt)

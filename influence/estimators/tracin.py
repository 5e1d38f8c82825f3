"""TracIn (TracInCP, Pruthi et al. 2020): first-order influence summed over training checkpoints.

    TracInCP(z, z_test) = sum_k lr_k grad L(z_test; theta_k) . grad L(z; theta_k)

is positive for a *proponent* (training on ``z`` lowered the test loss: helpful), so the
estimator returns its negative, in ``I_up,loss``'s convention. Checkpoints are
``(theta_k, lr_k)`` pairs: passed explicitly, recorded by a model's own training (the
``checkpoints_`` attribute, e.g. ``AllCNN(checkpoints=10)``), or by
:class:`TracInCheckpoints` on any Keras ``fit``. A model fitted by L-BFGS has none: the
estimator is then the loss-gradient dot product at the fitted parameters
(``used_ == "grad_dot_at_fit"``).
"""
from __future__ import annotations

import numpy as np

from ..model_kernels import quiet_member_traces
from ..validation import check_number
from .base import Estimator, squared_gradient_norms, test_and_train_gradients


def check_checkpoints(checkpoints) -> list:
    """``[(theta, learning_rate), ...]`` checked: theta finite, the learning rate a number > 0."""
    out = []
    for k, item in enumerate(checkpoints):
        try:
            theta, lr = item
        except (TypeError, ValueError):
            raise ValueError(f"TracIn checkpoint {k} must be a pair (theta, learning_rate), got "
                             f"{type(item).__name__}") from None
        lr = check_number(f"learning rate of TracIn checkpoint {k}", lr, low=0.0, low_open=True)
        theta = np.asarray(theta, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(theta)):
            raise ValueError(f"TracIn checkpoint {k}: theta contains NaN or infinite values")
        out.append((theta, lr))
    return out


class TracIn(Estimator):
    """TracInCP over ``checkpoints`` (list of ``(theta, learning_rate)``; default: the model's).

    ``models``: instead of checkpoints, fitted models of the same architecture holding the same
    training set (e.g. networks trained separately, with other seeds), each counted as a
    checkpoint at its ``theta_`` with step size ``learning_rate``. ``proj_dim``: each
    checkpoint's gradients go once into a :class:`~influence.index.GradientIndex` of that
    dimension (kept by the estimator), and every query is a matrix product per checkpoint.
    """

    name = "tracin"

    def __init__(self, checkpoints: list | None = None, models: list | None = None, learning_rate: float = 1.0,
                 proj_dim: int | None = None):
        super().__init__()
        self.proj_dim = check_number("proj_dim", proj_dim, low=1, integer=True, allow_none=True)
        self._indexes = {}  # checkpoint number -> (theta, its GradientIndex), with proj_dim
        if checkpoints is not None and models is not None:
            raise ValueError("TracIn: give checkpoints= or models=, not both")
        lr = check_number("learning_rate", learning_rate, low=0.0, low_open=True)
        self._members = None if models is None else list(models)
        if self._members is not None:
            if not self._members:
                raise ValueError("TracIn(models=[]): give at least one fitted model")
            for k, m in enumerate(self._members):
                m.require_fit()
            checkpoints = [(m.theta_, lr) for m in self._members]
        self._checkpoints = None if checkpoints is None else check_checkpoints(checkpoints)
        self.used_ = None

    def fit(self, model) -> "TracIn":
        super().fit(model)
        for k, m in enumerate(self._members or []):
            if m.n_params != model.n_params or m.data_fingerprint_ != model.data_fingerprint_:
                raise ValueError(f"TracIn(models=...): member {k} ({type(m).__name__}, p = {m.n_params}) does not hold "
                                 f"the fitted model's parameters layout (p = {model.n_params}) and training set "
                                 f"(data fingerprint {m.data_fingerprint_[:12]} vs {model.data_fingerprint_[:12]})")
        return self

    def checkpoints_of(self, model) -> list:
        cps = self._checkpoints if self._checkpoints is not None else getattr(model, "checkpoints_", None)
        cps = check_checkpoints(cps or [])
        for k, (theta, _) in enumerate(cps):
            if theta.shape != (model.n_params,):
                raise ValueError(f"TracIn checkpoint {k}: theta has {theta.size} entries, the model has "
                                 f"p = {model.n_params} parameters")
        return cps

    def _self_scores(self) -> np.ndarray:
        """``-sum_k lr_k ||grad L(z_i; theta_k)||^2`` (without checkpoints: at the fit)."""
        model = self.model_
        cps = self.checkpoints_of(model)
        self.used_ = "tracin" if cps else "grad_dot_at_fit"
        total = np.zeros(model.n_train_)
        with quiet_member_traces():
            for theta, lr in cps or [(model.theta_, 1.0)]:  # a copy of the model at each checkpoint
                total += float(lr) * squared_gradient_norms(model.at_theta(theta), include_regularizer=False)
        return -total

    def _influence_matrix(self, X_test, y_test, indices=None) -> np.ndarray:
        model = self.model_
        cps = self.checkpoints_of(model)
        self.used_ = "tracin" if cps else "grad_dot_at_fit"
        if not cps:
            cps = [(model.theta_, 1.0)]
        total = None
        if self.proj_dim is not None:
            with quiet_member_traces():
                for k, (theta, lr) in enumerate(cps):
                    part = self._index(k, model, theta).gradient_similarity(X_test, y_test, indices=indices)
                    total = float(lr) * part if total is None else total + float(lr) * part
            return total
        with quiet_member_traces():  # one compiled kernel per checkpoint's copy, each traced once
            for theta, lr in cps:  # a copy of the model at each checkpoint (the model is not touched)
                G_test, idx, chunks = test_and_train_gradients(model.at_theta(theta), X_test, y_test, indices,
                                                               include_regularizer=False)
                part = np.empty((len(G_test), len(idx)))
                for sl, G in chunks:
                    part[:, sl] = G_test @ G.T
                total = float(lr) * part if total is None else total + float(lr) * part
        return -total


    def _index(self, k, model, theta):
        """Checkpoint ``k``'s gradient index (loss gradients without the regulariser), built once."""
        from ..index import GradientIndex  # the index sits on this floor; imported when asked for

        hit = self._indexes.get(k)
        if hit is None or hit[0] is not model or not np.array_equal(hit[1], theta):
            idx = GradientIndex(proj_dim=self.proj_dim, projection="random", include_regularizer=False,
                                seed=k).fit(model.at_theta(theta))
            hit = self._indexes[k] = (model, np.array(theta), idx)
        return hit[2]


def _keras_callback_base():
    import keras

    return keras.callbacks.Callback


class TracInCheckpoints(_keras_callback_base()):
    """A Keras callback that saves ``(weights, learning rate)`` every ``every`` epochs for TracIn.

    ``model.fit(..., callbacks=[cb])``, then ``TracIn(cb.thetas(wrapper))`` with the
    :class:`~influence.KerasModel` ``wrapper`` of the same model (its parameters of
    interest are picked from each checkpoint).
    """

    def __init__(self, every: int = 1):
        super().__init__()
        self.every = int(every)
        self.saved = []

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        opt = self.model.optimizer
        lr = opt.learning_rate
        lr = float(lr(opt.iterations) if callable(lr) else np.asarray(lr))
        self.saved.append(([v.numpy().copy() for v in self.model.trainable_variables], lr))

    def thetas(self, wrapper) -> list:
        """The checkpoints as ``(theta, lr)`` for ``wrapper`` (a :class:`~influence.KerasModel`)."""
        selected = wrapper._selected
        return [(np.concatenate([w.reshape(-1) for w, sel in zip(weights, selected) if sel]).astype(wrapper.dtype), lr)
                for weights, lr in self.saved]

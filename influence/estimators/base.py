"""The estimator interface: fitted on a model, then scores of training points per test point."""
from __future__ import annotations

import numpy as np


def _is_model(obj) -> bool:
    return hasattr(obj, "require_fit") and hasattr(obj, "n_params")


class Estimator:
    """Training-data attribution: ``fit(model)``, then ``influence_matrix(X_test, y_test,
    indices=None) -> (k, m)`` scores of training points ``indices`` (default all) for each
    test point, positive = harmful (as ``I_up,loss``), and ``self_scores()`` (each training
    point's score for itself). ``influence_matrix(model, X_test, y_test, ...)`` fits first.

    Subclasses implement ``_influence_matrix(X_test, y_test, indices)`` and
    ``_self_scores()`` with ``self.model_``; they never modify the model.
    """

    name = "base"

    def __init__(self):
        self._model = None

    def fit(self, model) -> "Estimator":
        """Bind the estimator to a fitted model (read, never modified)."""
        model.require_fit()
        self._model = model
        return self

    @property
    def model_(self):
        model = getattr(self, "_model", None)
        if model is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(model) first")
        return model

    def _fit_from(self, args: tuple) -> tuple:
        if args and _is_model(args[0]):
            self.fit(args[0])
            return args[1:]
        return args

    def influence_matrix(self, *args, **kwargs) -> np.ndarray:
        """``influence_matrix(X_test, y_test, indices=None)`` on the fitted model (or with the
        model first: fitted on it then)."""
        return self._influence_matrix(*self._fit_from(args), **kwargs)

    def self_scores(self, model=None) -> np.ndarray:
        """Each training point's score for itself, (n,) (Fig 6's check order ranks by its magnitude)."""
        if model is not None:
            self.fit(model)
        return np.asarray(self._self_scores())

    def _influence_matrix(self, X_test, y_test, indices=None) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _self_scores(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no self-score")

    def config(self) -> dict:
        return {"estimator": self.name, **{k: v for k, v in vars(self).items()
                                           if not k.startswith("_") and not k.endswith("_")}}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items() if k != 'estimator')})"


def test_and_train_gradients(model, X_test, y_test, indices=None, include_regularizer: bool = True,
                             chunk: int | None = None):
    """``(G_test (k, p), an iterator of (rows, G_train chunk (c, p)))`` at the model's theta."""
    X_test, y_test = model.as_batch(X_test, y_test)
    G_test = model.test_gradients(X_test, y_test)
    idx = model.check_indices(indices)
    c = chunk or max(1, min(len(idx), model.rows_per_chunk()))

    def chunks():
        for j in range(0, len(idx), c):
            yield slice(j, j + c), model.per_example_gradients(idx[j:j + c], include_regularizer)

    return G_test, idx, chunks()


def squared_gradient_norms(model, include_regularizer: bool, chunk: int = 2048) -> np.ndarray:
    """``||g(z_i)||^2`` for every training point, in chunks."""
    n = model.n_train_
    return np.concatenate([np.sum(model.per_example_gradients(np.arange(i, min(i + chunk, n)),
                                                              include_regularizer) ** 2, axis=1)
                           for i in range(0, n, chunk)])

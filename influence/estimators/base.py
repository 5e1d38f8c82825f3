"""The estimator interface, and influence functions behind it."""
from __future__ import annotations

import numpy as np


class Estimator:
    """``influence_matrix(model, X_test, y_test, indices=None) -> (k, m)`` scores of training
    points ``indices`` (default all) for each test point, positive = harmful (as ``I_up,loss``)."""

    name = "base"

    def influence_matrix(self, model, X_test, y_test, indices=None) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        return {"estimator": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items() if k != 'estimator')})"


class InfluenceFunction(Estimator):
    """``I_up,loss(z_i, z_test)`` (Koh & Liang 2017) by the given inverse-HVP ``solver`` and its options."""

    name = "influence"

    def __init__(self, solver: str = "cg", **solver_options):
        self.solver = solver
        self.solver_options = dict(solver_options)

    def influence_matrix(self, model, X_test, y_test, indices=None) -> np.ndarray:
        return np.asarray(model.influence_matrix(X_test, y_test, indices, solver=self.solver, **self.solver_options))


def test_and_train_gradients(model, X_test, y_test, indices=None, include_regularizer: bool = True,
                             chunk: int | None = None):
    """``(G_test (k, p), an iterator of (rows, G_train chunk (c, p)))`` at the model's theta."""
    X_test, y_test = model.as_batch(X_test, y_test)
    G_test = model.test_gradients(X_test, y_test)
    idx = model._check_indices(indices)
    c = chunk or max(1, min(len(idx), model._rows_per_chunk()))

    def chunks():
        for j in range(0, len(idx), c):
            yield slice(j, j + c), model.per_example_gradients(idx[j:j + c], include_regularizer)

    return G_test, idx, chunks()

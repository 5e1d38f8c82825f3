"""The components of influence for binary logistic regression (Koh & Liang 2017, Fig 1).

With labels y in {-1, +1} (here stored as {0, 1}: y_pm = 2y - 1) and no regulariser in
the gradients, the influence of a training point z = (x, y) on a test point is::

    I_up,loss = -y_test y_pm * sigma(-y_test w.x_test) * sigma(-y_pm w.x) * x_test^T H^-1 x

It combines a *training loss* term sigma(-y_pm w.x) (high-loss points matter more) and
the Hessian term x_test^T H^-1 x (closeness weighted by the model's curvature).
:func:`influence_components` returns the full influence and three ablations:

- ``no_train_loss``: the training gradient replaced by its value at loss weight 1,
  ``g(z) = -y_pm x`` (the sigma factor dropped);
- ``no_hessian``: ``H^-1`` replaced by the identity, i.e. ``-grad L(z_test) . g(z)``;
- ``neither``: both, which is label-signed Euclidean similarity of x_test and x.
"""
from __future__ import annotations

import numpy as np


def influence_components(model, x_test, y_test, solver="exact", **solver_options) -> dict[str, np.ndarray]:
    """I_up,loss of every training point and its three ablations (arrays of length n)."""
    from ..models.logistic import BinaryLogisticRegression

    if not isinstance(model, BinaryLogisticRegression):
        raise TypeError("influence_components is defined for BinaryLogisticRegression")
    g_test = model.test_gradient(x_test, y_test)
    s_full = model.inverse_hvp(g_test, solver, **solver_options).x
    y_pm = 2.0 * model.y_train_np_ - 1.0
    X = model.X_train_np_
    return {
        "full": -model.gradient_dots(s_full, include_regularizer=False),
        "no_train_loss": y_pm * (X @ s_full),
        "no_hessian": -model.gradient_dots(g_test, include_regularizer=False),
        "neither": y_pm * (X @ g_test),
    }


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = 100) -> float:
    """Fraction of the k points of largest |a| that are also among the k of largest |b|."""
    top_a = set(np.argsort(-np.abs(a))[:k].tolist())
    top_b = set(np.argsort(-np.abs(b))[:k].tolist())
    return len(top_a & top_b) / k

"""Influence functions (Koh & Liang, ICML 2017) in TensorFlow 2.

Fit a model, then ask which training points a prediction depends on::

    from influence import LogisticRegression
    model = LogisticRegression(weight_decay=0.01).fit(X_train, y_train)
    diffs = model.predicted_loss_diffs(X_test[:1], y_test[:1], solver="cg")

See :mod:`influence.generic_neural_net` for the conventions (objective, signs, 1/n).
"""
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter out of logs

from .data import DataError  # noqa: E402
from .generic_neural_net import GenericNeuralNet, ParamBlock
from .logistic import BinaryLogisticRegression, LogisticRegression
from .loo import LOOResult, leave_one_out
from .solvers import (CGSolver, ExactSolver, InverseHVPSolver, LissaDivergenceError, LissaSolver,
                      NotPositiveDefiniteError, SolveResult, get_solver)

__version__ = "0.1.0"

__all__ = [
    "BinaryLogisticRegression", "CGSolver", "DataError", "ExactSolver", "GenericNeuralNet",
    "InverseHVPSolver", "LOOResult", "LissaDivergenceError", "LissaSolver", "LogisticRegression",
    "NotPositiveDefiniteError", "ParamBlock", "SolveResult", "get_solver", "leave_one_out",
]

"""Influence functions (Koh & Liang, ICML 2017) in TensorFlow 2.

Fit a model, then ask which training points a prediction depends on::

    from influence import LogisticRegression
    model = LogisticRegression(weight_decay=0.01).fit(X_train, y_train)
    diffs = model.predicted_loss_diffs(X_test[:1], y_test[:1], solver="cg")

or, with every piece named::

    from influence import CGSolver, InfluenceFunction
    infl = InfluenceFunction(CGSolver(damping=0.01, tol=1e-8), curvature="gauss-newton").fit(model)
    scores = infl.influence_matrix(X_test, y_test)      # I_up,loss, (n_test, n_train)

Your own Keras model: ``KerasModel(keras_model, loss="softmax", trainable=["last_layer"])``
(see :mod:`influence.models.keras_model`). See :mod:`influence.generic_neural_net` for the
conventions (objective, signs, 1/n).

Where things are: ``generic_neural_net`` (the model base class: parameters, forward pass,
loss, data, fit; its gradient kernels in ``model_kernels``; its convenience wrappers in
``shortcuts``), ``curvature/`` (operators H and G), ``solvers/`` (one module per inverse-HVP
method; ``damping="auto"`` in ``solvers/damping``), ``estimators/`` (``InfluenceFunction``
and the other attribution methods), ``evaluation/`` (leave-one-out, the LDS, the
leaderboard's scoring and stored-run readers), ``models/``, ``datasets/``, ``applications/``
(attack, mislabel repair, influence components), and ``result_store``, ``registry``,
``validation``, ``parallel``, ``utils``, ``experiment``.
Names are imported on first use, so ``python -m influence.datasets`` does not load TensorFlow.
"""
import importlib
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter out of logs

__version__ = "0.1.0"

_EXPORTS = {
    "DataError": "datasets.manifest", "DataMissingError": "datasets.manifest",
    "GenericNeuralNet": "generic_neural_net", "ParamBlock": "generic_neural_net", "Model": "models.base",
    "Influence": "facade", "GradientIndex": "index",
    "NotStationaryError": "generic_neural_net",
    "InfluenceRanking": "estimators", "InfluenceFunction": "estimators", "Estimator": "estimators",
    "get_estimator": "estimators",
    "CurvatureOperator": "curvature", "HessianOperator": "curvature", "GaussNewtonOperator": "curvature",
    "KFACSolver": "solvers", "EKFACSolver": "solvers", "AutoDamping": "solvers",
    "LogisticRegression": "models.logistic", "BinaryLogisticRegression": "models.logistic",
    "SmoothHingeSVM": "models.smooth_hinge", "AllCNN": "models.all_cnn", "KerasModel": "models.keras_model",
    "LOOResult": "refit_validation", "leave_one_out": "refit_validation", "LDSResult": "refit_validation",
    "linear_datamodeling_score": "refit_validation", "retrain_test_losses": "refit_validation",
    "CGSolver": "solvers", "ExactSolver": "solvers", "InverseHVPSolver": "solvers", "LissaSolver": "solvers",
    "ArnoldiSolver": "solvers", "NystromPreconditioner": "solvers", "KroneckerPreconditioner": "solvers",
    "GaussNewtonPreconditioner": "solvers",
    "LissaDivergenceError": "solvers", "NotPositiveDefiniteError": "solvers", "SolveFailedError": "solvers", "SolveResult": "solvers",
    "get_solver": "solvers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'influence' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

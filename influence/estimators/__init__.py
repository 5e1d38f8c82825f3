"""Training-data attribution estimators behind one call, to compare with influence functions:
``get_estimator(name, **options).influence_matrix(model, X_test, y_test)`` -> (n_test, n_train).

Every estimator returns scores in the sign convention of ``I_up,loss``: **positive = harmful**
(the training point raises the test loss), negative = helpful; divide by ``-n`` for the
scale of a predicted change in test loss on removal (only influence functions predict it
in absolute terms; the others rank). Estimators:

- ``"influence"``: ``I_up,loss`` by any inverse-HVP solver (``solver=...`` and its options);
- ``"tracin"``: TracInCP (Pruthi et al. 2020), ``-sum_k lr_k grad L(z_test; theta_k) . grad L(z; theta_k)``
  over saved checkpoints; without checkpoints, the gradient dot product at the fitted parameters;
- ``"trak"``: TRAK (Park et al. 2023) with a seeded random projection and an optional ensemble;
- ``"grad_dot"``, ``"grad_cos"``: ``-g_test . g_i`` and its cosine (influence with ``H = I``);
- ``"random"``: seeded Gaussian scores (the floor any estimator must beat).
"""
from __future__ import annotations

from .base import Estimator, InfluenceFunction
from .baselines import GradientCosine, GradientDot, RandomScores
from .tracin import TracIn, TracInCheckpoints
from .trak import TRAK, gaussian_projection

ESTIMATORS = {cls.name: cls for cls in (InfluenceFunction, TracIn, TRAK, GradientDot, GradientCosine, RandomScores)}

__all__ = ["ESTIMATORS", "Estimator", "GradientCosine", "GradientDot", "InfluenceFunction", "RandomScores", "TRAK",
           "TracIn", "TracInCheckpoints", "gaussian_projection", "get_estimator"]


def get_estimator(name: str | Estimator, **options) -> Estimator:
    """An estimator instance from its name (``influence``, ``tracin``, ``trak``, ``grad_dot``,
    ``grad_cos``, ``random``) and its options."""
    if isinstance(name, Estimator):
        if options:
            raise ValueError("pass options either to the estimator instance or here, not both")
        return name
    try:
        cls = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None
    return cls(**options)

"""Training-data attribution estimators behind one interface, to compare with influence functions:
``get_estimator(name, **options).fit(model).influence_matrix(X_test, y_test)`` -> (n_test, n_train).

Every estimator returns scores in the sign convention of ``I_up,loss``: **positive = harmful**
(the training point raises the test loss), negative = helpful; divide by ``-n`` for the
scale of a predicted change in test loss on removal (only influence functions predict it
in absolute terms; the others rank). ``self_scores()`` gives each training point's score
for itself. Estimators:

- ``"influence"``: :class:`InfluenceFunction`, ``I_up,loss`` by any inverse-HVP solver on H or G;
- ``"tracin"``: TracInCP (Pruthi et al. 2020), ``-sum_k lr_k grad L(z_test; theta_k) . grad L(z; theta_k)``
  over saved checkpoints; without checkpoints, the gradient dot product at the fitted parameters;
- ``"trak"``: TRAK (Park et al. 2023) with a seeded random projection and an optional ensemble;
- ``"grad_dot"``, ``"grad_cos"``: ``-g_test . g_i`` and its cosine (influence with ``H = I``);
- ``"random"``: seeded Gaussian scores (the floor any estimator must beat);
- ``"index"``: :class:`~influence.index.GradientIndex`, projected gradients written once to HDF5
  shards, every query a matrix product (``path=`` names its directory);
- ``"ensemble"``: :class:`Ensemble`, any of the above averaged over independently trained models
  or checkpoints (``Ensemble("influence", models=[...], solver="cg", curvature="gauss-newton")``).
"""
from __future__ import annotations

from ..registry import Registry
from .base import Estimator
from .baselines import GradientCosine, GradientDot, RandomScores
from .ensemble import Ensemble
from .influence_function import InfluenceFunction, InfluenceRanking
from .tracin import TracIn, TracInCheckpoints
from .trak import TRAK, gaussian_projection

ESTIMATORS = Registry("estimator", Estimator)
for _cls in (InfluenceFunction, TracIn, TRAK, GradientDot, GradientCosine, RandomScores, Ensemble):
    ESTIMATORS.register(_cls)
ESTIMATORS.register_lazy("index", "influence.index.gradient_index:GradientIndex")  # imports this package

__all__ = ["ESTIMATORS", "Ensemble", "Estimator", "GradientCosine", "GradientDot", "InfluenceFunction", "InfluenceRanking",
           "RandomScores", "TRAK", "TracIn", "TracInCheckpoints", "gaussian_projection", "get_estimator"]


def get_estimator(name: str | Estimator, **options) -> Estimator:
    """An estimator instance from its name (``influence``, ``tracin``, ``trak``, ``grad_dot``,
    ``grad_cos``, ``random``) and its options."""
    return ESTIMATORS.create(name, **options)

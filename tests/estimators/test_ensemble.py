"""Ensemble: any estimator's scores averaged over members (independent models or checkpoints)."""
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from influence import CGSolver, InfluenceFunction  # noqa: E402
from influence.estimators import Ensemble, get_estimator  # noqa: E402


def test_ensemble_is_the_mean_of_its_members_scores(multiclass_model, digits):
    m = multiclass_model
    X, y = digits
    rng = np.random.default_rng(0)
    members = [m] + [m.at_theta(m.theta_ + 0.02 * rng.standard_normal(m.n_params)) for _ in range(2)]
    xt, yt = X[-3:], y[-3:]
    want = np.mean([InfluenceFunction(CGSolver(damping=0.01, tol=1e-10)).fit(k).influence_matrix(xt, yt)
                    for k in members], axis=0)
    ens = Ensemble("influence", members, solver="cg", damping=0.01, tol=1e-10).fit(m)
    np.testing.assert_allclose(ens.influence_matrix(xt, yt), want, rtol=1e-9)
    np.testing.assert_allclose(ens.influence_matrix(xt, yt, indices=[5, 1]), want[:, [5, 1]], rtol=1e-9)
    # a callable factory, and the registry's name
    fac = Ensemble(lambda: InfluenceFunction(CGSolver(damping=0.01, tol=1e-10)), members).fit(m)
    np.testing.assert_allclose(fac.influence_matrix(xt, yt), want, rtol=1e-9)
    assert isinstance(get_estimator("ensemble", models=members), Ensemble)
    # checkpoints of one run: members at each theta
    cps = [(members[1].theta_, 0.1), (members[2].theta_, 0.1)]
    ck = Ensemble.from_checkpoints(m, cps, "grad_dot").fit(m).influence_matrix(xt, yt)
    want_ck = np.mean([get_estimator("grad_dot").fit(k).influence_matrix(xt, yt) for k in members[1:]], axis=0)
    np.testing.assert_allclose(ck, want_ck, rtol=1e-9)
    # None: the fitted model alone
    alone = Ensemble("grad_dot").fit(m).influence_matrix(xt, yt)
    np.testing.assert_allclose(alone, get_estimator("grad_dot").fit(m).influence_matrix(xt, yt), rtol=1e-12)


def test_ensemble_refuses_what_it_cannot_average(multiclass_model):
    m = multiclass_model
    with pytest.raises(ValueError, match="member 1"):
        Ensemble("grad_dot", [m, m.on_training_subset(np.arange(50))]).fit(m)
    with pytest.raises(ValueError, match="registry name"):
        Ensemble(InfluenceFunction(), [m])
    with pytest.raises(ValueError, match="at least one"):
        Ensemble("grad_dot", [])
    with pytest.raises(ValueError, match="damping"):
        Ensemble("influence", [m], solver="cg", damping=-1.0)  # options checked at construction

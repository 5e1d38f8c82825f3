"""What a new user met running dattri's benchmark through the README's API, each fixed: a
failed CG's advice, solver diagnostics from influence_matrix, Arnoldi's default fill, TracIn
over separately trained models, and no retracing warnings from an ensemble's kernels."""
import logging
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from influence import ArnoldiSolver, CGSolver, InfluenceFunction, SolveFailedError  # noqa: E402
from influence.estimators import TRAK, TracIn  # noqa: E402


def test_failed_cg_reports_itself_in_influence_matrix_and_advises_by_its_on_failure(multiclass_model, digits,
                                                                                    caplog):
    m = multiclass_model
    X, y = digits
    with pytest.raises(SolveFailedError, match="on_failure='warn'"):
        InfluenceFunction(CGSolver(maxiter=2)).fit(m).influence_matrix(X[-4:], y[-4:])
    est = InfluenceFunction(CGSolver(maxiter=2, on_failure="warn")).fit(m)
    with caplog.at_level(logging.WARNING, logger="influence"):
        est.influence_matrix(X[-4:], y[-4:])
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "solve_results_" in text and "pass on_failure='warn'" not in text  # no advice to pass what was passed
    assert est.converged_ is False
    [res] = est.solve_results_
    assert res.iterations == 2 and not res.converged and res.residual > 1e-6 and res.x is None
    assert res.info["tests"] == [0, 4]
    ok = InfluenceFunction(CGSolver(tol=1e-8))
    ok.fit(m).influence_matrix(X[-4:], y[-4:], test_chunk=2)
    assert ok.converged_ is True and [r.info["tests"] for r in ok.solve_results_] == [[0, 2], [2, 4]]
    with pytest.raises(AttributeError, match="influence_matrix first"):
        InfluenceFunction(CGSolver()).fit(m).converged_


def test_arnoldi_default_fill_keeps_the_complement_when_damped(multiclass_model):
    m = multiclass_model
    H = m.hessian()
    v = np.random.default_rng(2).standard_normal(m.n_params)
    lam, V = np.linalg.eigh(H)
    lam, V = lam[::-1][:15], V[:, ::-1][:, :15]
    d = 0.05
    want = V @ ((V.T @ v) / (lam + d)) + (v - V @ (V.T @ v)) / d  # the inverse of (rank-15 part + d I)
    got = m.inverse_hvp(v, "arnoldi", rank=15, damping=d, tol=1e-10)
    assert np.linalg.norm(got.x - want) / np.linalg.norm(want) < 1e-6 and got.info["fill"] == 0.0
    undamped = m.inverse_hvp(v, "arnoldi", rank=15, tol=1e-10)
    assert undamped.info["fill"] is None  # nothing to divide the complement by: dropped
    want0 = V @ ((V.T @ v) / lam)
    assert np.linalg.norm(undamped.x - want0) / np.linalg.norm(want0) < 1e-6
    with pytest.raises(ValueError, match="fill"):
        ArnoldiSolver(fill="zero")


def test_tracin_over_separately_trained_models(multiclass_model, digits):
    m = multiclass_model
    X, y = digits
    rng = np.random.default_rng(1)
    m2 = m.at_theta(m.theta_ + 0.01 * rng.standard_normal(m.n_params))
    got = TracIn(models=[m, m2], learning_rate=0.5).fit(m).influence_matrix(X[-3:], y[-3:])
    want = TracIn([(m.theta_, 0.5), (m2.theta_, 0.5)]).fit(m).influence_matrix(X[-3:], y[-3:])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    other = m.on_training_subset(np.arange(100))
    with pytest.raises(ValueError, match="member 1"):
        TracIn(models=[m, other]).fit(m)
    with pytest.raises(ValueError, match="not both"):
        TracIn([(m.theta_, 1.0)], models=[m])
    with pytest.raises(ValueError, match="learning_rate"):
        TracIn(models=[m], learning_rate=0)


def _retracing_messages(run):
    import tensorflow as tf

    seen = []

    class Grab(logging.Handler):
        def emit(self, record):
            if "triggered tf.function retracing" in record.getMessage():
                seen.append(record.getMessage())

    h = Grab()
    logger = tf.get_logger()
    level, disabled = logger.level, logger.disabled
    logger.setLevel(logging.WARNING)  # whatever an earlier test or the environment set
    logger.disabled = False
    logger.addHandler(h)
    try:
        run()
    finally:
        logger.removeHandler(h)
        logger.setLevel(level)
        logger.disabled = disabled
    return seen


def test_an_ensemble_traces_one_kernel_per_member_without_retracing_warnings(multiclass_model, digits):
    import tensorflow as tf

    m = multiclass_model
    X, y = digits
    rng = np.random.default_rng(4)
    members = [m] + [m.at_theta(m.theta_ + 0.01 * rng.standard_normal(m.n_params)) for _ in range(6)]

    def many_functions():  # what TensorFlow warns about: the check can see the warning
        for k in range(8):
            f = tf.function(lambda x, k=k: x * k)
            f(tf.constant(1.0))
            f(tf.constant([1.0, 2.0]))
    assert _retracing_messages(many_functions)
    assert not _retracing_messages(lambda: TRAK(proj_dim=64, models=members, projection="gaussian")
                                   .fit(m).influence_matrix(X[-3:], y[-3:]))
    assert not _retracing_messages(lambda: TracIn(models=members).fit(m).influence_matrix(X[-3:], y[-3:]))


def test_tracin_through_per_checkpoint_indexes(multiclass_model, digits):
    m = multiclass_model
    X, y = digits
    rng = np.random.default_rng(5)
    cps = [(m.theta_ + 0.01 * rng.standard_normal(m.n_params), 0.3), (m.theta_, 0.1)]
    want = TracIn(cps).fit(m).influence_matrix(X[-3:], y[-3:])
    est = TracIn(cps, proj_dim=10 ** 6).fit(m)  # >= p: the exact projection, so equal to solve precision
    got = est.influence_matrix(X[-3:], y[-3:])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())
    first = est._indexes[0][2]
    est.influence_matrix(X[-2:], y[-2:])
    assert est._indexes[0][2] is first  # built once, queried again

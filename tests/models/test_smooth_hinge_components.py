"""Smooth hinge loss derivatives, the t -> 0 limit, and the Fig 1 influence components."""
import numpy as np
import pytest

from influence import BinaryLogisticRegression
from influence.applications.components import influence_components, top_k_overlap
from influence.models.smooth_hinge import SmoothHingeSVM, smooth_hinge


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5))
    y = np.where(X @ np.array([1.0, -2.0, 0.5, 0.0, 1.0]) + 0.3 * rng.standard_normal(40) > 0, 1, -1)
    return X, y


@pytest.mark.parametrize("t", [1e-3, 0.01, 0.1, 1.0])
def test_smooth_hinge_grad_and_hessian_match_finite_differences(tiny, t):
    X, y = tiny
    m = SmoothHingeSVM(temp=t, weight_decay=0.01)
    m.set_training_data(X, y)
    # theta chosen so that margins sit near 1, where small t bends sharply
    theta = np.array([0.3, -0.5, 0.1, 0.05, 0.2])
    m.set_theta(theta)
    f = lambda th: np.mean(smooth_hinge(y * (X @ th), t)) + 0.005 * th @ th  # noqa: E731
    assert m.objective() == pytest.approx(f(theta), rel=1e-12)
    h = 1e-6 * max(t, 1e-3)
    eye = np.eye(5)
    fd_grad = np.array([(f(theta + h * e) - f(theta - h * e)) / (2 * h) for e in eye])
    np.testing.assert_allclose(m.gradient(), fd_grad, rtol=1e-5, atol=1e-8)
    H = m.hessian()
    fd_H = np.array([(m.gradient(theta + h * e) - m.gradient(theta - h * e)) / (2 * h) for e in eye])
    np.testing.assert_allclose(H, fd_H, rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(H))


def test_small_temperature_does_not_overflow():
    s = np.array([-1e4, -5.0, 0.999, 1.0, 1.001, 50.0, 1e4])
    for t in (1e-3, 1e-6):
        v = smooth_hinge(s, t)
        assert np.all(np.isfinite(v)) and np.all(v >= 0)
    m = SmoothHingeSVM(temp=1e-3, weight_decay=0.01)
    X = np.array([[1e3, 0.0], [-1e3, 1.0], [0.5, 0.5]])
    m.set_training_data(X, np.array([1, 1, -1])).set_theta(np.array([1.0, 1.0]))
    assert np.isfinite(m.objective()) and np.all(np.isfinite(m.gradient())) and np.all(np.isfinite(m.hessian()))


def test_temperature_to_zero_approaches_hinge():
    s = np.linspace(-2, 3, 101)
    hinge = np.maximum(0, 1 - s)
    errs = [np.max(np.abs(smooth_hinge(s, t) - hinge)) for t in (0.1, 0.01, 0.001)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] <= 0.001 * np.log(2) + 1e-12  # the largest gap is t log 2, at s = 1
    np.testing.assert_array_equal(smooth_hinge(s, 0), hinge)


def test_hinge_hvp_is_zero_away_from_margin(tiny):
    X, y = tiny
    m = SmoothHingeSVM(temp=0.0, weight_decay=0.0)
    m.set_training_data(X, y).set_theta(np.array([0.3, -0.5, 0.1, 0.05, 0.2]))
    margins = y * (X @ m.theta_)
    assert np.all(np.abs(margins - 1) > 1e-6)
    v = np.random.default_rng(1).standard_normal(5)
    np.testing.assert_array_equal(m.hvp(v), np.zeros(5))
    # the loss gradient of a violator is -y x, of a point beyond the margin zero
    G = m.per_example_gradients(include_regularizer=False)
    viol = margins < 1
    np.testing.assert_allclose(G[viol], -(y[viol, None] * X[viol]))
    np.testing.assert_array_equal(G[~viol], 0)


def test_svm_t0_matches_hinge_objective_minimum(tiny):
    X, y = tiny
    svm = SmoothHingeSVM(temp=0.0, weight_decay=0.1).fit(X, y)
    smooth = SmoothHingeSVM(temp=1e-4, weight_decay=0.1).fit(X, y)
    # the LinearSVC optimum of the hinge objective is within t log 2 of the smooth optimum's value
    assert svm.objective() <= svm.objective(smooth.theta_) + 1e-6
    assert abs(svm.objective() - smooth.objective()) < 1e-3
    assert svm.score(X, y) > 0.8


def test_influence_components_against_hand_computation():
    X = np.array([[1.0, 0.5], [-0.5, 1.0], [0.3, -1.2], [2.0, 0.1]])
    y = np.array([1, 0, 0, 1])
    m = BinaryLogisticRegression(weight_decay=0.1).fit(X, y)
    w = m.theta_
    x_t, y_t = np.array([0.7, -0.2]), 1
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    p = sig(X @ w)
    H = (X.T * (p * (1 - p))) @ X / 4 + 0.1 * np.eye(2)
    g_test = (sig(x_t @ w) - y_t) * x_t
    G = (p - y)[:, None] * X  # loss gradients of the training points
    y_pm = 2 * y - 1
    comps = influence_components(m, x_t, y_t)
    np.testing.assert_allclose(comps["full"], -G @ np.linalg.solve(H, g_test), rtol=1e-10)
    np.testing.assert_allclose(comps["no_hessian"], -G @ g_test, rtol=1e-10)  # plain gradient dot product
    np.testing.assert_allclose(comps["no_train_loss"], y_pm * (X @ np.linalg.solve(H, g_test)), rtol=1e-10)
    np.testing.assert_allclose(comps["neither"], y_pm * (X @ g_test), rtol=1e-10)
    # the paper's closed form of the full influence
    paper = -(2 * y_t - 1) * y_pm * sig(-(2 * y_t - 1) * w @ x_t) * sig(-y_pm * (X @ w)) * (X @ np.linalg.solve(H, x_t))
    np.testing.assert_allclose(comps["full"], paper, rtol=1e-10)


def test_top_k_overlap():
    a = np.array([5.0, -4, 3, 0.1, 0.2])
    assert top_k_overlap(a, a, 3) == 1.0
    assert top_k_overlap(a, np.array([0.0, 0, 0, 9, 8]), 2) == 0.0
    assert top_k_overlap(a, np.array([1.0, 0, 0, 9, 8]), 2) == 0.0
    assert top_k_overlap(a, np.array([10.0, 0, 0, 9, 8]), 2) == 0.5

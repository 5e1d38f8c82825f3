"""Gradients, HVPs, Hessians and per-example quantities against closed forms and loops."""
import numpy as np
import pytest

from conftest import multiclass_hessian_closed_form, softmax


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_multiclass_hvp_matches_closed_form_hessian(multiclass_model):
    m = multiclass_model
    H = multiclass_hessian_closed_form(m.X_train_np_, m.theta_.reshape(-1, 10), m.weight_decay)
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.standard_normal(m.n_params)
        assert rel(m.hvp(v), H @ v) < 1e-8
    assert rel(m.hessian(), H) < 1e-8


def test_binary_hvp_and_closed_form_hessian(binary_model):
    m = binary_model
    X, w = m.X_train_np_, m.theta_
    p = 1 / (1 + np.exp(-X @ w))
    H = (X.T * (p * (1 - p))) @ X / len(X) + m.weight_decay * np.eye(len(w))
    v = np.random.default_rng(1).standard_normal(len(w))
    assert rel(m.hvp(v), H @ v) < 1e-8
    assert rel(m.hessian(), H) < 1e-10


def test_gradient_matches_closed_form_and_vanishes_at_optimum(multiclass_model):
    m = multiclass_model
    X, y = m.X_train_np_, m.y_train_np_
    W = m.theta_.reshape(-1, 10)
    P = softmax(X @ W)
    P[np.arange(len(y)), y] -= 1
    g = (X.T @ P / len(y) + m.weight_decay * W).ravel()
    assert rel(m.gradient(), g) < 1e-8 or np.linalg.norm(g) < 1e-10
    assert m.grad_norm_ < 1e-8
    theta = m.theta_ + 0.01
    W = theta.reshape(-1, 10)
    P = softmax(X @ W)
    P[np.arange(len(y)), y] -= 1
    assert rel(m.gradient(theta), (X.T @ P / len(y) + m.weight_decay * W).ravel()) < 1e-10


def test_batched_sums_equal_single_batch(digits):
    from influence import LogisticRegression

    X, y = digits
    a = LogisticRegression(weight_decay=0.01, batch_size=10000).fit(X[:300], y[:300])
    b = LogisticRegression(weight_decay=0.01, batch_size=37)
    b.set_training_data(X[:300], y[:300]).set_theta(a.theta_)
    v = np.random.default_rng(2).standard_normal(a.n_params)
    assert rel(b.hvp(v), a.hvp(v)) < 1e-12
    assert abs(b.objective() - a.objective()) < 1e-12
    s = np.random.default_rng(3).standard_normal(a.n_params)
    np.testing.assert_allclose(b.gradient_dots(s), a.gradient_dots(s), rtol=1e-10, atol=1e-12)


def test_per_example_gradients_equal_loop(multiclass_model):
    m = multiclass_model
    idx = np.array([0, 5, 17, 399])
    G = m.per_example_gradients(idx, include_regularizer=False)
    for row, i in zip(G, idx):
        np.testing.assert_allclose(row, m.loss_gradient(m.X_train_np_[i:i + 1], m.y_train_np_[i:i + 1]),
                                   rtol=1e-10, atol=1e-14)
    Greg = m.per_example_gradients(idx)
    np.testing.assert_allclose(Greg - G, np.tile(m.weight_decay * m.theta_, (4, 1)), atol=1e-14)


def test_forward_mode_scores_equal_gradient_matrix(multiclass_model):
    m = multiclass_model
    s = np.random.default_rng(4).standard_normal(m.n_params)
    G = m.per_example_gradients()
    np.testing.assert_allclose(m.gradient_dots(s), G @ s, rtol=1e-9, atol=1e-12)


def test_many_vector_hvp_equals_columns(binary_model):
    m = binary_model
    V = np.random.default_rng(5).standard_normal((m.n_params, 3))
    HV = m.hvp(V)
    for k in range(3):
        np.testing.assert_allclose(HV[:, k], m.hvp(V[:, k]), rtol=1e-10, atol=1e-13)


def test_subsampled_hvp(binary_model):
    m = binary_model
    idx = np.array([3, 4, 9])
    X = m.X_train_np_[idx]
    p = 1 / (1 + np.exp(-X @ m.theta_))
    H = (X.T * (p * (1 - p))) @ X / 3 + m.weight_decay * np.eye(m.n_params)
    v = np.random.default_rng(6).standard_normal(m.n_params)
    assert rel(m.hvp(v, indices=idx), H @ v) < 1e-10


def test_eigenvalue_bounds_match_dense(binary_model):
    m = binary_model
    w = np.linalg.eigvalsh(m.hessian())
    lmin, lmax = m.hessian_eigenvalue_bounds(tol=1e-8)
    assert lmax == pytest.approx(w[-1], rel=1e-5)
    assert lmin == pytest.approx(w[0], rel=1e-3)

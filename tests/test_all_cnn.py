"""The all-convolutional CNN: parameter count, per-example gradients, batched HVPs, damped CG."""
import numpy as np
import pytest

from influence.all_cnn import AllCNN


def test_parameter_count_and_layout():
    m = AllCNN(adam_steps=0, lbfgs_iter=0)
    X = np.random.default_rng(0).random((4, 28, 28, 1))
    m.set_training_data(X, np.array([0, 1, 2, 3]))
    assert m.n_params == 2616
    assert m.keras_model_.count_params() == 2616
    kernels = [b for b in m.blocks_ if b.decay]
    assert len(kernels) == 7 and all(b.name.endswith("kernel") for b in kernels)
    assert m.outputs(X).shape == (4, 10)
    # init: kernels ~ N(0, 2/sqrt(k^2 c_in)), biases zero
    params = m.params()
    first = params[m.blocks_[0].name]
    assert first.shape == (3, 3, 1, 8)
    assert np.all(params[m.blocks_[1].name] == 0)
    big = AllCNN(adam_steps=0, lbfgs_iter=0, seed=3)
    big.set_training_data(X, np.zeros(4, int))
    conv2 = big.params()[big.blocks_[2].name]
    assert abs(conv2.std() - 2 / np.sqrt(9 * 8)) < 0.05


@pytest.fixture(scope="module")
def tiny_cnn():
    rng = np.random.default_rng(0)
    X = rng.random((24, 8, 8, 1))
    y = rng.integers(0, 3, 24)
    m = AllCNN(n_classes=3, channels=(2, 2), strides=(1, 2), weight_decay=0.01, adam_steps=300, learning_rate=0.01,
               train_batch_size=8, lbfgs_iter=200, batch_size=7)
    return m.fit(X, y)


def test_vectorised_per_example_gradients_equal_loop(tiny_cnn):
    m = tiny_cnn
    G = m.per_example_gradients(include_regularizer=False)
    for i in (0, 5, 23):
        np.testing.assert_allclose(G[i], m.loss_gradient(m.X_train_np_[i:i + 1], m.y_train_np_[i:i + 1]),
                                   rtol=1e-10, atol=1e-13)
    s = np.random.default_rng(1).standard_normal(m.n_params)
    np.testing.assert_allclose(m.influence_scores(s, include_regularizer=False), G @ s, rtol=1e-9, atol=1e-12)


def test_batched_hvp_equals_whole_set_hvp(tiny_cnn):
    m = tiny_cnn
    whole = AllCNN(**{**m.get_config(), "batch_size": 1000})
    whole.set_training_data(m.X_train_np_, m.y_train_np_).set_theta(m.theta_)
    v = np.random.default_rng(2).standard_normal(m.n_params)
    assert len(m._slices(m.n_train_)) == 4 and len(whole._slices(whole.n_train_)) == 1
    np.testing.assert_allclose(m.hvp(v), whole.hvp(v), rtol=1e-10, atol=1e-13)
    # and the HVP is the derivative of the gradient
    h = 1e-6
    fd = (m.gradient(m.theta_ + h * v) - m.gradient(m.theta_ - h * v)) / (2 * h)
    np.testing.assert_allclose(m.hvp(v), fd, rtol=1e-5, atol=1e-7)


def test_damped_cg_matches_explicit_damped_solve(tiny_cnn):
    m = tiny_cnn
    H = m.hessian()
    np.testing.assert_allclose(H, H.T, atol=1e-10)
    v = m.test_gradient(m.X_train_np_[0], m.y_train_np_[0])
    damping = 0.01 + max(0.0, -np.linalg.eigvalsh(H)[0])
    want = np.linalg.solve(H + damping * np.eye(m.n_params), v)
    res = m.inverse_hvp(v, "cg", damping=damping, tol=1e-12, maxiter=2000)
    np.testing.assert_allclose(res.x, want, rtol=1e-6, atol=1e-9)
    assert res.residual < 1e-8

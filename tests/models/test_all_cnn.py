"""The all-convolutional CNN: parameter count, per-example gradients, batched HVPs, damped CG."""
import numpy as np
import pytest

from conftest import fit_tiny_cnn
from influence.models.all_cnn import AllCNN


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
    return fit_tiny_cnn(adam_steps=300, lbfgs_iter=200)


def test_vectorised_per_example_gradients_equal_loop(tiny_cnn):
    m = tiny_cnn
    G = m.per_example_gradients(include_regularizer=False)
    for i in (0, 5, 23):
        np.testing.assert_allclose(G[i], m.loss_gradient(m.X_train_np_[i:i + 1], m.y_train_np_[i:i + 1]),
                                   rtol=1e-10, atol=1e-13)
    s = np.random.default_rng(1).standard_normal(m.n_params)
    np.testing.assert_allclose(m.gradient_dots(s, include_regularizer=False), G @ s, rtol=1e-9, atol=1e-12)


def test_batched_hvp_equals_whole_set_hvp(tiny_cnn):
    m = tiny_cnn
    whole = AllCNN(**{**m.get_config(), "batch_size": 1000})
    whole.set_training_data(m.X_train_np_, m.y_train_np_).set_theta(m.theta_)
    v = np.random.default_rng(2).standard_normal(m.n_params)
    assert len(m.slices(m.n_train_)) == 4 and len(whole.slices(whole.n_train_)) == 1
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


def test_coupled_adam_retraining():
    """Weight 0 removes exactly one point from the same batch sequence; the control repeats it."""
    import pickle

    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (24, 8, 8, 1))
    y = rng.integers(0, 3, 24)
    m = AllCNN(n_classes=3, channels=(2, 2), strides=(1, 2), weight_decay=0.01, adam_steps=40, learning_rate=0.01,
               train_batch_size=8, retrain="adam", retrain_steps=15, retrain_seed=5, seed=1).fit(X, y)
    assert m.adam_state_ is not None and m.adam_state_[2] == 40
    assert m.final_learning_rate_ == pytest.approx(0.01 * 0.01)
    m.retrain_learning_rate = 0.01  # visible moves
    control = m.retrain_without([])
    assert not np.allclose(control, m.theta_)
    np.testing.assert_array_equal(control, m.retrain_without([]))  # deterministic
    loo = m.retrain_without([3])
    assert not np.allclose(loo, control)
    # reference: the same Adam steps by hand, batch gradients over the batch minus point 3
    th, (mm, vv, t) = m.theta_.copy(), (m.adam_state_[0].copy(), m.adam_state_[1].copy(), m.adam_state_[2])
    order_rng = np.random.default_rng(5)
    order, pos = order_rng.permutation(24), 0
    for _ in range(15):
        if pos + 8 > 24:
            order, pos = order_rng.permutation(24), 0
        batch = [i for i in order[pos:pos + 8] if i != 3]
        pos += 8
        ref = AllCNN(**m.get_config())
        ref.set_training_data(X[batch], y[batch])
        _, g = ref.objective_and_gradient(th)
        t += 1
        mm = 0.9 * mm + 0.1 * g
        vv = 0.999 * vv + 0.001 * g * g
        th = th - 0.01 * (mm / (1 - 0.9 ** t)) / (np.sqrt(vv / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(loo, th, rtol=1e-9, atol=1e-12)
    clone = pickle.loads(pickle.dumps(m))  # worker processes get the optimiser state too
    np.testing.assert_allclose(clone.retrain_without([3]), loo, rtol=1e-12, atol=1e-14)

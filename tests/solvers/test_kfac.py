"""K-FAC and EK-FAC against closed forms and explicit numpy references."""
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from influence import KerasModel  # noqa: E402
from influence.solvers.kfac import compute_factors  # noqa: E402


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def softmax_hessians(F):
    P = np.exp(F - F.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    return np.stack([np.diag(p) - np.outer(p, p) for p in P])


def per_example_jacobians(model):
    """d f_i / d theta for every training point, (n, k, p), by tf's jacobian one point at a time."""
    th = tf.constant(model.theta_)
    out = []
    for i in range(model.n_train_):
        with tf.GradientTape() as tape:
            tape.watch(th)
            f = tf.reshape(model._forward(model.unflatten(th), model.X_train_[i:i + 1]), [-1])
        out.append(tape.jacobian(f, th).numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def linear_regression():
    """Three-output linear regression (Dense with bias, squared loss), 200 Gaussian points in 6 dims."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 6))
    Y = X @ rng.standard_normal((6, 3)) + 0.1 * rng.standard_normal((200, 3))
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((6,), dtype="float64"), keras.layers.Dense(3, dtype="float64")])
    return KerasModel(net, loss="squared", weight_decay=0.0).fit(X, Y)


def test_kfac_is_exact_for_linear_regression(linear_regression):
    m = linear_regression
    (f,) = compute_factors(m)
    X1 = np.hstack([m.X_train_np_, np.ones((m.n_train_, 1))])
    np.testing.assert_allclose(f.A, X1.T @ X1 / m.n_train_, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(f.S, np.eye(3), rtol=1e-12, atol=1e-14)  # d2/df2 of |f - y|^2 / 2
    np.testing.assert_allclose(np.kron(f.A, f.S), m.hessian(), rtol=1e-10, atol=1e-12)  # [kernel; bias] = theta
    V = np.random.default_rng(1).standard_normal((m.n_params, 3))
    exact = m.inverse_hvp(V, "exact").x
    for name in ("kfac", "ekfac"):
        res = m.inverse_hvp(V, name)
        assert rel(res.x, exact) < 1e-10, name
        assert res.residual < 1e-10


def test_sampled_fisher_converges_to_the_expectation(linear_regression):
    m = linear_regression
    (f,) = compute_factors(m)
    errors = [np.linalg.norm(compute_factors(m, "mc", mc_samples=k, seed=3)[0].S - f.S) for k in (1, 16, 256)]
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.2 * errors[0]
    again = compute_factors(m, "mc", mc_samples=16, seed=3)[0].S
    np.testing.assert_array_equal(again, compute_factors(m, "mc", mc_samples=16, seed=3)[0].S)  # seeded


@pytest.fixture(scope="module")
def tiny_mlp(digits):
    X, y = digits
    keras.utils.set_random_seed(1)
    net = keras.Sequential([keras.Input((64,), dtype="float64"),
                            keras.layers.Dense(5, activation="tanh", dtype="float64"),
                            keras.layers.Dense(3, dtype="float64")])
    keep = y < 3
    m = KerasModel(net, loss="softmax", weight_decay=0.01)
    m.set_training_data(X[keep][:60], y[keep][:60])
    return m


def test_kfac_factors_and_ekfac_eigenvalues_of_a_two_layer_mlp(tiny_mlp):
    m = tiny_mlp
    W1, b1, W2, b2 = (p.numpy() for p in m.unflatten(tf.constant(m.theta_)))
    X, n = m.X_train_np_, m.n_train_
    Hid = np.tanh(X @ W1 + b1)
    Hf = softmax_hessians(Hid @ W2 + b2)
    one = np.ones((n, 1))
    f1, f2 = compute_factors(m, corrected=True)
    np.testing.assert_allclose(f1.A, np.hstack([X, one]).T @ np.hstack([X, one]) / n, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(f2.A, np.hstack([Hid, one]).T @ np.hstack([Hid, one]) / n, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(f2.S, Hf.mean(axis=0), rtol=1e-10, atol=1e-13)
    Js = W2[None] * (1 - Hid ** 2)[:, :, None]  # d f / d s1 = diag(1 - h^2) W2, (n, 5, 3)
    np.testing.assert_allclose(f1.S, np.einsum("nij,njk,nlk->il", Js, Hf, Js) / n, rtol=1e-10, atol=1e-13)
    # EK-FAC: diag(Q^T G_block Q) with G_block from the per-example Jacobians
    J = per_example_jacobians(m)
    G = np.einsum("nki,nkl,nlj->ij", J, Hf, J) / n
    sizes = [b.size for b in m.blocks_]
    starts = np.cumsum([0] + sizes)
    for f, (k, b) in zip((f1, f2), ((0, 1), (2, 3))):
        sl = slice(starts[k], starts[b + 1])
        Q = np.kron(f.qa, f.qs)
        np.testing.assert_allclose(f.corrected.reshape(-1), np.diag(Q.T @ G[sl, sl] @ Q), rtol=1e-8, atol=1e-12)


def im2col(X, k, stride):
    n, H, W, C = X.shape
    out = (H - k) // stride + 1, (W - k) // stride + 1
    return np.stack([np.stack([X[:, r * stride:r * stride + k, c * stride:c * stride + k, :].reshape(n, -1)
                               for c in range(out[1])], axis=1) for r in range(out[0])], axis=1), out


def test_conv_factors_equal_an_im2col_reference():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((30, 7, 7, 2))
    y = rng.integers(0, 3, 30)
    keras.utils.set_random_seed(2)
    net = keras.Sequential([keras.Input((7, 7, 2), dtype="float64"),
                            keras.layers.Conv2D(4, 3, strides=2, padding="valid", activation="tanh", dtype="float64"),
                            keras.layers.Flatten(dtype="float64"), keras.layers.Dense(3, dtype="float64")])
    m = KerasModel(net, loss="softmax", weight_decay=0.01)
    m.set_training_data(X, y)
    K, b, Wd, bd = (p.numpy() for p in m.unflatten(tf.constant(m.theta_)))
    patches, (h, w) = im2col(X, 3, 2)                           # (n, h, w, 18)
    P = np.concatenate([patches, np.ones((30, h, w, 1))], -1).reshape(30, h * w, 19)
    s = patches @ K.reshape(18, 4) + b                          # (n, h, w, 4) pre-activations
    F = np.tanh(s).reshape(30, -1) @ Wd + bd
    Hf = softmax_hessians(F)
    Js = Wd.reshape(h * w, 4, 3)[None] * (1 - np.tanh(s) ** 2).reshape(30, h * w, 4, 1)  # d f / d s_t
    fc, fd = compute_factors(m)
    T = h * w
    np.testing.assert_allclose(fc.A, np.einsum("nti,ntj->ij", P, P) / 30, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(fc.S, np.einsum("ntik,nkl,ntjl->ij", Js, Hf, Js) / (30 * T), rtol=1e-10, atol=1e-13)
    Z = np.hstack([np.tanh(s).reshape(30, -1), np.ones((30, 1))])
    np.testing.assert_allclose(fd.A, Z.T @ Z / 30, rtol=1e-10, atol=1e-13)
    # the taps reproduce the model's outputs
    out, _ = m._kfac_taps(m.unflatten(tf.constant(m.theta_)), tf.constant(X))
    np.testing.assert_allclose(out.numpy(), F, rtol=1e-10, atol=1e-12)


def test_an_unsupported_layer_is_named():
    keras.utils.set_random_seed(3)
    net = keras.Sequential([keras.Input((4,), dtype="float64"), keras.layers.Dense(3, dtype="float64"),
                            keras.layers.LayerNormalization(dtype="float64", name="norm"),
                            keras.layers.Dense(2, dtype="float64", name="head")])
    rng = np.random.default_rng(3)
    m = KerasModel(net, loss="softmax").fit(rng.standard_normal((20, 4)), rng.integers(0, 2, 20))
    with pytest.raises(ValueError, match="'norm' \\(LayerNormalization\\)"):
        m.inverse_hvp(np.ones(m.n_params), "kfac")
    # the same model is fine when only the Dense layers are parameters of interest
    ok = KerasModel(net, loss="softmax", trainable=["head"])
    ok.set_training_data(rng.standard_normal((20, 4)), rng.integers(0, 2, 20))
    assert np.all(np.isfinite(ok.inverse_hvp(np.ones(ok.n_params), "kfac", damping=0.1).x))


def test_residual_is_against_the_true_damped_hessian(multiclass_model):
    m = multiclass_model
    v = np.random.default_rng(4).standard_normal(m.n_params)
    H = m.hessian()
    for name in ("kfac", "ekfac"):
        res = m.inverse_hvp(v, name, damping=0.1)
        true = np.linalg.norm((H + 0.1 * np.eye(m.n_params)) @ res.x - v) / np.linalg.norm(v)
        assert res.residual == pytest.approx(true, rel=1e-8)
        assert res.damping == 0.1 and 0 < res.residual < 1


def test_many_columns_check_the_residual_on_the_first_few(multiclass_model):
    """A wide solve checks its residual on the first ``residual_columns`` columns (one HVP pass
    each), the maximum of their true residuals; ``None`` checks all; the solution is the same."""
    m = multiclass_model
    V = np.random.default_rng(5).standard_normal((m.n_params, 5))
    V[:, 4] *= 0.0  # a zero column: absolute residual 0, never the maximum
    H = m.hessian() + 0.1 * np.eye(m.n_params)
    for name in ("kfac", "ekfac"):
        part = m.inverse_hvp(V, name, damping=0.1, residual_columns=3)
        full = m.inverse_hvp(V, name, damping=0.1, residual_columns=None)
        np.testing.assert_array_equal(part.x, full.x)
        true = np.linalg.norm(H @ full.x - V, axis=0) / np.maximum(np.linalg.norm(V, axis=0), 1e-300)
        assert part.info["residual_columns"] == 3 and full.info["residual_columns"] == 5
        assert part.residual == pytest.approx(true[:3].max(), rel=1e-8)
        assert full.residual == pytest.approx(true[:4].max(), rel=1e-8)
    with pytest.raises(ValueError, match="residual_columns"):
        m.inverse_hvp(V, "kfac", residual_columns=0)


def test_kfac_through_every_influence_quantity(multiclass_model, digits, tmp_path):
    """influence_matrix, the s_test cache and damping='auto' accept the Kronecker solvers; EK-FAC's
    influence of every training point tracks the exact one on the convex model."""
    m = multiclass_model
    X, y = digits
    exact = m.influence_matrix(X[-3:], y[-3:], solver="exact")
    ek = m.influence_matrix(X[-3:], y[-3:], solver="ekfac")
    assert ek.shape == exact.shape
    assert min(np.corrcoef(a, b)[0, 1] for a, b in zip(ek, exact)) > 0.9
    auto = m.inverse_hvp(m.test_gradient(X[-1], y[-1]), "kfac", damping="auto")
    assert auto.damping == 0.0 and auto.info["damping_auto"]  # convex: no damping
    m2 = type(m)(**{**m.get_config(), "cache_dir": str(tmp_path)})
    m2.set_training_data(m.X_train_np_, m.y_train_np_).set_theta(m.theta_)
    first = m2.s_test(X[-1], y[-1], solver="ekfac")
    second = m2.s_test(X[-1], y[-1], solver="ekfac")
    np.testing.assert_array_equal(first.x, second.x)
    assert len(list(tmp_path.glob("s_test-*.npz"))) == 1
    m2.s_test(X[-1], y[-1], solver="ekfac", fisher="mc", seed=1)
    assert len(list(tmp_path.glob("s_test-*.npz"))) == 2  # the sampling settings are part of the key


def test_all_cnn_taps_and_ekfac():
    """The paper's CNN (tiny): the taps reproduce its outputs, every parameter block is covered
    (five Conv2D layers and the Dense head), and an EK-FAC solve reports its true residual."""
    from conftest import fit_tiny_cnn

    m = fit_tiny_cnn(dtype="float64", adam_steps=200)
    th = tf.constant(m.theta_)
    out, taps = m._kfac_taps(m.unflatten(th), m.X_train_)
    np.testing.assert_allclose(out.numpy(), m.outputs(m.X_train_np_), rtol=1e-12, atol=1e-12)
    assert [t.kind for t in taps] == ["conv2d"] * (len(m.channels) + 1) + ["dense"]
    v = np.random.default_rng(5).standard_normal(m.n_params)
    res = m.inverse_hvp(v, "ekfac", damping=0.05)
    H = m.hessian()
    true = np.linalg.norm((H + 0.05 * np.eye(m.n_params)) @ res.x - v) / np.linalg.norm(v)
    assert res.residual == pytest.approx(true, rel=1e-8) and np.all(np.isfinite(res.x))

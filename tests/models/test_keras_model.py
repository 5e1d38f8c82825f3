"""KerasModel: a user's Keras model gives the same numbers as the built-in closed-form models."""
import os
import pickle

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from influence import BinaryLogisticRegression, KerasModel  # noqa: E402


def dense_softmax(d, k, seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((d,), dtype="float64")
    return keras.Model(inp, keras.layers.Dense(k, use_bias=False, dtype="float64", name="logits")(inp))


def test_keras_dense_softmax_equals_logistic_regression(multiclass_model, digits):
    """Same objective and parameter layout (W of shape (d, k)): same optimum, same influence."""
    X, y = digits
    ref = multiclass_model  # LogisticRegression(weight_decay=0.01) on the first 400 digits
    m = KerasModel(dense_softmax(64, 10), loss="softmax", weight_decay=0.01).fit(X[:400], y[:400])
    assert m.n_params == ref.n_params == 640
    np.testing.assert_allclose(m.theta_, ref.theta_, rtol=1e-6, atol=1e-8)
    got = m.influence_up_loss(X[400:402], y[400:402], solver="exact")
    want = ref.influence_up_loss(X[400:402], y[400:402], solver="exact")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * np.abs(want).max())


def test_keras_last_layer_over_frozen_features_equals_binary_logistic_regression(binary_digits):
    """theta = the last layer only; the hidden layer and batch-norm statistics stay as they are
    (inference mode), so the model is binary LR on the frozen features."""
    Xtr, ytr, Xte, yte = binary_digits
    keras.utils.set_random_seed(1)
    inp = keras.Input((64,), dtype="float64")
    h = keras.layers.Dense(12, activation="tanh", dtype="float64", name="hidden")(inp)
    bn = keras.layers.BatchNormalization(dtype="float64", name="bn")
    h = bn(h)
    out = keras.layers.Dense(1, use_bias=False, dtype="float64", name="out")(h)
    net = keras.Model(inp, out)
    bn.moving_mean.assign(np.full(12, 0.1))
    bn.moving_variance.assign(np.full(12, 0.5))
    hidden_before = net.get_layer("hidden").kernel.numpy().copy()

    m = KerasModel(net, loss="sigmoid", trainable=["out"], weight_decay=0.01).fit(Xtr, ytr)
    features = keras.Model(inp, h)
    Ftr, Fte = features(Xtr, training=False).numpy(), features(Xte, training=False).numpy()
    ref = BinaryLogisticRegression(weight_decay=0.01).fit(Ftr, ytr)
    assert m.n_params == 12
    np.testing.assert_allclose(m.theta_, ref.theta_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(m.influence_matrix(Xte[:3], yte[:3], solver="exact"),
                               ref.influence_matrix(Fte[:3], yte[:3], solver="exact"), rtol=1e-5, atol=1e-9)
    # the frozen layer is untouched; update_keras_model writes theta back into the Keras model
    np.testing.assert_array_equal(net.get_layer("hidden").kernel.numpy(), hidden_before)
    m.update_keras_model()
    np.testing.assert_allclose(net(Xte, training=False).numpy()[:, 0], m.outputs(Xte), rtol=1e-12)


def test_set_training_data_studies_the_model_as_it_is(binary_digits):
    Xtr, ytr, _, _ = binary_digits
    keras.utils.set_random_seed(2)
    inp = keras.Input((64,), dtype="float64")
    h = keras.layers.Dense(5, activation="relu", dtype="float64", name="h")(inp)
    net = keras.Model(inp, keras.layers.Dense(2, dtype="float64", name="o")(h))
    m = KerasModel(net, loss="softmax").set_training_data(Xtr, ytr)
    weights = np.concatenate([v.numpy().ravel() for v in net.trainable_variables])
    np.testing.assert_array_equal(m.theta_, weights)
    np.testing.assert_allclose(m.outputs(Xtr[:7]), net(Xtr[:7]).numpy(), rtol=1e-12)
    assert [b.decay for b in m.blocks_] == [True, False, True, False]  # kernels decay, biases do not
    # a copy through pickle (as sent to LOO workers) computes the same objective
    m2 = pickle.loads(pickle.dumps(m))
    assert m2.objective() == pytest.approx(m.objective(), rel=1e-12)


def test_keras_model_rejects_bad_input(binary_digits):
    Xtr, ytr, _, _ = binary_digits
    net = dense_softmax(64, 2)
    with pytest.raises(ValueError, match="loss must be one of"):
        KerasModel(net, loss="hinge")
    with pytest.raises(ValueError, match="no layer named"):
        KerasModel(net, trainable=["nope"])
    with pytest.raises(ValueError, match="inputs of shape"):
        KerasModel(net).set_training_data(Xtr[:, :10], ytr)
    with pytest.raises(ValueError, match="integers in"):
        KerasModel(net).set_training_data(Xtr, ytr + 1)  # labels 1 and 2 for a 2-class output
    with pytest.raises(ValueError, match="0 or 1"):
        KerasModel(dense_softmax(64, 1), loss="sigmoid").set_training_data(Xtr, ytr + 1)


class _Subclassed(keras.Model):
    """A subclassed model whose call() takes no ``training`` flag."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(4, activation="tanh", dtype="float64", name="hidden")
        self.head = keras.layers.Dense(3, dtype="float64", name="head")

    def call(self, x):
        return self.head(self.hidden(x))


def test_subclassed_model_without_training_flag(digits):
    X, y = digits
    X, y = X[:120], y[:120] % 3
    keras.utils.set_random_seed(3)
    net = _Subclassed()
    net(X[:1])
    m = KerasModel(net, trainable=["head"], weight_decay=0.01).fit(X, y)
    assert m.n_params == 4 * 3 + 3 and m.grad_norm_ < 1e-8
    m.update_keras_model()
    np.testing.assert_allclose(m.outputs(X[:5]), net(X[:5]).numpy(), rtol=1e-12)


def test_loo_with_an_unpicklable_keras_model_retrains_in_this_process(digits, caplog):
    """Keras cannot rebuild an unregistered subclassed model from a pickle: leave_one_out
    says so and retrains here, with the numbers of n_jobs=1."""
    from influence import leave_one_out

    X, y = digits
    X, y = X[:80], y[:80] % 3
    keras.utils.set_random_seed(4)
    net = _Subclassed()
    net(X[:1])
    m = KerasModel(net, trainable=["head"], weight_decay=0.01).fit(X[:70], y[:70])
    serial = leave_one_out(m, X[75], y[75], [0, 1], n_jobs=1)
    with caplog.at_level("WARNING", logger="influence.refit_validation"):
        pooled = leave_one_out(m, X[75], y[75], [0, 1], n_jobs=2)
    assert "cannot be sent to worker processes" in caplog.text
    np.testing.assert_array_equal(pooled.actual, serial.actual)


def test_keras_convnet_per_example_gradients_and_influence(digits):
    """A Keras conv net (all parameters, non-convex): vectorised per-example gradients equal
    one-example batch gradients, and the influence matrix equals per-test-point influence."""
    X, y = digits
    X = X.reshape(-1, 8, 8, 1)
    keras.utils.set_random_seed(5)
    net = keras.Sequential([keras.Input((8, 8, 1), dtype="float64"),
                            keras.layers.Conv2D(3, 3, activation="tanh", dtype="float64"),
                            keras.layers.Flatten(dtype="float64"), keras.layers.Dense(10, dtype="float64")])
    m = KerasModel(net, weight_decay=1e-3).set_training_data(X[:60], y[:60])
    G = m.per_example_gradients([4, 17], include_regularizer=False)
    for row, i in zip(G, (4, 17)):
        np.testing.assert_allclose(row, m.loss_gradient(X[i:i + 1], y[i:i + 1]), rtol=1e-10, atol=1e-13)
    damping = 1.0  # theta is not an optimum: damp well past the most negative eigenvalue
    M = m.influence_matrix(X[100:102], y[100:102], solver="exact", damping=damping)
    for k in range(2):
        np.testing.assert_allclose(M[k], m.influence_up_loss(X[100 + k], y[100 + k], solver="exact", damping=damping),
                                   rtol=1e-8, atol=1e-12 * np.abs(M[k]).max())


def test_s_test_cache_tells_architectures_apart(digits, tmp_path):
    """Two Keras models with the same name, shapes and weights but different activations
    give different s_test vectors; the disk cache must not hand one the other's."""
    X, y = digits
    X, y = X[:200], y[:200]
    got = {}
    for act in ("tanh", "sigmoid"):
        keras.utils.set_random_seed(0)
        net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(8, activation=act, dtype="float64"),
                                keras.layers.Dense(10, dtype="float64", name="logits")], name="net")
        cached = KerasModel(net, loss="softmax", weight_decay=0.01, cache_dir=str(tmp_path))
        cached.set_training_data(X, y)
        fresh = KerasModel(net, loss="softmax", weight_decay=0.01).set_training_data(X, y)
        got[act] = cached.s_test(X[:1], y[:1], solver="exact", damping=1.0).x
        np.testing.assert_allclose(got[act], fresh.s_test(X[:1], y[:1], solver="exact", damping=1.0).x,
                                   rtol=1e-10, atol=1e-12)
    assert np.linalg.norm(got["tanh"] - got["sigmoid"]) > 1e-3 * np.linalg.norm(got["tanh"])
    assert len(list(tmp_path.glob("s_test-*.npz"))) == 2


def test_callable_loss_equals_the_built_in_one(multiclass_model, digits):
    """loss=callable: a user's cross-entropy gives the built-in softmax model's influence."""
    import tensorflow as tf

    X, y = digits

    def cross_entropy(logits, labels):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)

    builtin = KerasModel(dense_softmax(64, 10), loss="softmax", weight_decay=0.01).fit(X[:400], y[:400])
    custom = KerasModel(dense_softmax(64, 10), loss=cross_entropy, weight_decay=0.01).fit(X[:400], y[:400])
    np.testing.assert_allclose(custom.theta_, builtin.theta_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(custom.influence_up_loss(X[400:402], y[400:402], solver="exact"),
                               builtin.influence_up_loss(X[400:402], y[400:402], solver="exact"), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="one value per example"):
        KerasModel(dense_softmax(64, 10), loss=lambda out, t: tf.reduce_sum(out)).set_training_data(
            X[:20], y[:20]).objective()
    with pytest.raises(ValueError, match="callable"):
        KerasModel(dense_softmax(64, 10), loss="hinge")


def test_squared_loss_with_several_outputs_is_a_sum_over_outputs(digits):
    """Two regression outputs: the loss is sum_k (f_k - y_k)^2 / 2, so the Hessian of the
    objective over a linear model's weights is the closed form X^T X / n (x) I_2 + wd."""
    X, _ = digits
    X = X[:150]
    Y = np.stack([X[:, :8].sum(axis=1), X[:, 8:16].mean(axis=1)], axis=1)
    keras.utils.set_random_seed(0)
    inp = keras.Input((64,), dtype="float64")
    net = keras.Model(inp, keras.layers.Dense(2, use_bias=False, dtype="float64")(inp))
    m = KerasModel(net, loss="squared", weight_decay=0.1).fit(X, Y)
    W = m.theta_.reshape(64, 2)
    np.testing.assert_allclose(m.losses(X, Y), 0.5 * np.sum((X @ W - Y) ** 2, axis=1), rtol=1e-10)
    H = np.kron(X.T @ X / len(X), np.eye(2)) + 0.1 * np.eye(128)  # theta = W.ravel(): (input, output) order
    np.testing.assert_allclose(m.hessian(), H, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(W, np.linalg.solve(X.T @ X / len(X) + 0.1 * np.eye(64), X.T @ Y / len(X)),
                               rtol=1e-6, atol=1e-8)
    # influence with a single test example given unbatched, against the closed form
    x, t = X[3], Y[3]
    grad = lambda xi, yi: np.outer(xi, xi @ W - yi).ravel()  # noqa: E731 -- d/dW of sum_k (f_k - y_k)^2 / 2
    g_train = np.stack([grad(X[i], Y[i]) + 0.1 * W.ravel() for i in range(len(X))])
    want = -g_train @ np.linalg.solve(H, grad(x, t))
    np.testing.assert_allclose(m.influence_up_loss(x, t, solver="exact"), want, rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError, match="targets must have shape"):
        m.losses(X[:5], Y[:5, :1])
    # outputs linear in theta: the Gauss-Newton matrix is the same closed form
    m.curvature = "gauss-newton"
    np.testing.assert_allclose(m.hessian(), H, rtol=1e-8, atol=1e-10)


def test_wide_hvp_is_split_into_blocks_of_columns(digits):
    """A (p, k) HVP wider than hvp_max_columns runs a few columns per pass, same numbers."""
    import keras

    X, y = digits
    net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(6, activation="tanh", dtype="float64"),
                            keras.layers.Dense(10, dtype="float64")])
    m = KerasModel(net, loss="softmax", weight_decay=0.01).set_training_data(X[:80], y[:80])
    assert m.curvature_operator().columns_per_pass() == 8  # outputs not linear in theta: 8 columns per pass by default
    V = np.random.default_rng(0).standard_normal((m.n_params, 7))
    one_by_one = np.stack([m.hvp(V[:, j]) for j in range(7)], axis=1)
    passes = []
    original = m.map_train
    m.map_train = lambda kernel, *a, **k: passes.append(1) or original(kernel, *a, **k)
    m.hvp_max_columns = 3
    np.testing.assert_allclose(m.hvp(V), one_by_one, rtol=1e-11, atol=1e-13)
    assert len(passes) == 3  # columns 0-2, 3-5, 6
    m.hvp_max_columns = 0
    with pytest.raises(ValueError, match="hvp_max_columns"):
        m.hvp(V)

"""Frozen-feature cache: a head over frozen layers computes on features made once per
training set, with the same numbers as the full forward pass."""
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from influence import GaussNewtonOperator, KerasModel, leave_one_out  # noqa: E402


def _convnet(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 1), dtype="float64"),
                             keras.layers.Conv2D(4, 3, activation="relu", dtype="float64"),
                             keras.layers.MaxPooling2D(2, dtype="float64"), keras.layers.Flatten(dtype="float64"),
                             keras.layers.Dropout(0.25, dtype="float64"),
                             keras.layers.Dense(10, name="logits", dtype="float64")])


@pytest.fixture(scope="module")
def pair(digits):
    X, y = digits
    X = X.reshape(-1, 8, 8, 1)[:150]
    net = _convnet()
    cached = KerasModel(net, trainable=["logits"], weight_decay=0.01).fit(X, y[:150])
    plain = KerasModel(net, trainable=["logits"], weight_decay=0.01, feature_cache=False)
    plain.set_training_data(X, y[:150]).set_theta(cached.theta_)
    return cached, plain, X, y[:150]


def test_the_cache_is_on_and_gives_the_full_passes_numbers(pair, digits):
    cached, plain, X, y = pair
    assert cached._split is not None and plain._split is None
    assert tuple(cached.X_train_.shape[1:]) == (36,)  # 3 x 3 x 4 features, not the 8 x 8 images
    xt, yt = digits[0][300:303].reshape(-1, 8, 8, 1), digits[1][300:303]
    f1, g1 = cached.objective_and_gradient()
    f2, g2 = plain.objective_and_gradient()
    assert f1 == pytest.approx(f2, rel=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-13)
    v = np.random.default_rng(0).standard_normal(cached.n_params)
    np.testing.assert_allclose(cached.hvp(v), plain.hvp(v), rtol=1e-10, atol=1e-12)
    # the explicit Gauss-Newton matrix from per-example Jacobians of the head, against products of the full pass
    G = GaussNewtonOperator(plain)._dense_from_products()
    np.testing.assert_allclose(GaussNewtonOperator(cached).dense(), G, rtol=1e-9, atol=1e-12 * np.abs(G).max())
    for solver in ("cg", "ekfac"):
        a = cached.influence_matrix(xt, yt, solver=solver, damping=1e-3)
        b = plain.influence_matrix(xt, yt, solver=solver, damping=1e-3)
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * np.abs(b).max())
    np.testing.assert_allclose(cached.self_influence([0, 5]), plain.self_influence([0, 5]), rtol=1e-8)
    pred = cached.predicted_loss_diffs(xt[:1], yt[:1])
    a = leave_one_out(cached, xt[:1], yt[:1], [3, 7], pred[[3, 7]], n_jobs=1)
    b = leave_one_out(plain, xt[:1], yt[:1], [3, 7], pred[[3, 7]], n_jobs=1)
    np.testing.assert_allclose(a.actual, b.actual, rtol=1e-6, atol=1e-10)


def test_features_are_keyed_by_the_frozen_weights_and_refusals_are_clear(pair, digits):
    cached, _, X, y = pair
    other = _convnet(seed=1)  # other frozen convolution weights
    m2 = KerasModel(other, trainable=["logits"], weight_decay=0.01).set_training_data(X, y)
    assert not np.allclose(m2.X_train_.numpy(), cached.X_train_.numpy())
    with pytest.raises(ValueError, match="feature_cache=False"):
        cached.influence_pert_loss(X[:1], y[:1], [0])
    with pytest.raises(ValueError, match="feature_cache=True cannot apply: no frozen layer"):
        net = _convnet()
        KerasModel(net, trainable=[net.layers[0].name, "logits"], feature_cache=True).set_training_data(X, y)
    with pytest.raises(ValueError, match="feature_cache must be"):
        KerasModel(_convnet(), feature_cache="yes")

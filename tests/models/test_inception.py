"""Inception v3 weights, the dog-fish loader, RBF kernel features and the end-to-end head."""
import json

import numpy as np
from helpers.archives import make_dogfish_tar
import pytest

from conftest import shared_data_dir

DATA = shared_data_dir()
WEIGHTS = DATA / "inception" / "inception_v3_2015_12_05_notop_keras_order.npz" if DATA else None
needs_weights = pytest.mark.skipif(WEIGHTS is None or not WEIGHTS.is_file(), reason="Inception weights not present")


# ---------------------------------------------------------------- RBF features
def test_rbf_cholesky_features_reproduce_kernel():
    from influence.models.rbf import cholesky_features, rbf_features, rbf_kernel_from_distances, squared_distances

    rng = np.random.default_rng(0)
    Xtr, Xte = rng.uniform(-1, 1, (40, 6, 6, 3)), rng.uniform(-1, 1, (15, 6, 6, 3))
    X = np.concatenate([Xtr, Xte]).reshape(55, -1)
    D_direct = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(squared_distances(X, chunk=7), D_direct, atol=1e-10)
    gamma = 0.05 / 40
    K = np.exp(-gamma * D_direct)
    Ftr, Fte, info = rbf_features(Xtr, Xte)
    F = np.concatenate([Ftr, Fte])
    assert info["gamma"] == gamma and info["jitter"] == 0.0
    assert np.max(np.abs(F @ F.T - K)) < 1e-8
    assert np.allclose(np.triu(F, 1), 0.0)  # a Cholesky factor: lower triangular
    L, _ = cholesky_features(rbf_kernel_from_distances(D_direct, gamma))
    np.testing.assert_allclose(L, F)


def test_rbf_rejects_bad_input():
    from influence.models.rbf import cholesky_features, rbf_kernel_from_distances

    with pytest.raises(ValueError):
        cholesky_features(np.ones((3, 4)))
    with pytest.raises(ValueError):
        rbf_kernel_from_distances(np.zeros((2, 2)), 0.0)


# ---------------------------------------------------------------- Inception weights
@needs_weights
def test_inception_loads_every_weight_and_counts_parameters():
    from inception.model import N_CONV, N_PARAMS, load_inception

    model, pre = load_inception(WEIGHTS)
    assert model.count_params() == N_PARAMS == 21_802_784
    z = np.load(WEIGHTS)
    loaded = set()
    for i in range(N_CONV):
        conv, bn = model.get_layer(f"conv_{i:02d}"), model.get_layer(f"bn_{i:02d}")
        pairs = [(conv.kernel, "kernel"), (bn.beta, "bn_beta"), (bn.moving_mean, "bn_moving_mean"),
                 (bn.moving_variance, "bn_moving_variance")]
        for var, key in pairs:
            np.testing.assert_array_equal(np.asarray(var), z[f"{i:02d}_{key}"])
            loaded.add(id(var))
    every = {id(v) for v in model.weights}
    assert every == loaded, "some model weights were not set from the file"
    # none left at its initial value: BN statistics start at 0 / 1, betas at 0
    for i in range(N_CONV):
        bn = model.get_layer(f"bn_{i:02d}")
        assert not np.allclose(np.asarray(bn.moving_variance), 1.0)
        assert not np.allclose(np.asarray(bn.moving_mean), 0.0)
    assert pre.offset == 128.0 and pre.scale == 128.0
    # the 2015 release: max pool in mixed10's pooling branch
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("MaxPooling2D") == 5 and kinds.count("AveragePooling2D") == 8


def test_inception_missing_or_mismatched_weights_raise_clear_errors(tmp_path):
    from inception.model import WeightsError, load_inception
    from influence.datasets.manifest import DataError

    with pytest.raises(DataError, match="missing Inception weights"):
        load_inception(data_dir=tmp_path)
    with pytest.raises(WeightsError, match="missing Inception weights file"):
        load_inception(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"00_kernel": np.zeros((3, 3, 3, 7), np.float32)})
    with pytest.raises(WeightsError, match="shape"):
        load_inception(bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="cannot read"):
        load_inception(tmp_path / "junk.npz")


def test_preprocessing_levels_round_trip():
    from inception.model import KERAS_STOCK, RELEASE_2015

    img = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    for pre in (RELEASE_2015, KERAS_STOCK):
        x = pre(img)
        np.testing.assert_array_equal(pre.to_uint8(x), img)
        np.testing.assert_array_equal(pre.to_uint8(x + 0.49 * pre.level), img)
        lo, hi = pre.bounds
        assert np.isclose(x.min(), lo) and np.isclose(x.max(), hi)


# ---------------------------------------------------------------- end-to-end head
def tiny_feature_net(seed=0):
    """A small convnet stand-in for Inception: (8, 8, 3) -> 5 features (float32)."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="tanh")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(5, 3, activation="softplus")(x)
    out = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, out)


def fitted_head(net, n=30, seed=0):
    from inception import BinaryInceptionModel
    from inception.model import RELEASE_2015

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    X = RELEASE_2015(pixels)
    F = np.asarray(net(X, training=False), dtype=np.float64)
    y = (F[:, 0] > np.median(F[:, 0])).astype(int)
    y[:3] = 1 - y[:3]  # not separable
    model = BinaryInceptionModel(weight_decay=0.01).fit(F, y).attach(net, RELEASE_2015)
    return model, X, y, rng


def test_head_influence_end_to_end_equals_cached_features():
    net = tiny_feature_net()
    model, X, y, rng = fitted_head(net)
    s = rng.standard_normal(model.n_params)
    from_features = -model.gradient_dots(s)
    from_pixels = model.influence_from_inputs(s, X, y, batch_size=7)
    np.testing.assert_allclose(from_pixels, from_features, rtol=1e-5, atol=1e-7)


@needs_weights
def test_head_influence_through_real_inception_equals_cached_features():
    from inception import BinaryInceptionModel, extract_features, load_inception

    net, pre = load_inception(WEIGHTS)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, 299, 299, 3)).astype(np.uint8)
    F = extract_features(net, pre, pixels, batch_size=2).astype(np.float64)
    y = np.array([0, 1, 0, 1])
    model = BinaryInceptionModel(weight_decay=0.001).fit(F, y).attach(net, pre)
    s = model.s_test(F[:1], y[:1], solver="exact").x
    expected = -model.gradient_dots(s)
    got = model.influence_from_inputs(s, pre(pixels), y, batch_size=4)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-8 * np.abs(expected).max())


# ---------------------------------------------------------------- dog-fish loader
def test_dogfish_loader_on_generated_archive(tmp_path):
    from influence.datasets.dogfish import load_dogfish

    (tmp_path / "data" / "dogfish").mkdir(parents=True)
    make_dogfish_tar(tmp_path / "data" / "dogfish" / "imagenette_tench_springer.tar")
    d = load_dogfish(tmp_path / "data", n_train=3, n_test=2, side=11, seed=5, cache_dir=tmp_path / "cache")
    assert d.X_train.shape == (6, 11, 11, 3) and d.X_train.dtype == np.uint8 and d.X_test.shape == (4, 11, 11, 3)
    assert sorted(d.y_train.tolist()) == [0, 0, 0, 1, 1, 1] and sorted(d.y_test.tolist()) == [0, 0, 1, 1]
    for names, ys in ((d.names_train, d.y_train), (d.names_test, d.y_test)):
        for name, label in zip(names, ys):
            assert ("n01440764" in name) == (label == 1)  # fish = 1, dog = 0
    assert not set(d.names_train) & set(d.names_test)
    again = load_dogfish(tmp_path / "data", n_train=3, n_test=2, side=11, seed=5, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.X_train, d.X_train)
    assert again.names_test == d.names_test
    assert json.loads((tmp_path / "cache" / f"dogfish-{d.key}" / "meta.json").read_text())["names_train"]
    other = load_dogfish(tmp_path / "data", n_train=3, n_test=2, side=11, seed=6)
    assert other.names_train != d.names_train


def test_dogfish_loader_errors(tmp_path):
    from influence.datasets.manifest import DataError
    from influence.datasets.dogfish import load_dogfish

    with pytest.raises(DataError, match="missing data file"):
        load_dogfish(tmp_path)
    (tmp_path / "dogfish").mkdir()
    make_dogfish_tar(tmp_path / "dogfish" / "imagenette_tench_springer.tar")
    with pytest.raises(DataError, match="fewer than"):
        load_dogfish(tmp_path, n_train=5, n_test=5, side=8)
    (tmp_path / "dogfish" / "imagenette_tench_springer.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError, match="corrupt"):
        load_dogfish(tmp_path, n_train=1, n_test=1, side=8)

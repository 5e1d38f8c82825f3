"""One sign and one dtype: every influence_* function returns +I_up,loss (or its derivative)
in float64, also on a float32 network; gradient_dots is named by what it returns (s . g)."""
import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from influence import KerasModel  # noqa: E402


def test_every_score_function_shares_one_sign_and_float64(digits):
    X, y = digits
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(10)])
    model = KerasModel(net, weight_decay=0.01).set_training_data(X[:80], y[:80])
    assert model.dtype == "float32"
    xt, yt = X[200:202], y[200:202]
    opts = dict(solver="cg", curvature="gauss-newton", damping=0.1)
    up = model.influence_up_loss(xt[:1], yt[:1], use_cache=False, **opts)
    mat = model.influence_matrix(xt, yt, **opts)
    s = model.s_test(xt[:1], yt[:1], use_cache=False, **opts).x
    dots = model.gradient_dots(s)
    diffs = model.predicted_loss_diffs(xt[:1], yt[:1], use_cache=False, **opts)
    pert = model.influence_pert_loss(xt[:1], yt[:1], [0, 1], use_cache=False, **opts)
    selfs = model.self_influence([0, 1], **opts)
    for name, arr in (("influence_up_loss", up), ("influence_matrix", mat), ("gradient_dots", dots),
                      ("predicted_loss_diffs", diffs), ("influence_pert_loss", pert), ("self_influence", selfs)):
        assert arr.dtype == np.float64, name
    tol = 1e-4 * np.abs(up).max()  # float32 solves to their default tol 1e-5
    np.testing.assert_allclose(mat[0], up, rtol=1e-3, atol=tol)         # the same sign and value
    np.testing.assert_allclose(dots, -up, rtol=1e-3, atol=tol)          # s . g = -I_up,loss
    np.testing.assert_allclose(diffs, -up / model.n_train_, rtol=1e-3, atol=tol / model.n_train_)
    assert np.all(selfs < 0)  # -g^T C^-1 g with C positive definite
    with pytest.warns(DeprecationWarning, match="gradient_dots"):
        old = model.influence_scores(s)
    np.testing.assert_array_equal(old, dots)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        model.gradient_dots(s)

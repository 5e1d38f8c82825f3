"""curvature="gauss-newton": G = (1/n) sum_i J_i^T [d2L/df2] J_i + wd mask, against explicit forms."""
import pickle

import numpy as np
import pytest
import tensorflow as tf

from conftest import fit_tiny_cnn
from influence import AllCNN, LogisticRegression, SmoothHingeSVM


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def with_curvature(m, curvature):
    """A copy of fitted model ``m`` (same data and theta) using ``curvature``."""
    other = type(m)(**{**m.get_config(), "curvature": curvature})
    return other.set_training_data(m.X_train_np_, m.y_train_np_).set_theta(m.theta_)


@pytest.fixture(scope="module")
def small_cnn():
    return fit_tiny_cnn(adam_steps=200)  # Adam only: its Hessian is indefinite


def explicit_gauss_newton(m):
    """sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i / n + wd mask, with J_i from tf's jacobian."""
    th = tf.constant(m.theta_)
    with tf.GradientTape() as tape:
        tape.watch(th)
        logits = m._forward(m.unflatten(th), tf.constant(m.X_train_np_))
    J = tape.jacobian(logits, th).numpy()  # (n, k, p)
    P = tf.nn.softmax(logits).numpy()
    G = sum(J[i].T @ (np.diag(P[i]) - np.outer(P[i], P[i])) @ J[i] for i in range(len(P))) / len(P)
    return G + m.weight_decay * np.diag(m.decay_mask_)


def test_gauss_newton_equals_hessian_when_outputs_are_linear(multiclass_model, binary_digits):
    Xtr, ytr, _, _ = binary_digits
    svm = SmoothHingeSVM(temp=0.1, use_bias=True, weight_decay=0.01).fit(Xtr, 2 * ytr - 1)
    rng = np.random.default_rng(0)
    for m in (multiclass_model, svm):
        gn = with_curvature(m, "gauss-newton")
        v, V = rng.standard_normal(m.n_params), rng.standard_normal((m.n_params, 3))
        assert rel(gn.hvp(v), m.hvp(v)) < 1e-10
        assert rel(gn.hvp(V), m.hvp(V)) < 1e-10
    assert rel(with_curvature(svm, "gauss-newton").hessian(), svm.hessian()) < 1e-10


def test_gauss_newton_matches_the_jacobian_form_on_a_cnn(small_cnn):
    m = small_cnn
    gn = with_curvature(m, "gauss-newton")
    G = explicit_gauss_newton(m)
    rng = np.random.default_rng(1)
    v, V = rng.standard_normal(m.n_params), rng.standard_normal((m.n_params, 4))
    assert rel(gn.hvp(v), G @ v) < 1e-10  # batched over 4 batches of 7
    assert rel(gn.hvp(V), G @ V) < 1e-10
    assert rel(gn.hessian(), G) < 1e-10
    # positive semi-definite, unlike a network's Hessian in general; and not the Hessian here
    assert np.linalg.eigvalsh(G)[0] > -1e-12 * np.linalg.eigvalsh(G)[-1]
    assert rel(m.hessian(), G) > 1e-3
    # a minibatch G (LiSSA's) is the same form over the chosen points
    idx = np.array([3, 5, 11])
    Gi = explicit_gauss_newton(with_curvature(m, "gauss-newton").set_training_data(
        m.X_train_np_[idx], m.y_train_np_[idx]).set_theta(m.theta_))
    assert rel(gn.hvp(v, indices=idx), Gi @ v) < 1e-10


def test_every_solver_inverts_the_gauss_newton_matrix(small_cnn):
    m = small_cnn
    gn = with_curvature(m, "gauss-newton")
    v = gn.test_gradient(m.X_train_np_[0], m.y_train_np_[0])
    damping = 1e-3
    x_ref = np.linalg.solve(explicit_gauss_newton(m) + damping * np.eye(m.n_params), v)
    x_h = np.linalg.solve(m.hessian() + damping * np.eye(m.n_params), v)
    assert rel(x_h, x_ref) > 0.05  # the two curvatures give different answers here
    exact = gn.inverse_hvp(v, solver="exact", damping=damping)
    cg = gn.inverse_hvp(v, solver="cg", damping=damping, tol=1e-12)
    assert rel(exact.x, x_ref) < 1e-8 and rel(cg.x, x_ref) < 1e-6 and cg.converged
    # minibatch LiSSA (the compiled loop) with minibatch Gauss-Newton products
    scale = 1.5 * np.linalg.eigvalsh(explicit_gauss_newton(m))[-1] * 4
    lissa = gn.inverse_hvp(v, solver="lissa", damping=0.05, scale=scale, depth=4000, batch_size=12,
                           num_samples=4, seed=0)
    x_ref_d = np.linalg.solve(explicit_gauss_newton(m) + 0.05 * np.eye(m.n_params), v)
    x_h_d = np.linalg.solve(m.hessian() + 0.05 * np.eye(m.n_params), v)
    assert rel(lissa.x, x_ref_d) < 0.5 * rel(x_h_d, x_ref_d)


def test_curvature_is_checked_kept_by_copies_and_part_of_the_cache_key(small_cnn, tmp_path):
    with pytest.raises(ValueError, match="curvature"):
        LogisticRegression(curvature="gauss_newton")
    m = small_cnn
    gn = with_curvature(m, "gauss-newton")
    assert gn.clone().curvature == "gauss-newton"
    assert pickle.loads(pickle.dumps(gn)).curvature == "gauss-newton"
    cached = AllCNN(**{**m.get_config(), "cache_dir": str(tmp_path)})
    cached.set_training_data(m.X_train_np_, m.y_train_np_).set_theta(m.theta_)
    x0, y0 = m.X_train_np_[0], m.y_train_np_[0]
    s_h = cached.s_test(x0, y0, solver="exact", damping=0.2).x  # H has an eigenvalue near -0.1 here
    cached.curvature = "gauss-newton"  # switching after fitting: no stale cached s_test, Hessian or factor
    s_g = cached.s_test(x0, y0, solver="exact", damping=0.2).x
    assert rel(s_g, gn.s_test(x0, y0, solver="exact", damping=0.2).x) < 1e-10
    assert rel(s_g, s_h) > 0.05
    cached.curvature = "newton"
    with pytest.raises(ValueError, match="curvature"):
        cached.hvp(np.ones(m.n_params))


def test_gauss_newton_influence_predicts_leave_one_out_on_a_full_mlp(digits):
    """All weights of a tanh MLP (non-convex) at an L-BFGS minimum: G is an approximation of H
    there, and its influence still tracks LOO re-fitting (warm-started L-BFGS)."""
    import keras
    from scipy.stats import pearsonr

    from influence import KerasModel, leave_one_out

    X, y = digits
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((64,), dtype="float64"),
                            keras.layers.Dense(12, activation="tanh", dtype="float64"),
                            keras.layers.Dense(10, dtype="float64")])
    m = KerasModel(net, loss="softmax", weight_decay=1e-3).fit(X[:600], y[:600])
    xt, yt = X[1500], y[1500]
    pred = {}
    for curvature in ("hessian", "gauss-newton"):
        m.curvature = curvature
        pred[curvature] = m.gradient_dots(m.s_test(xt, yt, solver="exact", damping=1e-3).x) / m.n_train_
    assert rel(pred["gauss-newton"], pred["hessian"]) > 1e-3  # a different matrix for this network
    idx = np.argsort(-np.abs(pred["hessian"]))[:20]
    loo = leave_one_out(m, xt, yt, idx, pred["hessian"][idx])
    r_h, r_g = (pearsonr(loo.actual, pred[c][idx])[0] for c in ("hessian", "gauss-newton"))
    assert r_h > 0.95 and r_g > 0.9


def test_auto_damping_on_a_non_convex_cnn(small_cnn, tmp_path):
    """damping="auto" on a CNN whose Hessian is indefinite: Lanczos finds the negative
    eigenvalue, CG on H + 1.5|lambda_min| I converges to numpy's solve (and the s_test
    cache keeps it); with G, which is positive semi-definite, at most the eigenvalue
    estimate's accuracy (1e-4 of the largest) is added."""
    m = small_cnn
    w = np.linalg.eigvalsh(m.hessian())
    assert w[0] < -0.01
    cached = AllCNN(**{**m.get_config(), "cache_dir": str(tmp_path)})
    cached.set_training_data(m.X_train_np_, m.y_train_np_).set_theta(m.theta_)
    x0, y0 = m.X_train_np_[0], m.y_train_np_[0]
    res = cached.s_test(x0, y0, solver="cg", damping="auto", tol=1e-12)
    assert res.info["smallest_eigenvalue"] == pytest.approx(w[0], rel=1e-3)
    assert res.damping == pytest.approx(1.5 * -w[0], rel=1e-3) and res.converged
    v = m.test_gradient(x0, y0)
    assert rel(res.x, np.linalg.solve(m.hessian() + res.damping * np.eye(m.n_params), v)) < 1e-6
    again = cached.s_test(x0, y0, solver="cg", damping="auto", tol=1e-12)  # from the disk cache
    assert again.damping == res.damping and np.array_equal(again.x, res.x) and again.info["damping_auto"]
    gn = with_curvature(m, "gauss-newton").inverse_hvp(v, "cg", damping="auto", tol=1e-12)
    assert gn.damping <= 1.0001e-4 * gn.info["largest_eigenvalue"] and gn.converged  # at most Lanczos's accuracy

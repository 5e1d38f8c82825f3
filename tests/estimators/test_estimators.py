"""TracIn, TRAK and the gradient baselines: closed forms, a hand-summed TracIn, the projection's
Johnson-Lindenstrauss property, and one sign convention shared with I_up,loss."""
import os

import numpy as np
import pytest
import scipy.stats

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from influence.estimators import TRAK, TracIn, gaussian_projection, get_estimator  # noqa: E402


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_trak_with_the_identity_projection_equals_the_closed_form(binary_model, binary_digits):
    m = binary_model
    _, _, Xte, yte = binary_digits
    Xt, yt = Xte[:4], yte[:4]
    w, X, y = m.theta_, m.X_train_np_, m.y_train_np_
    sign = 2 * y - 1
    Phi = sign[:, None] * X                      # d/dw of the signed logit (2y - 1) w.x
    Q = 1 - sigmoid(sign * (X @ w))
    phi_t = (2 * yt - 1)[:, None] * Xt
    lam = 0.1
    want = -(phi_t @ np.linalg.solve(Phi.T @ Phi + lam * np.eye(len(w)), Phi.T)) * Q
    got = TRAK(proj_dim=m.n_params, damping=lam).influence_matrix(m, Xt, yt)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # an ensemble of the same model twice is the same score; a subset of indices is a column subset
    twice = TRAK(proj_dim=m.n_params, damping=lam, models=[m, m]).influence_matrix(m, Xt, yt)
    np.testing.assert_allclose(twice, want, rtol=1e-9, atol=1e-12)
    sub = TRAK(proj_dim=m.n_params, damping=lam).influence_matrix(m, Xt, yt, indices=[3, 0, 7])
    np.testing.assert_allclose(sub, want[:, [3, 0, 7]], rtol=1e-9, atol=1e-12)


def test_trak_multiclass_margin_is_the_log_odds(multiclass_model, digits):
    """The multiclass margin log p_y - log(1 - p_y): its gradient by finite differences."""
    from influence.estimators.trak import projected_margin_gradients

    m = multiclass_model
    X, y = digits
    x, yy = X[-1:], y[-1:]
    phi, Q = projected_margin_gradients(m, x, yy.astype(np.int32), None)

    def log_odds(theta):
        z = x @ theta.reshape(X.shape[1], -1)
        p = np.exp(z - z.max())
        p /= p.sum()
        return np.log(p[0, yy[0]]) - np.log1p(-p[0, yy[0]])

    th = m.theta_
    e = 1e-6
    fd = np.array([(log_odds(th + e * u) - log_odds(th - e * u)) / (2 * e) for u in np.eye(len(th))[:40]])
    np.testing.assert_allclose(phi[0, :40], fd, rtol=1e-5, atol=1e-8)
    assert Q[0] == pytest.approx(1 - sigmoid(log_odds(th)), rel=1e-10)


def _explicit_trak(m, proj_matrix, Xt, yt, damping):
    """TRAK's kernel term and Q of one model from its explicit (n, p) margin gradients and (p, k) P."""
    from influence.estimators.trak import projected_margin_gradients

    G, Q = projected_margin_gradients(m, m.X_train_np_, m.y_train_.numpy(), None)
    _, yt_enc = m.check_xy(Xt, yt, "X_test")
    g_t, _ = projected_margin_gradients(m, Xt, yt_enc, None)
    Phi, phi_t = G @ proj_matrix, g_t @ proj_matrix
    return phi_t @ np.linalg.solve(Phi.T @ Phi + damping * np.eye(Phi.shape[1]), Phi.T), Q


def test_trak_kronecker_route_equals_explicit_projection_and_averages_like_trak(multiclass_model, digits):
    """TRAK through the index's LoGra projection (loss gradients divided by -Q) equals TRAK on the
    margin gradients times the explicit (P_in (x) P_out); an ensemble averages the kernel term
    and Q separately (TRAK's rule), each member with its own projection seed."""
    from influence.index.projection import KroneckerProjection, make_projection

    m = multiclass_model
    X, y = digits
    Xt, yt = X[-3:], y[-3:]
    k, lam = 48, 0.05
    proj = make_projection(m, k, "kronecker", 0)
    assert isinstance(proj, KroneckerProjection)
    kern, Q = _explicit_trak(m, proj.matrix(), Xt, yt, lam)
    got = TRAK(proj_dim=k, damping=lam, projection="kronecker").influence_matrix(m, Xt, yt)
    np.testing.assert_allclose(got, -kern * Q, rtol=1e-6, atol=1e-9 * np.abs(kern * Q).max())
    assert TRAK(proj_dim=k, damping=lam).fit(m)._route(m) == "gaussian"  # "auto": small p * k
    import influence.estimators.trak as trak_module

    old, trak_module.GAUSSIAN_MAX_ENTRIES = trak_module.GAUSSIAN_MAX_ENTRIES, 0
    try:
        assert TRAK(proj_dim=k, damping=lam).fit(m)._route(m) == "kronecker"  # "auto" above the size
    finally:
        trak_module.GAUSSIAN_MAX_ENTRIES = old
    # a second member at other weights
    rng = np.random.default_rng(3)
    m2 = m.at_theta(m.theta_ + 0.05 * rng.standard_normal(m.n_params))
    kern2, Q2 = _explicit_trak(m2, make_projection(m2, k, "kronecker", 1).matrix(), Xt, yt, lam)
    both = TRAK(proj_dim=k, damping=lam, models=[m, m2], projection="kronecker").fit(m).influence_matrix(Xt, yt)
    np.testing.assert_allclose(both, -(kern + kern2) / 2 * (Q + Q2) / 2, rtol=1e-6,
                               atol=1e-9 * np.abs(kern * Q).max())
    per_member = -(kern * Q + kern2 * Q2) / 2  # the old rule differs: the test can tell them apart
    assert np.abs(both - per_member).max() > 1e-6 * np.abs(per_member).max()


def test_trak_gaussian_route_uses_a_block_generated_projection_never_held_whole(multiclass_model, digits):
    """TRAK(projection="gaussian") equals the closed form with the explicit P that BlockGaussian
    generates block by block (the same P on every call, whatever the row chunks)."""
    from influence.estimators.trak import BlockGaussian

    m = multiclass_model
    X, y = digits
    Xt, yt = X[-3:], y[-3:]
    k, lam = 40, 0.05
    proj = BlockGaussian(m.n_params, k, seed=0, block=100)  # 650 rows: 7 blocks
    P = proj(np.eye(m.n_params))
    np.testing.assert_allclose(proj(np.eye(m.n_params)[:5]), P[:5], rtol=0, atol=0)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, m.n_params))
    wide = BlockGaussian(m.n_params, 4096, seed=3)
    assert float(wide(a[None])[0] @ wide(b[None])[0]) == pytest.approx(a @ b, abs=0.1 * np.linalg.norm(a) * np.linalg.norm(b))
    kern, Q = _explicit_trak(m, BlockGaussian(m.n_params, k, seed=0)(np.eye(m.n_params)), Xt, yt, lam)
    got = TRAK(proj_dim=k, damping=lam, projection="gaussian").influence_matrix(m, Xt, yt)
    np.testing.assert_allclose(got, -kern * Q, rtol=1e-5, atol=1e-8 * np.abs(kern * Q).max())


def test_gaussian_projection_preserves_inner_products():
    """Johnson-Lindenstrauss: with P (p, d) of N(0, 1/d) entries, <P^T u, P^T v> - <u, v> has
    standard deviation at most sqrt(2/d) |u| |v|; over 100 random pairs (fixed seed) every
    error stays within 5 of those standard deviations, and the mean error is near zero."""
    p, d = 3000, 400
    P = gaussian_projection(p, d, seed=11)
    assert P.shape == (p, d) and gaussian_projection(p, p) is None
    rng = np.random.default_rng(12)
    U, V = rng.standard_normal((100, p)), rng.standard_normal((100, p))
    V[:50] = U[:50] + 0.5 * V[:50]  # correlated pairs too
    scale = np.linalg.norm(U, axis=1) * np.linalg.norm(V, axis=1)
    err = (np.sum((U @ P) * (V @ P), axis=1) - np.sum(U * V, axis=1)) / scale
    assert np.max(np.abs(err)) <= 5 * np.sqrt(2 / d)
    assert abs(np.mean(err)) <= 5 * np.sqrt(2 / d) / np.sqrt(len(err))
    np.testing.assert_array_equal(P, gaussian_projection(p, d, seed=11))  # seeded


def test_tracin_equals_the_hand_summed_checkpoints(digits):
    import keras
    import tensorflow as tf

    from influence import KerasModel
    from influence.estimators import TracInCheckpoints

    X, y = digits
    Xtr, ytr, Xt, yt = X[:120], y[:120], X[-3:], y[-3:]
    keras.utils.set_random_seed(4)
    net = keras.Sequential([keras.Input((64,), dtype="float64"), keras.layers.Dense(6, activation="tanh",
                                                                                   dtype="float64"),
                            keras.layers.Dense(10, dtype="float64")])
    net.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = TracInCheckpoints()
    net.fit(Xtr, ytr, epochs=3, batch_size=20, verbose=0, shuffle=False, callbacks=[cb])
    assert len(cb.saved) == 3
    wrapper = KerasModel(net, loss="softmax")
    wrapper.set_training_data(Xtr, ytr)
    got = TracIn(cb.thetas(wrapper)).influence_matrix(wrapper, Xt, yt)

    def grads(weights, Xs, ys):
        clone = keras.models.clone_model(net)
        clone.set_weights(weights)
        out = []
        for xi, yi in zip(Xs, ys):
            with tf.GradientTape() as tape:
                loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=[int(yi)], logits=clone(xi[None]))
            out.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, clone.trainable_variables)]))
        return np.array(out)

    want = sum(lr * grads(w, Xt, yt) @ grads(w, Xtr, ytr).T for w, lr in cb.saved)
    np.testing.assert_allclose(got, -want, rtol=1e-8, atol=1e-12)
    assert [lr for _, lr in cb.saved] == pytest.approx([0.05] * 3)


@pytest.mark.parametrize("name,options", [("influence", {"solver": "cg"}), ("grad_dot", {}), ("grad_cos", {}),
                                          ("tracin", {}), ("trak", {"proj_dim": 32, "damping": 0.01}),
                                          ("random", {"seed": 1})])
def test_every_estimator_shares_the_sign_of_influence(binary_model, binary_digits, name, options):
    """On binary logistic regression, where exact influence is known: each estimator's scores
    rank-correlate positively with I_up,loss (= -n times predicted_loss_diffs) on every test
    point, the random baseline does not."""
    m = binary_model
    _, _, Xte, yte = binary_digits
    Xt, yt = Xte[:5], yte[:5]
    exact = np.stack([-m.n_train_ * m.predicted_loss_diffs(Xt[k:k + 1], yt[k:k + 1], solver="exact")
                      for k in range(len(Xt))])
    est = get_estimator(name, **options)
    scores = est.influence_matrix(m, Xt, yt)
    assert scores.shape == exact.shape
    rho = [scipy.stats.spearmanr(a, b)[0] for a, b in zip(scores, exact)]
    if name == "random":
        assert np.mean(np.abs(rho)) < 0.2
    else:
        assert min(rho) > 0.2, rho
    if name == "tracin":
        assert est.used_ == "grad_dot_at_fit"  # fitted by L-BFGS: no checkpoints


def test_all_cnn_records_checkpoints_for_tracin():
    """AllCNN(checkpoints=4) saves (theta, lr) every quarter of its Adam run without changing the
    run; TracIn then sums over them, and with the last one alone it is lr times the gradient dot."""
    from conftest import fit_tiny_cnn

    from influence.estimators import GradientDot

    plain = fit_tiny_cnn(adam_steps=200)
    m = fit_tiny_cnn(adam_steps=200, checkpoints=4)
    np.testing.assert_array_equal(m.theta_, plain.theta_)
    assert len(m.checkpoints_) == 4
    np.testing.assert_array_equal(m.checkpoints_[-1][0], m.theta_)
    X, y = m.X_train_np_[:3], m.y_train_np_[:3]
    tracin = TracIn()
    scores = tracin.influence_matrix(m, X, y)
    assert tracin.used_ == "tracin" and scores.shape == (3, m.n_train_)
    np.testing.assert_allclose(scores, TracIn(m.checkpoints_).influence_matrix(m, X, y), rtol=1e-12)
    theta, lr = m.checkpoints_[-1]
    last = TracIn([(theta, lr)]).influence_matrix(m, X, y)
    m0 = m.with_config(weight_decay=0.0)  # the gradient dot without the regulariser's part
    np.testing.assert_allclose(last, lr * GradientDot().influence_matrix(m0, X, y), rtol=1e-10, atol=1e-14)

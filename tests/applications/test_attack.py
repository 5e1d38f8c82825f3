"""The I_pert,loss training-set attack on a tiny convnet stand-in for Inception."""
import numpy as np
import pytest


def tiny_net(dtype="float64", seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 2), dtype=dtype)
    x = keras.layers.Conv2D(3, 3, activation="tanh", dtype=dtype)(inp)
    x = keras.layers.Conv2D(4, 2, activation="softplus", dtype=dtype)(x)
    out = keras.layers.GlobalAveragePooling2D(dtype=dtype)(x)
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def setup():
    from inception import BinaryInceptionModel
    from inception.model import RELEASE_2015

    net = tiny_net()
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (40, 6, 6, 2)).astype(np.uint8)
    X = RELEASE_2015(pixels).astype(np.float64)
    F = np.asarray(net(X, training=False), dtype=np.float64)
    score = F @ rng.standard_normal(F.shape[1])
    y = (score > np.median(score)).astype(int)
    y[:4] = 1 - y[:4]
    model = BinaryInceptionModel(weight_decay=0.01).fit(F, y).attach(net, RELEASE_2015)
    return model, X, F, y, pixels, RELEASE_2015


def test_pixel_gradient_matches_finite_differences(setup):
    model, X, F, y, _, _ = setup
    rng = np.random.default_rng(0)
    s = model.s_test(F[:2], y[:2], solver="exact", use_cache=False).x
    idx = [5, 9]
    _, g = model.influence_from_inputs(s, X[idx], y[idx], with_gradient=True)
    assert g.shape == X[idx].shape
    for k, i in enumerate(idx):
        for _ in range(5):
            direction = rng.standard_normal(X.shape[1:])
            eps = 1e-5
            plus = model.influence_from_inputs(s, X[i:i + 1] + eps * direction, y[i:i + 1])[0]
            minus = model.influence_from_inputs(s, X[i:i + 1] - eps * direction, y[i:i + 1])[0]
            fd = (plus - minus) / (2 * eps)
            assert np.isclose(np.sum(g[k] * direction), fd, rtol=1e-5, atol=1e-9)


def test_projection_never_leaves_the_box():
    from influence.applications.attack import box_around, project

    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (3, 5, 5, 3))
    x0[0, 0, 0] = -1.0  # pixels already at the range's edge
    x0[1, 0, 0] = 1.0
    level = 1 / 128
    lower, upper = box_around(x0, 0.4995 * level, -1.0, 1.0)
    x = x0.copy()
    for _ in range(50):
        x = project(x + rng.choice([-1, 1], x.shape) * rng.uniform(0, 0.05), lower, upper)
        assert np.all(x >= lower) and np.all(x <= upper)
        assert np.all(np.abs(x - x0) <= 0.4995 * level + 1e-15)
        assert x.min() >= -1.0 and x.max() <= 1.0


def test_attack_perturbs_within_half_a_level_and_retrains(setup):
    from influence.applications.attack import TrainingSetAttack

    model, X, F, y, pixels, pre = setup
    theta0 = model.theta_.copy()
    att = TrainingSetAttack(model, X, F, y, level=pre.level, bounds=pre.bounds, step=0.02, max_iter=3,
                            prefilter=6)
    # target: a correctly classified point with the lowest margin
    p = model.predict_proba(F)[np.arange(len(y)), y]
    ok = np.flatnonzero(p > 0.5)
    t = ok[np.argmin(p[ok])]
    res = att.attack_target(t, F, y, n_poison=2)
    assert len(res.train_indices) == 2 and 1 <= res.iterations <= 3
    assert not np.array_equal(res.x_perturbed, res.x_original)
    assert np.max(np.abs(res.x_perturbed - res.x_original)) < 0.5 * pre.level
    np.testing.assert_array_equal(pre.to_uint8(res.x_perturbed), pixels[res.train_indices])
    assert not np.allclose(res.theta, theta0)  # the top model was re-trained on the new features
    # re-fitting on the perturbed images' features reproduces the returned model
    F2 = F.copy()
    F2[res.train_indices] = model.features(res.x_perturbed)
    refit = type(model)(weight_decay=0.01).fit(F2, y)
    np.testing.assert_allclose(refit.theta_, res.theta, atol=1e-6)
    # the attack raised the target's loss (first-order direction) and left the model as it was
    assert res.prob_true_after[0] < res.prob_true_before[0]
    np.testing.assert_array_equal(model.theta_, theta0)


def test_feature_gradient_norms_match_autodiff(setup):
    """The closed-form ||d I_up,loss / d f_j|| used to pool candidates equals autodiff's."""
    import tensorflow as tf

    from influence.applications.attack import TrainingSetAttack

    model, X, F, y, _, pre = setup
    s = model.s_test(F[:1], y[:1], solver="exact", use_cache=False).x
    att = TrainingSetAttack(model, X, F, y, level=pre.level, bounds=pre.bounds)
    f = tf.constant(F)
    with tf.GradientTape() as tape:
        tape.watch(f)
        r = tf.sigmoid(tf.linalg.matvec(f, tf.constant(model.theta_))) - tf.constant(y, tf.float64)
        infl = -r * tf.linalg.matvec(f, tf.constant(s))
    g = tape.jacobian(infl, f)  # (n, n, d): only the diagonal blocks are non-zero
    expected = np.linalg.norm(np.einsum("iid->id", g.numpy()), axis=1)
    np.testing.assert_allclose(att.feature_gradient_norms(s), expected, rtol=1e-10)
    cand, size = att.rank_candidates(F[:1], y[:1], 3)
    assert len(cand) == 3 and np.all(np.diff(size) <= 0)


def test_preconditioned_s_test_on_attacked_features_equals_exact_solve(setup):
    """s_test during an attack (features of two images changed, model re-fitted) by CG
    preconditioned with the unattacked Hessian equals a Cholesky solve of the current one."""
    from influence.applications.attack import TrainingSetAttack

    model, X, F, y, _, pre = setup
    theta0 = model.theta_.copy()
    att = TrainingSetAttack(model, X, F, y, level=pre.level, bounds=pre.bounds)
    with pytest.raises(ValueError, match="solver"):
        TrainingSetAttack(model, X, F, y, level=pre.level, bounds=pre.bounds, solver="lissa")
    F2 = F.copy()
    F2[[3, 7]] *= 1.5
    try:
        model.fit(F2, y, theta0=theta0)
        exact = model.s_test(F[:2], y[:2], solver="exact", use_cache=False).x
        cold = att.s_test(model, F[:2], y[:2])
        warm = att.s_test(model, F[:2], y[:2], x0=exact * 0.5)
    finally:
        model.fit(F, y, theta0=theta0)
    np.testing.assert_allclose(cold, exact, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(warm, exact, rtol=1e-7, atol=1e-10)

"""LiSSA's scale='auto' bounds every minibatch Hessian it draws: per-example curvature against
closed forms and explicit Hessians, a high-leverage point, restarts, and the divergence messages."""
import numpy as np

from influence.curvature import CurvatureOperator
import pytest

from influence import LissaDivergenceError


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def point_matrix(model, i):
    """The explicit loss Hessian (or G) of training point i alone, without the regulariser."""
    E = np.eye(model.n_params)
    return model.hvp(E, indices=[i]) - model.weight_decay * model.decay_mask_[:, None] * E


def test_per_example_curvature_matches_closed_forms(multiclass_model, binary_model):
    m = multiclass_model
    X = m.X_train_np_
    Z = X @ m.theta_.reshape(X.shape[1], -1)
    P = np.exp(Z - Z.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    want = np.array([np.linalg.eigvalsh(np.diag(p) - np.outer(p, p))[-1] * (x @ x) for p, x in zip(P, X)])
    np.testing.assert_allclose(m.per_example_curvature(), want, rtol=1e-10, atol=1e-14)
    b = binary_model
    p = 1 / (1 + np.exp(-b.X_train_np_ @ b.theta_))
    np.testing.assert_allclose(b.per_example_curvature(), p * (1 - p) * np.sum(b.X_train_np_ ** 2, axis=1),
                               rtol=1e-10, atol=1e-14)
    for i in (0, 7):  # and the explicit single-point Hessian
        assert b.per_example_curvature()[i] == pytest.approx(np.linalg.eigvalsh(point_matrix(b, i))[-1], rel=1e-8)


def test_per_example_curvature_of_a_nonlinear_model():
    """Tiny CNN: with curvature='gauss-newton' each value is lambda_max(G_i) exactly; with the
    Hessian the most curved points' values bound their own lambda_max(H_i)."""
    from conftest import fit_tiny_cnn

    m = fit_tiny_cnn(dtype="float64", adam_steps=200)
    m.curvature = "gauss-newton"
    g = m.per_example_curvature()
    want = [np.linalg.eigvalsh(point_matrix(m, i))[-1] for i in range(m.n_train_)]
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-10)
    m.curvature = "hessian"
    h = m.per_example_curvature(refine=4)
    assert np.all(h >= g - 1e-12)
    for i in np.argsort(-g)[:4]:
        assert h[i] >= np.linalg.eigvalsh(point_matrix(m, i))[-1] * (1 - 1e-3)


@pytest.fixture(scope="module")
def high_leverage():
    """Binary logistic regression on 300 points in 10 dimensions, one of them far out on the
    wrong side: its curvature is ~100x the median."""
    from influence import BinaryLogisticRegression

    rng = np.random.default_rng(0)
    n, d = 300, 10
    X = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    y = (rng.random(n) < 1 / (1 + np.exp(-X @ w))).astype(int)
    X[0] = 30 * rng.standard_normal(d) / np.sqrt(d)
    y[0] = int(X[0] @ w < 0)
    return BinaryLogisticRegression(weight_decay=0.01).fit(X, y)


def test_auto_scale_with_a_high_leverage_point(high_leverage):
    m = high_leverage
    c = m.per_example_curvature()
    assert c.max() >= 90 * np.median(c)
    v = m.test_gradient(m.X_train_np_[5], m.y_train_np_[5])
    depth, samples = 5000, 10
    res = m.inverse_hvp(v, "lissa", scale="auto", depth=depth, num_samples=samples, batch_size=1, seed=0)
    scale = res.info["scale"]
    assert res.info["scale_restarts"] == 0 and res.info["scale_bound_kind"] == "per-example curvature, exact"
    # the leverage point is among the drawn batches: the scale covers its Hessian
    assert scale >= 1.5 * (c.max() + m.weight_decay) * (1 - 1e-12)
    # LiSSA's expected estimate after `depth` terms: H^-1 (I - (I - H/scale)^(depth+1)) v
    H = m.hessian()
    expected = np.linalg.solve(H, v - np.linalg.matrix_power(np.eye(m.n_params) - H / scale, depth + 1) @ v)
    assert rel(res.x, expected) <= 3 * res.spread / np.sqrt(samples)  # within its sampling error
    assert rel(res.x, np.linalg.solve(H, v)) <= rel(expected, np.linalg.solve(H, v)) + 3 * res.spread / np.sqrt(
        samples)


def test_auto_scale_restarts_when_the_bound_fails(high_leverage, monkeypatch):
    """A curvature bound that misses the leverage point lets the series diverge; the solver
    raises the scale and restarts, and says so in info."""
    m = high_leverage
    v = m.test_gradient(m.X_train_np_[5], m.y_train_np_[5])
    c = m.per_example_curvature()
    monkeypatch.setattr(CurvatureOperator, "per_example_curvature", lambda self, refine=8: c / 1000)
    res = m.inverse_hvp(v, "lissa", scale="auto", depth=3000, num_samples=2, batch_size=1, seed=0)
    assert 1 <= res.info["scale_restarts"] <= 3
    assert res.info["scale"] == pytest.approx(res.info["scale_estimate"] * 4 ** res.info["scale_restarts"])
    assert np.all(np.isfinite(res.x)) and res.residual < 1
    # a bound that the restarts allowed cannot rescue: the error names what was used and
    # suggests only what was not tried
    import influence.solvers.lissa as lissa

    monkeypatch.setattr(lissa, "AUTO_SCALE_RESTARTS", 1)
    monkeypatch.setattr(CurvatureOperator, "per_example_curvature", lambda self, refine=8: c / 1e4)
    with pytest.raises(LissaDivergenceError) as err:
        m.inverse_hvp(v, "lissa", scale="auto", depth=3000, batch_size=1, seed=0)
    msg = str(err.value)
    assert "scale='auto'" in msg and "in 1 restart(s)" in msg and "batch_size=1" in msg
    assert "Pass scale='auto'" not in msg and "add damping" in msg


def test_divergence_message_for_an_explicit_scale(well_conditioned_binary):
    m = well_conditioned_binary
    v = np.random.default_rng(5).standard_normal(m.n_params)
    lmax = np.linalg.eigvalsh(m.hessian())[-1]
    with pytest.raises(LissaDivergenceError) as err:
        m.inverse_hvp(v, "lissa", scale=lmax / 4, depth=2000, batch_size=10)
    msg = str(err.value)
    assert f"scale={lmax / 4:.4g}, batch_size=10" in msg and "Pass scale='auto'" in msg


@pytest.fixture(scope="module")
def well_conditioned_binary(binary_digits):
    from influence import BinaryLogisticRegression

    Xtr, ytr, _, _ = binary_digits
    return BinaryLogisticRegression(weight_decay=0.5).fit(Xtr[:200], ytr[:200])


def test_lissa_runs_columns_together_on_the_same_minibatches(binary_model):
    """Several right-hand sides in one loop (blocks of hvp_max_columns) equal one solve per
    column: the minibatches are drawn per sample, shared by the columns."""
    from influence.solvers import LissaSolver

    m = binary_model
    V = np.random.default_rng(3).standard_normal((m.n_params, 3))
    solver = LissaSolver(scale=20.0, depth=200, num_samples=2, batch_size=4, seed=5, damping=0.01)
    m.hvp_max_columns = 2
    try:
        together = solver.solve(m, V).x
    finally:
        m.hvp_max_columns = None
    for k in range(3):
        np.testing.assert_allclose(together[:, k], solver.solve(m, V[:, k]).x, rtol=1e-11, atol=1e-14)
    with pytest.raises(LissaDivergenceError, match="diverged"):
        LissaSolver(scale=1e-3, depth=200, num_samples=1, batch_size=4, seed=5).solve(m, V)

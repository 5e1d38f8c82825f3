"""Inverse-HVP solvers against exact solves, and their diagnostics and failure modes."""
import numpy as np
import pytest

from influence import CGSolver, ExactSolver, LissaDivergenceError, LissaSolver, get_solver


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_exact_and_cg_agree(multiclass_model):
    m = multiclass_model
    v = np.random.default_rng(0).standard_normal(m.n_params)
    exact = m.inverse_hvp(v, "exact")
    cg = m.inverse_hvp(v, "cg", tol=1e-10)
    assert rel(cg.x, exact.x) < 1e-6
    np.testing.assert_allclose(m.hvp(exact.x), v, rtol=1e-8, atol=1e-10)
    assert exact.residual < 1e-10 and cg.residual < 1e-8 and cg.converged
    assert 1 < cg.iterations <= m.n_params


def test_solvers_against_numpy_solve_with_damping(binary_model):
    m = binary_model
    H = m.hessian()
    v = np.random.default_rng(1).standard_normal(m.n_params)
    want = np.linalg.solve(H + 0.3 * np.eye(m.n_params), v)
    for name in ("exact", "cg"):
        res = m.inverse_hvp(v, name, damping=0.3)
        assert rel(res.x, want) < 1e-8, name
        assert res.damping == 0.3


def test_multiple_right_hand_sides(binary_model):
    m = binary_model
    V = np.random.default_rng(2).standard_normal((m.n_params, 4))
    want = np.linalg.solve(m.hessian(), V)
    for name in ("exact", "cg"):
        X = m.inverse_hvp(V, name).x
        assert X.shape == V.shape
        assert rel(X, want) < 1e-7, name


def test_reported_residual_is_the_true_residual(binary_model):
    m = binary_model
    v = np.random.default_rng(3).standard_normal(m.n_params)
    res = m.inverse_hvp(v, "cg", tol=1e-2)  # stops early on purpose
    true = np.linalg.norm(m.hessian() @ res.x - v) / np.linalg.norm(v)
    assert res.residual == pytest.approx(true, rel=1e-8)
    assert 1e-5 < res.residual


@pytest.fixture(scope="module")
def well_conditioned(binary_digits):
    from influence import BinaryLogisticRegression

    Xtr, ytr, _, _ = binary_digits
    return BinaryLogisticRegression(weight_decay=0.5).fit(Xtr[:200], ytr[:200])


def test_lissa_within_two_percent_when_well_conditioned(well_conditioned):
    m = well_conditioned
    v = m.test_gradient(m.X_train_np_[0], m.y_train_np_[0]) + 0.1
    exact = m.inverse_hvp(v, "exact").x
    res = m.inverse_hvp(v, "lissa", scale=10.0, depth=300, num_samples=20, batch_size=20, seed=0)
    assert rel(res.x, exact) < 0.02
    assert res.spread is not None and res.spread > 0
    assert res.iterations == 300 * 20


def test_lissa_full_batch_converges_and_auto_scale(well_conditioned):
    m = well_conditioned
    v = np.random.default_rng(4).standard_normal(m.n_params)
    exact = m.inverse_hvp(v, "exact").x
    res = m.inverse_hvp(v, "lissa", scale="auto", depth=400, batch_size=None)
    assert rel(res.x, exact) < 1e-6
    lmax = np.linalg.eigvalsh(m.hessian())[-1]
    assert res.info["scale"] == pytest.approx(1.5 * lmax, rel=1e-2)


def test_lissa_raises_on_divergent_scale(well_conditioned):
    m = well_conditioned
    v = np.random.default_rng(5).standard_normal(m.n_params)
    lmax = np.linalg.eigvalsh(m.hessian())[-1]
    with pytest.raises(LissaDivergenceError, match="Raise `scale`"):
        m.inverse_hvp(v, "lissa", scale=lmax / 4, depth=2000, batch_size=None)
    with pytest.raises(LissaDivergenceError):
        m.inverse_hvp(v, "lissa", scale=lmax / 4, depth=2000, batch_size=10)


def test_lissa_is_seeded(well_conditioned):
    m = well_conditioned
    v = np.ones(m.n_params)
    a = m.inverse_hvp(v, "lissa", scale=10.0, depth=100, batch_size=5, seed=3).x
    b = m.inverse_hvp(v, "lissa", scale=10.0, depth=100, batch_size=5, seed=3).x
    c = m.inverse_hvp(v, "lissa", scale=10.0, depth=100, batch_size=5, seed=4).x
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_get_solver_and_bad_inputs(binary_model):
    assert isinstance(get_solver("exact"), ExactSolver)
    assert isinstance(get_solver("cg", tol=1e-3), CGSolver)
    assert isinstance(get_solver("lissa", scale=5), LissaSolver)
    solver = CGSolver(damping=0.1)
    assert get_solver(solver) is solver
    with pytest.raises(ValueError, match="unknown solver"):
        get_solver("newton")
    with pytest.raises(ValueError):
        CGSolver(damping=-1)
    m = binary_model
    with pytest.raises(ValueError, match="shape"):
        m.inverse_hvp(np.ones(m.n_params + 1), "cg")
    bad = np.ones(m.n_params)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.inverse_hvp(bad, "cg")


def test_exact_refuses_indefinite(binary_model):
    from influence import NotPositiveDefiniteError
    m = binary_model
    lmin = np.linalg.eigvalsh(m.hessian())[0]
    # a negative "damping" is refused, so emulate an indefinite H by a model with negative wd
    from influence import BinaryLogisticRegression
    neg = BinaryLogisticRegression(weight_decay=-(lmin + 1.0))
    neg.set_training_data(m.X_train_np_, m.y_train_np_).set_theta(m.theta_)
    with pytest.raises(NotPositiveDefiniteError, match="add damping"):
        neg.inverse_hvp(np.ones(m.n_params), "exact")


def test_preconditioned_cg_solves_and_needs_fewer_iterations():
    """PCG with the Cholesky factor of a nearby SPD matrix: same solution, far fewer steps."""
    import scipy.linalg

    from influence.solvers import conjugate_gradient

    rng = np.random.default_rng(0)
    A = rng.normal(size=(200, 60))
    H0 = A.T @ A / 200 + 1e-3 * np.eye(60)  # ill-conditioned
    u = rng.normal(size=(60, 2))
    H = H0 + 0.05 * u @ u.T  # a nearby matrix: rank-2 change
    b = rng.normal(size=(60, 3))
    exact = np.linalg.solve(H, b)
    x, it_plain, _ = conjugate_gradient(lambda v: H @ v, b, tol=1e-10, maxiter=2000)
    factor = scipy.linalg.cho_factor(H0)
    xp, it_pc, neg = conjugate_gradient(lambda v: H @ v, b, tol=1e-10, maxiter=2000,
                                        preconditioner=lambda r: scipy.linalg.cho_solve(factor, r))
    assert not neg
    np.testing.assert_allclose(x, exact, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(xp, exact, rtol=1e-6, atol=1e-8)
    assert it_pc <= 4 < it_plain  # rank-2 change: PCG converges in about 3 steps
    # one column (1-D) and a warm start give the same answer
    x1, _, _ = conjugate_gradient(lambda v: H @ v, b[:, 0], tol=1e-12, x0=exact[:, 0] * 0.9,
                                  preconditioner=lambda r: scipy.linalg.cho_solve(factor, r))
    np.testing.assert_allclose(x1, exact[:, 0], rtol=1e-8)


def test_cg_solver_with_preconditioner_through_the_model(binary_model):
    """CGSolver(preconditioner=Cholesky of H + damping I) returns the exact answer in ~1 step."""
    import scipy.linalg

    m = binary_model
    v = np.random.default_rng(5).standard_normal((m.n_params, 2))
    want = np.linalg.solve(m.hessian() + 0.1 * np.eye(m.n_params), v)
    factor = scipy.linalg.cho_factor(m.hessian() + 0.1 * np.eye(m.n_params))
    res = m.inverse_hvp(v, "cg", damping=0.1, preconditioner=lambda r: scipy.linalg.cho_solve(factor, r))
    plain = m.inverse_hvp(v, "cg", damping=0.1)
    assert rel(res.x, want) < 1e-8 and res.converged
    assert res.iterations <= 2 < plain.iterations
    assert "preconditioner" not in CGSolver(preconditioner=lambda r: r).config()
    with pytest.raises(TypeError, match="callable"):
        CGSolver(preconditioner=np.eye(3))

"""Inverse-HVP solvers against exact solves, and their diagnostics and failure modes."""
import numpy as np
from helpers.indefinite import NegativeDecayLogistic
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
    with pytest.raises(LissaDivergenceError, match=r"scale=.*batch_size=.*full batch.*Pass scale=.auto."):
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
    neg = NegativeDecayLogistic(weight_decay=-(lmin + 1.0))
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


def truncated_inverse(H, v, rank, damping=0.0, fill=None):
    """Closed form of the low-rank solve from numpy's eigendecomposition of H."""
    lam, V = np.linalg.eigh(H)
    lam, V = lam[::-1][:rank], V[:, ::-1][:, :rank]
    x = V @ ((V.T @ v) / (lam + damping)[:, None] if v.ndim == 2 else (V.T @ v) / (lam + damping))
    if fill is not None:
        x = x + (v - V @ (V.T @ v)) / (fill + damping)
    return x


def test_arnoldi_equals_truncated_eigendecomposition(multiclass_model):
    """Lanczos on HVPs finds the top eigenpairs of the explicit Hessian: the low-rank
    solve, with the complement dropped or filled, equals numpy's closed form."""
    m = multiclass_model
    H = m.hessian()
    V = np.random.default_rng(6).standard_normal((m.n_params, 3))
    for damping, fill in ((0.0, None), (0.05, None), (0.0, m.weight_decay)):
        res = m.inverse_hvp(V, "arnoldi", rank=20, damping=damping, fill=fill, tol=1e-10)
        want = truncated_inverse(H, V, 20, damping, fill)
        assert rel(res.x, want) < 1e-6, (damping, fill)
        assert res.info["rank"] == 20 and res.iterations == 20
        lam = np.linalg.eigvalsh(H)[::-1]
        assert res.info["eigenvalue_max"] == pytest.approx(lam[0], rel=1e-8)
        assert res.info["eigenvalue_min"] == pytest.approx(lam[19], rel=1e-8)
        # a rank-20 approximation of a 650-parameter Hessian is not the inverse: the
        # reported residual is the true one and says so
        true = np.max(np.linalg.norm(H @ res.x + damping * res.x - V, axis=0) / np.linalg.norm(V, axis=0))
        assert res.residual == pytest.approx(true, rel=1e-8) and res.residual > 1e-3
        assert not res.converged


def test_arnoldi_full_rank_is_exact_and_columns_are_independent(binary_model):
    m = binary_model
    V = np.random.default_rng(7).standard_normal((m.n_params, 2))
    want = np.linalg.solve(m.hessian() + 0.1 * np.eye(m.n_params), V)
    res = m.inverse_hvp(V, "arnoldi", rank=m.n_params, damping=0.1)
    assert rel(res.x, want) < 1e-10 and res.converged and res.residual < 1e-10
    one = m.inverse_hvp(V[:, 1], "arnoldi", rank=m.n_params, damping=0.1)
    np.testing.assert_allclose(one.x, res.x[:, 1], rtol=1e-12, atol=1e-14)
    # through the influence API: the same influences as the exact solver
    x, y = m.X_train_np_[:3], m.y_train_np_[:3]
    np.testing.assert_allclose(m.influence_up_loss(x, y, solver="arnoldi", rank=m.n_params, use_cache=False),
                               m.influence_up_loss(x, y, solver="exact", use_cache=False), rtol=1e-8)


def test_arnoldi_caches_its_eigenpairs_per_theta_and_curvature(multiclass_model, monkeypatch):
    from influence.curvature import CurvatureOperator

    m = multiclass_model.clone().fit(multiclass_model.X_train_np_, multiclass_model.y_train_np_)
    v = np.ones(m.n_params)
    calls = []
    hvp = CurvatureOperator.hvp
    monkeypatch.setattr(CurvatureOperator, "hvp",
                        lambda self, u, indices=None: (calls.append(np.ndim(u)), hvp(self, u, indices))[1])
    m.inverse_hvp(v, "arnoldi", rank=10)
    first = len(calls)
    assert first > 10  # the Lanczos iteration
    m.inverse_hvp(2 * v, "arnoldi", rank=10, damping=0.3)  # same theta: only the residual's HVP
    assert len(calls) == first + 1
    m.set_theta(m.theta_ * 1.01)  # new theta: decomposed again
    m.inverse_hvp(v, "arnoldi", rank=10)
    assert len(calls) > first + 2 + 10
    n = len(calls)
    m.curvature = "gauss-newton"  # G = H for this model, but G is a different operator in general
    m.inverse_hvp(v, "arnoldi", rank=10)
    assert len(calls) > n + 10


def test_arnoldi_refuses_bad_settings_and_indefinite_kept_eigenvalues(binary_model):
    from influence import ArnoldiSolver, BinaryLogisticRegression, NotPositiveDefiniteError

    assert isinstance(get_solver("arnoldi", rank=5), ArnoldiSolver)
    with pytest.raises(ValueError, match="rank"):
        ArnoldiSolver(rank=0)
    with pytest.raises(ValueError, match="fill"):
        ArnoldiSolver(fill=-1.0)
    with pytest.raises(ValueError, match="fill \\+ damping"):
        ArnoldiSolver(fill=0.0)
    m = binary_model
    lmin = np.linalg.eigvalsh(m.hessian())[0]
    neg = NegativeDecayLogistic(weight_decay=-(lmin + 1.0))
    neg.set_training_data(m.X_train_np_, m.y_train_np_).set_theta(m.theta_)
    with pytest.raises(NotPositiveDefiniteError, match="add damping"):
        neg.inverse_hvp(np.ones(m.n_params), "arnoldi", rank=m.n_params)


@pytest.fixture(scope="module")
def indefinite_model(binary_model):
    """The binary model's data and theta with a negative weight decay: H has eigenvalues < 0."""
    from influence import BinaryLogisticRegression

    m = binary_model
    w = np.linalg.eigvalsh(m.hessian())
    neg = NegativeDecayLogistic(weight_decay=-(w[0] + 0.05))  # shifts the spectrum down by w[0] + 0.05
    neg.set_training_data(m.X_train_np_, m.y_train_np_).set_theta(m.theta_)
    return neg


def test_auto_damping_is_zero_where_h_is_positive_definite(binary_model):
    m = binary_model
    v = np.random.default_rng(8).standard_normal(m.n_params)
    want = np.linalg.solve(m.hessian(), v)
    for name in ("exact", "cg"):
        res = m.inverse_hvp(v, name, damping="auto")
        assert res.damping == 0.0 and res.info["damping_auto"] and res.info["damping_retries"] == 0
        assert rel(res.x, want) < 1e-7, name
        assert res.info["smallest_eigenvalue"] > 0


def test_auto_damping_follows_the_smallest_eigenvalue(indefinite_model):
    m = indefinite_model
    lmin = np.linalg.eigvalsh(m.hessian())[0]
    assert lmin < 0
    v = np.random.default_rng(9).standard_normal(m.n_params)
    with pytest.raises(np.linalg.LinAlgError):
        m.inverse_hvp(v, "exact")
    for name in ("exact", "cg", "arnoldi"):
        opts = {"rank": m.n_params} if name == "arnoldi" else {}
        res = m.inverse_hvp(v, name, damping="auto", **opts)
        assert res.damping == pytest.approx(1.5 * -lmin, rel=1e-3), name
        want = np.linalg.solve(m.hessian() + res.damping * np.eye(m.n_params), v)
        assert rel(res.x, want) < 1e-7, name


def test_auto_damping_is_raised_when_cg_still_meets_negative_curvature(indefinite_model, monkeypatch):
    """Emulate a Lanczos estimate of the smallest eigenvalue 10x too small in magnitude: CG
    meets negative curvature and the damping is raised until H + damping I is definite."""
    m = indefinite_model
    w = np.linalg.eigvalsh(m.hessian())
    monkeypatch.setattr(m.curvature_operator(), "eigenvalue_bounds",
                        lambda tol, maxiter=None: (0.1 * float(w[0]), float(w[-1])))
    v = np.random.default_rng(10).standard_normal(m.n_params)
    res = m.inverse_hvp(v, "cg", damping="auto")
    assert res.info["damping_retries"] >= 1 and not res.info["negative_curvature"]
    assert res.damping > -w[0] and res.converged
    want = np.linalg.solve(m.hessian() + res.damping * np.eye(m.n_params), v)
    assert rel(res.x, want) < 1e-7


def test_auto_damping_where_the_estimate_cannot_tell_the_sign(indefinite_model, monkeypatch):
    """A Lanczos estimate that is positive but within its accuracy (1e-4 lambda_max) of zero
    does not prove H definite: the damping is that accuracy, not zero."""
    from influence.solvers import AUTO_DAMPING_LANCZOS_TOL

    m = indefinite_model
    lmax = 10.0 / AUTO_DAMPING_LANCZOS_TOL  # accuracy 10, above the true |lambda_min|
    monkeypatch.setattr(m.curvature_operator(), "eigenvalue_bounds", lambda tol, maxiter=None: (0.5 * tol * lmax, lmax))
    res = m.inverse_hvp(np.ones(m.n_params), "cg", damping="auto")
    assert res.damping == pytest.approx(10.0) and res.info["damping_retries"] == 0 and res.converged


def test_auto_damping_eigenvalues_are_cached_per_theta(indefinite_model, monkeypatch):
    m = indefinite_model.clone()
    m.set_training_data(indefinite_model.X_train_np_, indefinite_model.y_train_np_).set_theta(indefinite_model.theta_)
    v = np.ones(m.n_params)
    first = m.inverse_hvp(v, "cg", damping="auto")

    def refuse(tol, maxiter):
        raise AssertionError("eigenvalues recomputed for the same theta")

    monkeypatch.setattr(m.curvature_operator(), "_lanczos_bounds", refuse)
    again = m.inverse_hvp(2 * v, "cg", damping="auto")
    assert again.damping == first.damping
    m.set_theta(m.theta_ * 1.01)
    with pytest.raises(AssertionError, match="recomputed"):
        m.inverse_hvp(v, "cg", damping="auto")


def test_auto_damping_setting_is_validated():
    assert CGSolver(damping="auto").config()["damping"] == "auto"
    with pytest.raises(ValueError, match="auto"):
        CGSolver(damping="big")
    with pytest.raises(ValueError):
        ExactSolver(damping=float("nan"))

"""Preconditioned CG: the same answer, fewer iterations; the Nystrom preconditioner's
spectrum, symmetry and positivity; its cache."""
import numpy as np
import pytest

from conftest import fit_tiny_cnn
from helpers.indefinite import NegativeDecayLogistic
from influence import CGSolver, GaussNewtonOperator, HessianOperator, NotPositiveDefiniteError
from influence.solvers import NystromPreconditioner, nystrom_inverse


def _as_matrix(apply, p):
    return apply(np.eye(p))


def test_nystrom_maps_the_top_eigenvalues_to_lambda_k_plus_d_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    p, k, d = 40, 6, 0.05
    Q = np.linalg.qr(rng.standard_normal((p, p)))[0]
    lam = np.sort(rng.uniform(0.01, 1.0, p))[::-1] * np.r_[np.full(k, 100.0), np.ones(p - k)]  # k outliers
    A = Q @ np.diag(lam) @ Q.T + d * np.eye(p)
    Minv = _as_matrix(nystrom_inverse(lam[:k], Q[:, :k], d), p)
    np.testing.assert_allclose(Minv, Minv.T, atol=1e-14)  # symmetric
    got = np.sort(np.linalg.eigvals(Minv @ A).real)
    predicted = np.sort(np.r_[np.full(k, lam[k - 1] + d), lam[k:] + d])
    np.testing.assert_allclose(got, predicted, rtol=1e-10)
    assert np.linalg.eigvalsh(Minv).min() > 0  # positive definite
    with pytest.raises(NotPositiveDefiniteError, match="raise damping"):
        nystrom_inverse(np.array([1.0, -0.5]), Q[:, :2], 0.1)


def test_nystrom_from_the_operator_is_spd_and_predicts_the_spectrum(multiclass_model):
    m = multiclass_model
    op = HessianOperator(m)
    H = op.dense()
    w, U = np.linalg.eigh(H)
    k, d = 8, 1e-3
    apply = NystromPreconditioner(rank=k, tol=1e-10).build(op, d)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(m.n_params), rng.standard_normal(m.n_params)
    assert a @ apply(b) == pytest.approx(b @ apply(a), rel=1e-10)  # symmetric on random vectors
    R = rng.standard_normal((m.n_params, 20))
    assert np.all(np.einsum("ij,ij->j", R, apply(R)) > 0)  # positive on random vectors
    Minv = _as_matrix(apply, m.n_params)
    got = np.sort(np.linalg.eigvals(Minv @ (H + d * np.eye(m.n_params))).real)
    top = w[::-1]
    predicted = np.sort(np.r_[np.full(k, top[k - 1] + d), top[k:] + d])
    np.testing.assert_allclose(got, predicted, rtol=1e-6, atol=1e-9)


def _solve_pair(model, v, curvature, damping, **pc):
    plain = CGSolver(damping=damping, tol=1e-10).fit(model if curvature is None else
                                                       {"hessian": HessianOperator,
                                                        "gauss-newton": GaussNewtonOperator}[curvature](model))
    pre = CGSolver(damping=damping, tol=1e-10, **pc).fit(plain.operator_)
    return plain.solve(v), pre.solve(v)


def test_preconditioned_solve_equals_the_plain_one_convex(multiclass_model):
    m = multiclass_model
    V = np.random.default_rng(2).standard_normal((m.n_params, 3))
    for v in (V[:, 0], V):  # CG on one column, block CG on three
        plain, pre = _solve_pair(m, v, "hessian", 0.0, preconditioner="nystrom", preconditioner_rank=20)
        assert plain.converged and pre.converged
        np.testing.assert_allclose(pre.x, plain.x, rtol=1e-7, atol=1e-9 * np.abs(plain.x).max())
        assert pre.iterations < plain.iterations
        assert pre.info["preconditioner"] == "nystrom" and pre.info["rank"] == 20
        assert "setup_s" in pre.info and "setup_hvps" in pre.info


def test_preconditioned_solve_equals_the_plain_one_nonconvex_on_g_and_damped_h():
    m = fit_tiny_cnn(adam_steps=200)  # Adam only: its Hessian is indefinite
    v = np.random.default_rng(3).standard_normal(m.n_params)
    lmin = HessianOperator(m).eigenvalue_bounds(tol=1e-8)[0]
    for curvature, damping in (("gauss-newton", 0.01), ("hessian", max(0.0, -lmin) + 0.05)):
        op = {"hessian": HessianOperator, "gauss-newton": GaussNewtonOperator}[curvature](m)
        plain = CGSolver(damping=damping, tol=1e-10).fit(op).solve(v)  # one plain solve per curvature
        for pc in ({"preconditioner": "nystrom", "preconditioner_rank": 10}, {"preconditioner": "kfac"}):
            pre = CGSolver(damping=damping, tol=1e-10, **pc).fit(op).solve(v)
            assert plain.converged and pre.converged, (curvature, pc)
            np.testing.assert_allclose(pre.x, plain.x, rtol=1e-6, atol=1e-8 * np.abs(plain.x).max())


def test_the_eigenpairs_are_cached_per_theta_curvature_and_rank_and_shared_with_arnoldi(multiclass_model,
                                                                                         monkeypatch):
    from influence import ArnoldiSolver
    from influence.curvature import CurvatureOperator

    m = multiclass_model.clone().fit(multiclass_model.X_train_np_, multiclass_model.y_train_np_)
    calls = []
    hvp = CurvatureOperator.hvp
    monkeypatch.setattr(CurvatureOperator, "hvp",
                        lambda self, u, indices=None: (calls.append(np.ndim(u)), hvp(self, u, indices))[1])
    op = HessianOperator(m)
    pc = NystromPreconditioner(rank=10)
    a = pc.build(op, 0.0)
    first = len(calls)
    assert first > 10 and pc.setup["setup_hvps"] == first
    r = np.random.default_rng(0).standard_normal(m.n_params)
    b = pc.build(op, 0.0)  # same state: no new HVPs
    assert len(calls) == first and pc.setup["setup_hvps"] == 0
    np.testing.assert_array_equal(a(r), b(r))
    assert not np.allclose(pc.build(op, 0.5)(r), a(r))  # damping changes M^-1, not the eigenpairs
    assert len(calls) == first
    NystromPreconditioner(rank=5).build(op, 0.0)  # fewer pairs: served from the held ones
    assert len(calls) == first
    ArnoldiSolver(rank=10).fit(op).solve(r)  # arnoldi shares them: only the residual's HVP
    assert len(calls) == first + 1
    NystromPreconditioner(rank=15).build(op, 0.0)  # more pairs: Lanczos again
    second = len(calls)
    assert second > first + 10
    m.set_theta(m.theta_ * 1.01)  # new theta: new eigenpairs
    c = pc.build(op, 0.0)
    assert len(calls) > second + 10 and not np.allclose(c(r), a(r))
    third = len(calls)
    pc.build(GaussNewtonOperator(m), 0.0)  # another curvature: its own eigenpairs
    assert len(calls) > third + 10


def test_preconditioner_options_are_validated(multiclass_model, binary_model):
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        CGSolver(preconditioner="jacobi")
    with pytest.raises(ValueError, match="preconditioner_rank"):
        CGSolver(preconditioner_rank=0, preconditioner="nystrom")
    with pytest.raises(ValueError, match="applies to preconditioner='nystrom' only"):
        CGSolver(preconditioner="ekfac", preconditioner_rank=10)
    with pytest.raises(TypeError, match="callable"):
        CGSolver(preconditioner=3)
    undecayed = multiclass_model.clone()
    undecayed.weight_decay = 0.0
    undecayed.set_training_data(multiclass_model.X_train_np_, multiclass_model.y_train_np_)
    undecayed.set_theta(multiclass_model.theta_)
    with pytest.raises(NotPositiveDefiniteError, match="pass damping > 0"):  # always-zero pixels: singular factor
        CGSolver(preconditioner="ekfac").solve(undecayed, np.ones(undecayed.n_params))
    # an indefinite H at too small a damping: refused before iterating
    m = binary_model
    lmin = np.linalg.eigvalsh(m.hessian())[0]
    neg = NegativeDecayLogistic(weight_decay=-(lmin + 1.0))
    neg.set_training_data(m.X_train_np_, m.y_train_np_).set_theta(m.theta_)
    with pytest.raises(NotPositiveDefiniteError, match="raise damping"):
        CGSolver(preconditioner="nystrom", preconditioner_rank=m.n_params).solve(neg, np.ones(m.n_params))


def test_mixed_precision_refinement_reaches_the_float64_answer(multiclass_model):
    m = fit_tiny_cnn(adam_steps=200)
    V = np.random.default_rng(5).standard_normal((m.n_params, 3))
    op = GaussNewtonOperator(m)
    ref = CGSolver(damping=0.01, tol=1e-10).fit(op)
    for v, pc in ((V[:, 0], {"preconditioner": "nystrom", "preconditioner_rank": 5}), (V, {})):
        full = ref.solve(v)
        mixed = CGSolver(damping=0.01, tol=1e-10, precision="mixed", **pc).fit(op).solve(v)
        assert mixed.converged and mixed.residual <= 1e-9  # the float64 residual, computed afresh
        assert mixed.info["precision"] == "mixed" and mixed.info["refinements"] >= 2
        np.testing.assert_allclose(mixed.x, full.x, rtol=1e-7, atol=1e-9 * np.abs(full.x).max())
    assert op.low_precision().model.dtype == "float32" and op.low_precision() is op.low_precision()
    with pytest.raises(ValueError, match="precision"):
        CGSolver(precision="half")
    import keras

    from influence import KerasModel

    net = keras.Sequential([keras.Input((64,), dtype="float64"), keras.layers.Dense(10, dtype="float64")])
    km = KerasModel(net).set_training_data(multiclass_model.X_train_np_[:50], multiclass_model.y_train_np_[:50])
    with pytest.raises(ValueError, match="rebuilt in float32"):
        CGSolver(damping=0.1, precision="mixed").solve(km, np.ones(km.n_params))


def test_s_test_docstring_lists_every_solver_option():
    import inspect

    from influence.facade import InfluenceMethods as InfluenceShortcuts
    from influence.solvers import SOLVERS

    doc = InfluenceShortcuts.s_test.__doc__
    for name in ("exact", "cg", "lissa", "arnoldi", "kfac", "ekfac"):
        cls = SOLVERS[name]
        assert f'"{name}"' in doc, name
        for param in inspect.signature(cls.__init__).parameters:
            if param != "self":
                assert f"``{param}``" in doc, (name, param)

"""Block CG against exact solves: dependent, zero and eigenvector columns, preconditioning, damping, order."""
import numpy as np
import pytest

from influence.solvers import block_conjugate_gradient, conjugate_gradient


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def spd():
    """A 150 x 150 SPD matrix with eigenvalues 1e-2 .. 1e2, its eigenvectors, and 12 right-hand
    sides: column 3 duplicates column 1, column 5 is zero, column 7 is an eigenvector."""
    rng = np.random.default_rng(0)
    p = 150
    Q, _ = np.linalg.qr(rng.standard_normal((p, p)))
    lam = np.logspace(-2, 2, p)
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    B = rng.standard_normal((p, 12))
    B[:, 3] = B[:, 1]
    B[:, 5] = 0.0
    B[:, 7] = 2.5 * Q[:, 40]
    return A, Q, lam, B


def test_block_cg_equals_the_exact_solve(spd):
    A, _, _, B = spd
    X, it, negative, sizes = block_conjugate_gradient(lambda P: A @ P, B, tol=1e-12, maxiter=300)
    want = np.linalg.solve(A, B)
    assert not negative
    assert rel(X, want) < 1e-9
    np.testing.assert_array_equal(X[:, 5], 0.0)  # the zero column: solution 0, never searched
    np.testing.assert_allclose(X[:, 3], X[:, 1], rtol=0, atol=1e-12 * np.abs(X[:, 1]).max())
    # the duplicate and the zero column never enter the block: at most 10 independent directions
    assert sizes[0] == 10 and max(sizes) <= 10
    # a shared Krylov space: far fewer iterations than independent CG at the same tolerance
    _, it_cg, _ = conjugate_gradient(lambda P: A @ P, B, tol=1e-12, maxiter=300)
    assert it < it_cg / 2


def test_an_eigenvector_converges_in_one_step(spd):
    A, Q, lam, B = spd
    X, it, _, sizes = block_conjugate_gradient(lambda P: A @ P, B[:, 7:8], tol=1e-10)
    assert it == 1 and sizes == [1]
    np.testing.assert_allclose(X[:, 0], B[:, 7] / lam[40], rtol=1e-9, atol=1e-12)
    # inside a block it leaves the block after the first iteration
    _, _, _, sizes = block_conjugate_gradient(lambda P: A @ P, B[:, 6:9], tol=1e-10)
    assert sizes[0] == 3 and sizes[1] == 2


def test_preconditioned_and_damped(spd):
    A, _, _, B = spd
    p = len(A)
    d = 0.7
    Ad = A + d * np.eye(p)
    M_inv = np.linalg.inv(Ad + 0.05 * np.diag(np.random.default_rng(1).random(p)))  # close to Ad, SPD
    X, it, _, _ = block_conjugate_gradient(lambda P: A @ P + d * P, B, tol=1e-12, maxiter=300,
                                           preconditioner=lambda R: M_inv @ R)
    assert rel(X, np.linalg.solve(Ad, B)) < 1e-9
    _, it_plain, _, _ = block_conjugate_gradient(lambda P: A @ P + d * P, B, tol=1e-12, maxiter=300)
    assert it < it_plain


def test_independent_of_column_order(spd):
    A, _, _, B = spd
    perm = np.random.default_rng(2).permutation(B.shape[1])
    X, *_ = block_conjugate_gradient(lambda P: A @ P, B, tol=1e-12, maxiter=300)
    Xp, *_ = block_conjugate_gradient(lambda P: A @ P, B[:, perm], tol=1e-12, maxiter=300)
    assert rel(Xp, X[:, perm]) < 1e-9


def test_negative_curvature_stops_the_block():
    A = np.diag([3.0, 2.0, -1.0, 1.0])
    B = np.eye(4)[:, :2] + np.eye(4)[:, 2:4]
    _, _, negative, _ = block_conjugate_gradient(lambda P: A @ P, B, tol=1e-12)
    assert negative


def test_cg_solver_uses_block_cg_for_several_columns(multiclass_model):
    """On a model: solver='cg' with several columns runs block CG (fewer iterations than column
    CG, same answer), equal to the exact solve with damping, with per-column residuals."""
    m = multiclass_model
    rng = np.random.default_rng(3)
    V = rng.standard_normal((m.n_params, 8))
    V[:, 2] = V[:, 0]
    V[:, 4] = 0.0
    want = m.inverse_hvp(V, "exact", damping=0.01).x
    block = m.inverse_hvp(V, "cg", damping=0.01, tol=1e-10)
    column = m.inverse_hvp(V, "cg", damping=0.01, tol=1e-10, block=False)
    assert block.info["block"] and "block" not in column.info
    assert rel(block.x, want) < 1e-8 and rel(column.x, want) < 1e-8
    assert block.iterations < column.iterations
    assert len(block.info["residuals"]) == 8 and max(block.info["residuals"]) == block.residual <= 1e-10
    assert block.info["hvp_columns"] == sum(block.info["block_sizes"]) and block.info["block_sizes"][0] == 6
    # one column takes single-vector CG, as before
    one = m.inverse_hvp(V[:, 1], "cg", damping=0.01)
    assert "block" not in one.info and rel(one.x, want[:, 1]) < 1e-8


def test_influence_matrix_with_block_cg_equals_per_test_point_solves(multiclass_model, digits):
    m = multiclass_model
    X, y = digits
    Xt, yt = X[-6:], y[-6:]
    I = m.influence_matrix(Xt, yt, solver="cg", tol=1e-10)
    rows = np.stack([m.influence_up_loss(Xt[k:k + 1], yt[k:k + 1], solver="exact") for k in range(len(Xt))])
    assert rel(I, rows) < 1e-8


def test_block_cg_reports_every_product_column(multiclass_model, monkeypatch):
    """hvp_columns (the iterations') plus check_columns (the true-residual products) is every
    column the operator was asked for in the solve."""
    from influence import CGSolver
    from influence.curvature import CurvatureOperator, HessianOperator

    m = multiclass_model
    V = np.random.default_rng(4).standard_normal((m.n_params, 5))
    solver = CGSolver(damping=0.01, tol=1e-10).fit(HessianOperator(m))
    seen = [0]
    real = CurvatureOperator.hvp

    def counting(self, v, indices=None):
        seen[0] += 1 if np.ndim(v) == 1 else np.shape(v)[1]
        return real(self, v, indices)

    monkeypatch.setattr(CurvatureOperator, "hvp", counting)
    res = solver.solve(V)
    assert res.info["check_columns"] >= 5  # at least the final residual of every column
    assert res.info["hvp_columns"] + res.info["check_columns"] == seen[0]

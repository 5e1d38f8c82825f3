"""The structured explicit curvature of the linear models: weighted Gram matrices over dense
and sparse columns equal the dense ones; softmax regression's matrix (45 off-diagonal
blocks, the diagonal ones by the rows' zero sum, all-zero pixels left out) equals the closed
form; the float32 Gauss-Newton preconditioner solves to the float64 answer in two block
iterations whose reported residual is the true one."""
import numpy as np
import pytest

from conftest import fit_tiny_cnn, multiclass_hessian_closed_form
from influence import CGSolver, ExactSolver, GaussNewtonOperator, GaussNewtonPreconditioner, HessianOperator
from influence.curvature.gram import ColumnSplit
from influence.solvers import column_residuals


def _design(rng, n=300):
    """10 dense columns, 25 sparse ones (1-3% non-zero), 5 all-zero ones, shuffled."""
    dense = rng.random((n, 10)) * (rng.random((n, 10)) < 0.9)
    sparse = rng.random((n, 25)) * (rng.random((n, 25)) < rng.uniform(0.01, 0.03, 25))
    X = np.concatenate([dense, sparse, np.zeros((n, 5))], axis=1)
    return X[:, rng.permutation(X.shape[1])]


@pytest.mark.parametrize("sparse_cost, n_dense", [(1e-9, 0), (50.0, None), (1e12, 35)])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-13), (np.float32, 1e-5)])
def test_column_split_gram_equals_the_dense_weighted_gram(sparse_cost, n_dense, dtype, rtol):
    rng = np.random.default_rng(0)
    X = _design(rng)
    split = ColumnSplit(X, dtype=dtype, sparse_cost=sparse_cost)
    nonzero = np.flatnonzero(np.any(X != 0, axis=0))
    assert sorted(split.index.tolist()) == nonzero.tolist()  # the all-zero columns are left out
    if n_dense is None:
        assert 5 <= split.n_dense <= 20  # the dense columns dense, the sparse ones sparse
    else:
        assert split.n_dense == n_dense
    for w in (rng.random(X.shape[0]), np.zeros(X.shape[0])):
        full = (X.T * w) @ X
        G = split.gram(w)
        assert G.dtype == dtype
        np.testing.assert_allclose(G, full[np.ix_(split.index, split.index)], rtol=rtol,
                                   atol=rtol * max(np.abs(full).max(), 1e-300))
        np.testing.assert_array_equal(G, G.T)
    with pytest.raises(ValueError, match="non-negative"):
        split.gram(-np.ones(X.shape[0]))
    with pytest.raises(ValueError, match="shape"):
        split.gram(np.ones(3))


def test_a_split_is_made_only_where_it_pays():
    rng = np.random.default_rng(1)
    X = _design(rng)
    split = ColumnSplit.if_worthwhile(X)
    assert split is not None and split.n_dense < 0.9 * X.shape[1]
    assert ColumnSplit.if_worthwhile(rng.random((200, 30))) is None  # dense data: the plain pass
    assert ColumnSplit.if_worthwhile(X, max_bytes=1000) is None  # a copy too large
    half = split.astype(np.float32)
    w = rng.random(X.shape[0])
    assert half.gram(w).dtype == np.float32
    np.testing.assert_allclose(half.gram(w), split.gram(w), rtol=1e-5, atol=1e-5 * np.abs(split.gram(w)).max())


def test_softmax_hessian_by_blocks_equals_the_closed_form(multiclass_model):
    m = multiclass_model
    d, k = m.blocks_[0].shape
    W = m.theta_.reshape(d, k)
    H = HessianOperator(m).dense()
    np.testing.assert_allclose(H, multiclass_hessian_closed_form(m.X_train_np_, W, m.weight_decay), rtol=1e-12,
                               atol=1e-14)
    sub = np.arange(0, m.n_train_, 3)
    Hs = HessianOperator(m, indices=sub).dense()
    np.testing.assert_allclose(Hs, multiclass_hessian_closed_form(m.X_train_np_[sub], W, m.weight_decay),
                               rtol=1e-12, atol=1e-14)
    index, B64, rest = HessianOperator(m).explicit_blocks("float64")
    zero_pixels = np.flatnonzero(~np.any(m.X_train_np_ != 0, axis=0))
    assert len(zero_pixels) > 0  # the digits' corners: the case the structure skips
    left_out = np.setdiff1d(np.arange(m.n_params), index)
    np.testing.assert_array_equal(left_out, np.sort((zero_pixels[:, None] * k + np.arange(k)).ravel()))
    np.testing.assert_allclose(rest, m.weight_decay)
    np.testing.assert_array_equal(B64, H[np.ix_(index, index)])
    assert np.all(H[np.ix_(left_out, index)] == 0)
    _, B32, _ = HessianOperator(m).explicit_blocks("float32")
    assert B32.dtype == np.float32
    np.testing.assert_allclose(B32, B64, rtol=0, atol=2e-6 * np.abs(B64).max())
    with pytest.raises(ValueError, match="dtype"):
        HessianOperator(m).explicit_blocks("float16")


def test_float32_gauss_newton_preconditioner_reaches_the_float64_answer_in_two_iterations(multiclass_model):
    m = multiclass_model
    op = HessianOperator(m)
    V = np.random.default_rng(4).standard_normal((m.n_params, 5))
    exact = ExactSolver().fit(op).solve(V)
    for v in (V[:, 0], V):  # CG, block CG
        res = CGSolver(tol=1e-10, preconditioner="gauss-newton-float32").fit(op).solve(v)
        assert res.converged and res.iterations <= 2, res.iterations
        assert res.info["preconditioner"] == "gauss-newton" and res.info["dtype"] == "float32"
        assert res.info["rank"] < m.n_params  # the all-zero pixels' weights are not factored
        true = column_residuals(op, res.x, v, 0.0)
        assert np.max(true) < 1e-10
        if v.ndim == 2:  # block CG kept its recursive residual (no checking product): it is the true one
            assert res.info["check_columns"] == 0
            np.testing.assert_allclose(res.info["residuals"], true, rtol=1e-3, atol=1e-14)
        np.testing.assert_allclose(res.x, exact.x if v.ndim == 2 else exact.x[:, 0], rtol=1e-8,
                                   atol=1e-9 * np.abs(exact.x).max())
    with pytest.raises(ValueError, match="dtype"):
        GaussNewtonPreconditioner(dtype="half")
    # no all-zero input: every parameter in the factor, in the class-major order of the blocks
    dense = m.clone().set_training_data(m.X_train_np_ + 0.05, m.y_train_np_).set_theta(m.theta_)
    dop = HessianOperator(dense)
    index, _, _ = dop.explicit_blocks()
    assert len(index) == m.n_params and not np.array_equal(index, np.arange(m.n_params))
    res = CGSolver(tol=1e-10, preconditioner="gauss-newton-float32").fit(dop).solve(V)
    assert res.converged and res.iterations <= 2
    np.testing.assert_allclose(res.x, ExactSolver().fit(dop).solve(V).x, rtol=1e-8, atol=1e-9 * np.abs(res.x).max())


def test_float32_gauss_newton_preconditioner_on_a_network():
    m = fit_tiny_cnn(adam_steps=200)  # G from the float32 twin's Jacobians
    gn = GaussNewtonOperator(m)
    V = np.random.default_rng(5).standard_normal((m.n_params, 2))
    exact = ExactSolver(damping=0.01).fit(gn).solve(V)
    res = CGSolver(damping=0.01, tol=1e-10, preconditioner=GaussNewtonPreconditioner(dtype="float32")).fit(gn).solve(V)
    assert res.converged and res.iterations <= 3, res.iterations
    assert res.info["rank"] == m.n_params
    assert np.max(column_residuals(gn, res.x, V, 0.01)) < 1e-10
    np.testing.assert_allclose(res.x, exact.x, rtol=1e-8, atol=1e-9 * np.abs(exact.x).max())

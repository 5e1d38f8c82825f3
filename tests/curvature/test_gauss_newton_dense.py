"""The explicit Gauss-Newton matrix from per-example output Jacobians (k reverse passes per
example) equals the one built column by column from products; the Gauss-Newton
preconditioner makes CG exact in one iteration on G and cuts its iterations on damped H."""
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from conftest import fit_tiny_cnn  # noqa: E402
from influence import (CGSolver, CurvatureOperator, ExactSolver, GaussNewtonOperator, GaussNewtonPreconditioner,  # noqa: E402
                       HessianOperator, KerasModel)
from influence.solvers import column_residuals  # noqa: E402


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def cnn():
    return fit_tiny_cnn(adam_steps=200)  # Adam only: its Hessian is indefinite


def _no_products(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("the Jacobian build made a product")
    monkeypatch.setattr(CurvatureOperator, "hvp", refuse)


@pytest.fixture(scope="module")
def gn(cnn):
    return GaussNewtonOperator(cnn)  # one operator (one trace of its kernels) for the tests below


def test_jacobian_build_equals_the_product_build_on_a_cnn(cnn, gn, monkeypatch):
    for indices in (None, np.array([0, 3, 5, 11, 17, 23])):  # whole set (4 batches of 7) and a sub-sample
        op = gn if indices is None else GaussNewtonOperator(cnn, indices=indices)
        by_products = gn.hvp(np.eye(cnn.n_params), indices=indices)  # columns by products (one trace)
        by_products = 0.5 * (by_products + by_products.T)
        with monkeypatch.context() as mp:
            _no_products(mp)
            assert op._dense_by_factors()
            G = op.dense()
        assert rel(G, by_products) < 1e-12
        np.testing.assert_array_equal(G, G.T)
    # the Hessian of a network is not built this way (it is not the Gauss-Newton matrix)
    assert not HessianOperator(cnn)._dense_by_factors()


@pytest.mark.slow
@pytest.mark.parametrize("loss,k", [("squared", 3), ("sigmoid", 1)])
def test_jacobian_build_for_each_keras_loss(loss, k):
    """Output Hessians I (squared, 3 outputs) and p(1 - p) (sigmoid, one output), each factored
    by its eigendecomposition (softmax's diag(p) - p p^T: the CNN above)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((5,), dtype="float64")
    h = keras.layers.Dense(6, activation="tanh", dtype="float64")(inp)
    net = keras.Model(inp, keras.layers.Dense(k, dtype="float64")(h))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 5))
    y = (rng.standard_normal((30, k)) if loss == "squared" else
         rng.integers(0, 2, 30) if loss == "sigmoid" else rng.integers(0, k, 30))
    m = KerasModel(net, loss=loss, weight_decay=0.01, batch_size=8).set_training_data(X, y)
    op = GaussNewtonOperator(m)
    assert rel(op.dense(), op._dense_from_products()) < 1e-12


def test_gauss_newton_preconditioner_is_exact_on_g_and_cuts_iterations_on_damped_h(cnn, gn):
    m = cnn
    V = np.random.default_rng(3).standard_normal((m.n_params, 3))
    exact = ExactSolver(damping=0.01).fit(gn).solve(V)
    for v in (V[:, 0], V):  # CG, block CG
        res = CGSolver(damping=0.01, tol=1e-10, preconditioner="gauss-newton").fit(gn).solve(v)
        assert res.converged and res.iterations == 1, res.iterations
        assert res.residual < 1e-10  # the residual of the matrix-free product
        assert np.max(column_residuals(gn, res.x, v, 0.01)) < 1e-10  # and computed afresh
        np.testing.assert_allclose(res.x, exact.x if v.ndim == 2 else exact.x[:, 0], rtol=1e-8,
                                   atol=1e-10 * np.abs(exact.x).max())
        assert res.info["preconditioner"] == "gauss-newton" and res.info["rank"] == m.n_params
    h = HessianOperator(m)
    damping = max(0.0, -h.eigenvalue_bounds(tol=1e-8)[0]) + 0.05
    plain = CGSolver(damping=damping, tol=1e-10).fit(h).solve(V[:, 0])
    pre = CGSolver(damping=damping, tol=1e-10, preconditioner="gauss-newton").fit(h).solve(V[:, 0])
    assert plain.converged and pre.converged
    np.testing.assert_allclose(pre.x, plain.x, rtol=1e-7, atol=1e-9 * np.abs(plain.x).max())
    assert pre.iterations < plain.iterations
    # the same factorisation serves a second solve: no second set-up
    apply = GaussNewtonPreconditioner().build(h, damping)
    A = h.gauss_newton().dense() + damping * np.eye(m.n_params)
    np.testing.assert_allclose(A @ apply(V), V, rtol=1e-8, atol=1e-10)


def test_gauss_newton_preconditioner_is_refused_above_max_hessian_params():
    m = fit_tiny_cnn(adam_steps=20, max_hessian_params=10)
    with pytest.raises(ValueError, match="max_hessian_params.*preconditioner='nystrom'"):
        CGSolver(damping=0.01, preconditioner="gauss-newton").fit(GaussNewtonOperator(m)).solve(np.ones(m.n_params))
    with pytest.raises(ValueError, match="preconditioner_rank"):
        CGSolver(preconditioner="gauss-newton", preconditioner_rank=5)

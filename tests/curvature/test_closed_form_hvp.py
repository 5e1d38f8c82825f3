"""The closed-form products of the linear models (numpy X^T S X V, and its TF twin used by
LiSSA's compiled loop) equal the autodiff HVP, on the whole set and on a sub-sample."""
import numpy as np
import tensorflow as tf

from influence.curvature import GaussNewtonOperator, HessianOperator
from influence.curvature import kernels as K


def _autodiff(model, V, idx=None):
    _, many = K.hessian_kernels(model)
    x = model.X_train_ if idx is None else tf.gather(model.X_train_, idx)
    y = model.y_train_ if idx is None else tf.gather(model.y_train_, idx)
    n = model.n_train_ if idx is None else len(idx)
    return many(model.theta_tensor(), x, y, tf.constant(V)).numpy() / n + model.weight_decay * V


def test_closed_form_products_equal_autodiff(multiclass_model, binary_model):
    for m in (multiclass_model, binary_model):
        V = np.random.default_rng(0).standard_normal((m.n_params, 7))
        idx = np.arange(0, m.n_train_, 3)
        for op in (HessianOperator(m), GaussNewtonOperator(m)):
            assert op._numpy_closed_form()
            np.testing.assert_allclose(op.hvp(V), _autodiff(m, V), rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(op.hvp(V[:, 0]), _autodiff(m, V[:, :1])[:, 0], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(op.hvp(V, indices=idx), _autodiff(m, V, idx), rtol=1e-12, atol=1e-14)
        tf_form = K.closed_form_kernels(m._curvature_sum)[1](m.theta_tensor(), m.X_train_, m.y_train_, tf.constant(V))
        np.testing.assert_allclose(tf_form.numpy() / m.n_train_ + m.weight_decay * V, _autodiff(m, V), rtol=1e-12,
                                   atol=1e-14)
        np.testing.assert_allclose(HessianOperator(m).hvp(np.eye(m.n_params)), m.hessian(), rtol=1e-10, atol=1e-13)


def test_the_probabilities_are_kept_per_theta(multiclass_model, binary_model):
    for m in (multiclass_model, binary_model):
        V = np.random.default_rng(1).standard_normal((m.n_params, 3))
        theta, x = np.asarray(m.theta_), m.X_train_np_[:50]
        np.testing.assert_allclose(m._curvature_sum_np(theta, x, V, weights=m._curvature_weights_np(theta, x)),
                                   m._curvature_sum_np(theta, x, V), rtol=1e-13, atol=1e-15)
        c = type(m)(**m.get_config()).set_training_data(m.X_train_np_, m.y_train_np_).set_theta(1.1 * theta)
        op = HessianOperator(c)
        np.testing.assert_allclose(op.hvp(V), _autodiff(c, V), rtol=1e-12, atol=1e-14)
        c.set_theta(0.7 * theta)  # a new theta: new probabilities, not the cached ones
        np.testing.assert_allclose(op.hvp(V), _autodiff(c, V), rtol=1e-12, atol=1e-14)


def test_closed_form_explicit_matrix_equals_the_product_build(multiclass_model, binary_model, monkeypatch):
    """The explicit matrix of the linear models (multiclass: k (k - 1) / 2 weighted Gram blocks
    over dense and sparse columns, the diagonal ones by the rows' zero sum; binary:
    X^T diag(p (1 - p)) X) equals the one built from p products, on the whole set and on a
    sub-sample, and is built without a single product."""
    from influence.curvature.operators import CurvatureOperator

    for m in (multiclass_model, binary_model):
        idx = np.arange(1, m.n_train_, 4)
        for indices in (None, idx):
            for Op in (HessianOperator, GaussNewtonOperator):
                reference = Op(m, indices=indices)._dense_from_products()
                with monkeypatch.context() as mp:
                    mp.setattr(CurvatureOperator, "hvp", lambda *a, **k: (_ for _ in ()).throw(
                        AssertionError("the closed form made a product")))
                    D = Op(m, indices=indices).dense()
                np.testing.assert_allclose(D, reference, rtol=1e-11, atol=1e-13)
                np.testing.assert_array_equal(D, D.T)
        # independent of the block layout: the Kronecker sum written out for a few points
        if m is multiclass_model:
            few = np.array([0, 5, 9])
            x = m.X_train_np_[few]
            P = m.predict_proba(x)
            want = sum(np.kron(np.outer(xi, xi), np.diag(pi) - np.outer(pi, pi)) for xi, pi in zip(x, P)) / 3
            want += m.weight_decay * np.eye(m.n_params)
            np.testing.assert_allclose(HessianOperator(m, indices=few).dense(), want, rtol=1e-12, atol=1e-14)

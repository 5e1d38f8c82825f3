"""No hidden state: a fitted model cannot change behind its caches (the caller's arrays are
copied, the hyperparameters that determine a fit are fixed once it holds data), ensembles
refuse members fitted on other points, a deleted model is released, and every bad option is
refused with a message that names it. Each test failed on the code before issue #43."""
import gc
import weakref

import numpy as np
import pytest

from influence import LogisticRegression, BinaryLogisticRegression
from influence.estimators import TRAK, TracIn
from influence.solvers import CGSolver, KroneckerPreconditioner


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def data(digits):
    X, y = digits
    return X[:150].copy(), y[:150].copy(), X[300:302], y[300:302]


@pytest.mark.parametrize("binary", [False, True])
def test_mutating_the_callers_arrays_after_fit_changes_nothing(data, binary_digits, binary):
    if binary:
        Xtr, ytr, Xte, yte = binary_digits
        X, y, xt, yt = Xtr[:120].copy(), ytr[:120].copy(), Xte[:2], yte[:2]
        cls = BinaryLogisticRegression
    else:
        X, y, xt, yt = (a.copy() for a in data)
        cls = LogisticRegression
    ref = cls(weight_decay=0.01).fit(X.copy(), y.copy())
    m = cls(weight_decay=0.01).fit(X, y)
    m.s_test(xt, yt, solver="cg", tol=1e-10)  # every cache warm before the caller's change
    m.hessian()
    X *= 1.7  # the caller reuses its arrays
    y[:] = y[::-1]
    assert not m.X_train_np_.flags.writeable and not m.theta_.flags.writeable
    for solver, opts in [("cg", {"tol": 1e-10}), ("exact", {})]:
        got = m.s_test(xt, yt, solver=solver, use_cache=False, **opts).x
        want = ref.s_test(xt, yt, solver=solver, use_cache=False, **opts).x
        assert rel(got, want) < 1e-8, solver
    np.testing.assert_allclose(m.hessian(), ref.hessian(), rtol=1e-12, atol=1e-15)
    theta = np.array(m.theta_)
    m.set_theta(theta)
    theta *= 2.0  # a theta handed in is copied too
    np.testing.assert_array_equal(m.theta_, ref.theta_)


@pytest.mark.parametrize("name, value", [("weight_decay", 0.05), ("dtype", "float32"), ("seed", 3),
                                         ("n_classes", 12)])
def test_hyperparameters_of_a_fit_are_fixed_once_the_model_holds_data(data, name, value):
    X, y, _, _ = data
    m = LogisticRegression(weight_decay=0.01)
    setattr(m, name, value) if name != "dtype" else None  # before data: allowed
    m = LogisticRegression(weight_decay=0.01).fit(X, y)
    before = getattr(m, name)
    with pytest.raises(AttributeError, match=rf"{name} is fixed once the model holds training data.*with_config"):
        setattr(m, name, value)
    assert getattr(m, name) == before
    m.progress = False  # what changes no fitted result stays settable
    m.batch_size = 64
    copy = m.with_config(**{name: value}) if name != "n_classes" else None
    if copy is not None:
        assert getattr(copy, name) == value and copy.n_train_ == m.n_train_
    with pytest.raises(ValueError, match="not constructor arguments"):
        m.with_config(colour="red")


def test_every_solver_answers_for_the_fitted_weight_decay(data):
    """Reassigning weight_decay after fit was accepted and every cache kept the old value
    (ExactSolver 5x off with converged=True, LiSSA's compiled loop, hessian()): now it is refused,
    and each answer equals a fresh model's."""
    X, y, xt, yt = data
    m = LogisticRegression(weight_decay=0.01).fit(X, y)
    fresh = LogisticRegression(weight_decay=0.01).fit(X, y)
    solves = {"exact": {}, "cg": {"tol": 1e-10}, "arnoldi": {"rank": m.n_params},
              "lissa": {"scale": "auto", "depth": 400, "num_samples": 1, "batch_size": 150, "seed": 0},
              "cg-mixed": {"precision": "mixed", "tol": 1e-8}}
    for name, opts in solves.items():  # warm every cache and compiled loop at 0.01
        m.s_test(xt, yt, solver=name.split("-")[0], use_cache=False, **opts)
    m.hessian()
    with pytest.raises(AttributeError, match="weight_decay is fixed"):
        m.weight_decay = 0.05
    for name, opts in solves.items():
        got = m.s_test(xt, yt, solver=name.split("-")[0], use_cache=False, **opts)
        want = fresh.s_test(xt, yt, solver=name.split("-")[0], use_cache=False, **opts)
        assert rel(got.x, want.x) < 1e-6, name
    np.testing.assert_allclose(m.hessian(), fresh.hessian(), rtol=1e-12)


def test_keras_retrain_keeps_the_fitted_weight_decay(digits):
    import keras

    from influence import KerasModel
    from influence.models.keras_model import KerasRetrain

    X, y = digits
    X, y = X[:60].astype("float32"), y[:60]

    def wrapped():
        keras.utils.set_random_seed(0)
        net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(10)])
        net.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model = KerasModel(net, loss="softmax", weight_decay=1e-2, retrain=KerasRetrain(steps=20, batch_size=16))
        return model.set_training_data(X, y)

    m, fresh = wrapped(), wrapped()
    first = m.retrain_without([3])  # compiles the re-fit loop at wd 1e-2
    with pytest.raises(AttributeError, match="weight_decay is fixed"):
        m.weight_decay = 1.0
    np.testing.assert_allclose(m.retrain_without([3]), fresh.retrain_without([3]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(first, fresh.retrain_without([3]), rtol=1e-6, atol=1e-7)


def test_trak_refuses_ensemble_members_fitted_on_other_points(digits):
    X, y = digits
    a = LogisticRegression(weight_decay=0.01).fit(X[:100], y[:100])
    b = LogisticRegression(weight_decay=0.01).fit(X[100:200], y[100:200])  # same n, other points
    with pytest.raises(ValueError, match=r"member 1 .* holds other training points"):
        TRAK(proj_dim=64, models=[a, b]).fit(a).influence_matrix(X[300:302], y[300:302])
    same = LogisticRegression(weight_decay=0.01).fit(X[:100], y[:100])
    out = TRAK(proj_dim=64, models=[a, same]).fit(a).influence_matrix(X[300:302], y[300:302])
    assert out.shape == (2, 100) and np.all(np.isfinite(out))


@pytest.mark.parametrize("binary", [False, True])
def test_a_deleted_model_is_released(data, binary_digits, binary):
    """The module-level operator cache held every LogisticRegression (its compiled closed-form
    kernel held a bound method of the model) for the life of the process."""
    if binary:
        Xtr, ytr, Xte, yte = binary_digits
        m = BinaryLogisticRegression(weight_decay=0.01).fit(Xtr[:100], ytr[:100])
        xt, yt = Xte[:2], yte[:2]
    else:
        X, y, xt, yt = data
        m = LogisticRegression(weight_decay=0.01).fit(X, y)
    m.s_test(xt, yt, solver="cg", use_cache=False)
    m.s_test(xt, yt, solver="exact", use_cache=False)
    m.s_test(xt, yt, solver="lissa", scale="auto", depth=50, num_samples=1, batch_size=32, use_cache=False)
    m.s_test(xt, yt, solver="cg", preconditioner="gauss-newton", damping=1e-3, use_cache=False)
    m.influence_matrix(xt, yt, curvature="gauss-newton")
    m.hessian_eigenvalue_bounds()
    TRAK(proj_dim=32).fit(m).influence_matrix(xt, yt)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------------- messages
@pytest.fixture(scope="module")
def small(data):
    X, y, xt, yt = data
    return LogisticRegression(weight_decay=0.01).fit(X, y), xt, yt


@pytest.mark.parametrize("fn, match", [
    (lambda r: r[:-1], r"returned shape .* for a residual of shape"),
    (lambda r: r * np.nan, r"returned NaN or infinite values"),
    (lambda r: "no", r"returned str, not an array of numbers"),
    (lambda r: 1 / 0, r"raised ZeroDivisionError"),
])
def test_a_bad_callable_preconditioner_is_named(small, fn, match):
    m, xt, yt = small
    v = m.test_gradient(xt, yt)
    for block, rhs in [(True, np.stack([v, 2 * v], axis=1)), (False, v)]:
        with pytest.raises(ValueError, match=r"preconditioner=.*your callable R -> M\^-1 R.*" + match):
            CGSolver(preconditioner=fn, block=block).fit(m.curvature_operator()).solve(rhs)


def test_a_callable_preconditioner_gets_a_copy_of_the_residual(small):
    m, xt, yt = small
    v = m.test_gradient(xt, yt)
    exact = np.linalg.solve(m.hessian(), v)

    def in_place(r):
        r *= 0.5  # M^-1 = I / 2, but written into its argument
        return r

    for block in (False, True):
        res = CGSolver(preconditioner=in_place, block=block, tol=1e-10).fit(m.curvature_operator()).solve(v)
        assert rel(res.x, exact) < 1e-8, block


def test_tolerances_at_or_above_one_are_refused():
    with pytest.raises(ValueError, match=r"tol must be a number in \(0.0, 1.0\)"):
        CGSolver(tol=1.0)
    with pytest.raises(ValueError, match=r"tol must be a number in \(0.0, 1.0\)"):
        CGSolver(tol=5)
    with pytest.raises(ValueError, match=r"inner_tol must be a number in \(0.0, 1.0\)"):
        CGSolver(precision="mixed", inner_tol=1)


def test_nystrom_rank_above_the_explicit_limit_names_preconditioner_rank(data):
    X, y, xt, yt = data
    m = LogisticRegression(weight_decay=0.01, max_hessian_params=100).fit(X, y)
    with pytest.raises(ValueError, match=r"preconditioner_rank.*max_hessian_params"):
        m.s_test(xt, yt, solver="cg", preconditioner="nystrom", preconditioner_rank=m.n_params - 1, use_cache=False)


def test_kronecker_preconditioner_options_are_checked_where_they_are_set():
    with pytest.raises(ValueError, match="fisher must be one of"):
        KroneckerPreconditioner("ekfac", fisher="bogus")
    with pytest.raises(ValueError, match="mc_samples must be an integer"):
        KroneckerPreconditioner("kfac", fisher="mc", mc_samples=0)


@pytest.mark.parametrize("lr", [float("nan"), -0.1, 0.0, "0.1"])
def test_tracin_checkpoint_learning_rates_are_checked(lr):
    with pytest.raises(ValueError, match="learning rate of TracIn checkpoint 0"):
        TracIn([(np.zeros(3), lr)])


def test_tracin_checkpoint_of_the_wrong_size_is_refused(small):
    m, xt, yt = small
    with pytest.raises(ValueError, match=f"theta has 3 entries, the model has p = {m.n_params}"):
        TracIn([(np.zeros(3), 0.1)]).fit(m).influence_matrix(xt, yt)


def test_feature_cache_true_without_trainable_is_refused():
    import keras

    from influence import KerasModel

    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"feature_cache=True .* trainable=None"):
        KerasModel(net, loss="softmax", feature_cache=True)

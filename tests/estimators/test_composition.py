"""Model, curvature operator, solver and influence object are separate pieces: no solver or
estimator writes onto the model, caches belong to the operator / solver, options reach the
solver by name, and the scripts stay thin."""
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from influence import (ArnoldiSolver, CGSolver, EKFACSolver, ExactSolver, GaussNewtonOperator, HessianOperator,
                       InfluenceFunction, KFACSolver, LissaSolver, LogisticRegression)
from influence.estimators import ESTIMATORS, get_estimator
from influence.solvers import SOLVERS, AutoDamping

REPO = Path(__file__).resolve().parents[2]


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def snapshot(model):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vars(model).items()}


def assert_unchanged(before, model):
    after = vars(model)
    assert set(after) == set(before), set(after) ^ set(before)
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(after[k], v), k
        else:
            assert after[k] is v or after[k] == v, k


@pytest.fixture(scope="module")
def small(digits):
    X, y = digits
    return LogisticRegression(weight_decay=0.01).fit(X[:200], y[:200]), X[300:303], y[300:303]


def test_no_solver_or_estimator_writes_onto_the_model(small):
    m, xt, yt = small
    m.data_fingerprint_  # the model's own lazily computed hash of its data
    before = snapshot(m)
    solvers = [ExactSolver(), CGSolver(tol=1e-8), LissaSolver(scale="auto", depth=200, num_samples=2, batch_size=8),
               ArnoldiSolver(rank=20), KFACSolver(damping=1e-3), EKFACSolver(damping=1e-3), CGSolver(damping="auto"),
               CGSolver(damping=1e-3, preconditioner="gauss-newton")]
    for solver in solvers:
        for curvature in ("hessian", "gauss-newton"):
            infl = InfluenceFunction(solver, curvature=curvature).fit(m)
            infl.influence_matrix(xt, yt)
            infl.s_test(xt[0], yt[0])
    for name in ESTIMATORS:
        est = get_estimator(name)
        est.fit(m).influence_matrix(xt, yt)
        est.self_scores()
    # the convenience wrappers too
    for name in SOLVERS.names():
        opts = {"lissa": {"scale": "auto", "depth": 100}, "arnoldi": {"rank": 10}}.get(name, {})
        m.s_test(xt[0], yt[0], solver=name, **opts)
    m.hessian(), m.hvp(np.ones(m.n_params)), m.hessian_eigenvalue_bounds(), m.per_example_curvature()
    m.most_influential(xt[0], yt[0], k=3, curvature="gauss-newton")
    assert_unchanged(before, m)
    documented = {"weight_decay", "curvature", "dtype", "batch_size", "cache_dir", "seed", "max_hessian_params",
                  "progress", "strategy", "_built", "tol", "max_iter", "polish", "n_classes", "x_shape_", "y_shape_",
                  "blocks_", "n_params", "decay_mask_", "_kernels", "theta_", "X_train_np_", "y_train_np_",
                  "X_train_", "y_train_", "n_train_", "_data_fingerprint", "grad_norm_", "stationarity_tol",
                  "nonstationary", "_influence_tools"}  # _influence_tools: the model's facade, made with its data
    assert set(vars(m)) <= documented, set(vars(m)) - documented


def test_operators_own_their_products_and_caches(small):
    m, xt, yt = small
    H, G = HessianOperator(m), GaussNewtonOperator(m)
    assert rel(H.dense(), m.hessian()) < 1e-12
    assert rel(G.dense(), H.dense()) < 1e-10  # outputs linear in theta: G = H
    v = np.random.default_rng(0).standard_normal(m.n_params)
    assert rel(H.hvp(v), H.dense() @ v) < 1e-10
    first = H.dense()
    assert H.dense() is first  # cached for this theta
    other = m.clone().fit(m.X_train_np_, m.y_train_np_)
    other.set_theta(m.theta_ * 1.1)
    H2 = HessianOperator(other)
    assert rel(H2.dense(), first) > 1e-3  # another theta, another matrix
    sub = HessianOperator(m, indices=np.arange(20))
    assert sub.n_points == 20 and rel(sub.hvp(v), H.hvp(v, indices=np.arange(20))) < 1e-12


def test_a_solver_is_fitted_on_an_operator_and_refits_when_theta_changes(small):
    m, xt, yt = small
    clone = m.clone().fit(m.X_train_np_, m.y_train_np_)
    op = HessianOperator(clone)
    solver = ExactSolver(damping=0.1).fit(op)
    v = clone.test_gradient(xt[0], yt[0])
    a = solver.solve(v).x
    assert rel(a, np.linalg.solve(op.dense() + 0.1 * np.eye(clone.n_params), v)) < 1e-10
    clone.set_theta(clone.theta_ * 1.05)  # the fitted factor is keyed by the state: recomputed
    b = solver.solve(v).x
    assert rel(b, np.linalg.solve(op.dense() + 0.1 * np.eye(clone.n_params), v)) < 1e-10 and rel(a, b) > 1e-4
    with pytest.raises(RuntimeError, match="not fitted"):
        CGSolver().solve(v)


def test_auto_damping_is_one_rule_with_its_constants_named():
    auto = AutoDamping()
    assert CGSolver(damping="auto").damping == auto and auto.config() == "auto"
    assert auto.choose(lmin=0.5, accuracy=0.01) == 0.0  # surely definite: no damping
    assert auto.choose(lmin=-0.2, accuracy=0.01) == pytest.approx(0.3)  # 1.5 |lambda_min|
    assert auto.choose(lmin=0.005, accuracy=0.01) == pytest.approx(0.01)  # sign unknown: the accuracy
    # the Fig 2 CNN's rule: at least --damping, raised past a negative eigenvalue below -damping / 2
    cnn = AutoDamping(minimum=0.01, factor=1.5, accuracy=0.0)
    assert cnn.choose(lmin=-0.004, accuracy=0.0) == 0.01 and cnn.choose(lmin=-0.1, accuracy=0.0) == pytest.approx(0.15)
    assert cnn.raised(0.15, 0.0) == pytest.approx(0.45)
    for bad in (dict(minimum=-1.0), dict(factor=0.0), dict(retries=-1), dict(lanczos_tol=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AutoDamping(**bad)


def test_solvers_and_estimators_share_one_registry_and_validate_where_set():
    assert type(SOLVERS) is type(ESTIMATORS)
    assert SOLVERS.names() == ["arnoldi", "cg", "ekfac", "exact", "kfac", "lissa"]
    assert isinstance(SOLVERS.create("cg", tol=1e-6), CGSolver)
    with pytest.raises(ValueError, match="unknown solver"):
        SOLVERS.create("newton")
    for cls, bad in ((CGSolver, dict(tol=-1.0)), (CGSolver, dict(maxiter=0)), (CGSolver, dict(damping=float("inf"))),
                     (LissaSolver, dict(depth=0)), (ArnoldiSolver, dict(rank=0)), (KFACSolver, dict(mc_samples=0))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cls(**bad)
    with pytest.raises(ValueError, match="weight_decay"):
        LogisticRegression(weight_decay=-0.1)


def test_damping_reaches_the_solver_by_name_from_the_leaderboard(small):
    from influence.evaluation.leaderboard import estimators_for

    m, _, _ = small
    for label, est in estimators_for(m, quick=True, nonconvex=True, damping=0.3):
        if isinstance(est, InfluenceFunction) and label != "CG, Gauss-Newton":
            assert est.solver.damping == 0.3, label
    src = (REPO / "scripts" / "benchmark_estimators.py").read_text()
    assert "**" not in re.sub(r"\*\*\{", "", src.split("def main", 1)[1].split("def convex", 1)[0])


def test_scripts_are_thin_and_set_no_model_state():
    grep = subprocess.run(["git", "grep", "-n", r"\.curvature = ", "scripts"], capture_output=True, text=True, cwd=REPO)
    assert grep.stdout == ""
    for script in (REPO / "scripts").glob("*.py"):
        assert len(script.read_text().splitlines()) <= 300, script.name
    cnn = (REPO / "scripts" / "fig2_cnn_loo.py").read_text()
    assert "AutoDamping(" in cnn and "-lmin" not in cnn and "damping *= 3" not in cnn


def test_readme_is_a_front_page_whose_code_is_tested():
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 10 * 1024
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    own = text.split("## Using it on your own model", 1)[1].split("\n## ", 1)[0]
    assert blocks and all(b in own for b in blocks)  # test_packaging runs that section's code
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert (REPO / link).exists(), link

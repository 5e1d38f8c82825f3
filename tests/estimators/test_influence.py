"""Influence quantities against finite differences, leave-one-out retraining and exact math."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from influence import BinaryLogisticRegression, CGSolver, leave_one_out


def upweighted_optimum(m, i, eps):
    """argmin R(theta) + eps * (L(z_i, theta) + wd/2 ||theta||^2), solved tightly."""
    xi, yi = m.X_train_np_[i:i + 1], m.y_train_np_[i:i + 1]

    def fg(theta):
        f, g = m.objective_and_gradient(theta)
        fi = m.mean_loss(xi, yi, theta) + 0.5 * m.weight_decay * theta @ theta
        gi = m.loss_gradient(xi, yi, theta) + m.weight_decay * theta
        return f + eps * fi, g + eps * gi

    def hessp(theta, v):
        m.theta_ = theta
        try:
            Hv = m.hvp(v)
            x = xi[0]
            p = 1 / (1 + np.exp(-x @ theta))
            return Hv + eps * (x * (p * (1 - p)) * (x @ v) + m.weight_decay * v)
        finally:
            m.theta_ = theta0

    theta0 = m.theta_.copy()
    res = scipy.optimize.minimize(fg, theta0, jac=True, hessp=hessp, method="trust-ncg",
                                  options={"gtol": 1e-13, "maxiter": 200})
    assert np.linalg.norm(fg(res.x)[1]) < 1e-10
    return res.x


def test_up_params_matches_finite_difference(binary_model):
    m = binary_model
    idx = [3, 40]
    I = m.influence_up_params(idx, solver="exact")
    eps = 1e-3
    for row, i in zip(I, idx):
        fd = (upweighted_optimum(m, i, eps) - upweighted_optimum(m, i, -eps)) / (2 * eps)
        assert np.linalg.norm(row - fd) / np.linalg.norm(fd) < 1e-3


def test_up_loss_is_test_gradient_times_up_params(binary_model, binary_digits):
    m = binary_model
    _, _, Xte, yte = binary_digits
    idx = np.arange(0, 250, 25)
    up_params = m.influence_up_params(idx, solver="exact")
    g_test = m.test_gradient(Xte[0], yte[0])
    up_loss = m.influence_up_loss(Xte[0], yte[0], idx, solver="exact")
    np.testing.assert_allclose(up_loss, up_params @ g_test, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(m.predicted_loss_diffs(Xte[0], yte[0], idx, solver="exact"), -up_loss / m.n_train_)


def test_loo_prediction_correlates_with_retraining(binary_model, binary_digits):
    m = binary_model
    _, _, Xte, yte = binary_digits
    pred = m.predicted_loss_diffs(Xte[5], yte[5], solver="cg")
    idx = np.argsort(-np.abs(pred))[:30]
    res = leave_one_out(m, Xte[5], yte[5], idx, pred[idx], n_jobs=1)
    assert res.pearson >= 0.99
    assert res.spearman >= 0.9
    assert np.all(np.sign(res.actual[:5]) == np.sign(pred[idx[:5]]))  # the sign convention, not just the rank
    # the model itself is untouched by the retraining
    assert m.n_train_ == 250
    # no points: nothing to retrain, with or without a pool
    assert leave_one_out(m, Xte[5], yte[5], [], n_jobs=2).actual.shape == (0,)


def test_loo_in_process_pool_equals_serial(binary_model, binary_digits):
    m = binary_model
    _, _, Xte, yte = binary_digits
    idx = np.array([1, 2, 3])
    serial = leave_one_out(m, Xte[:2], yte[:2], idx, n_jobs=1)
    pooled = leave_one_out(m, Xte[:2], yte[:2], idx, n_jobs=2)
    np.testing.assert_allclose(pooled.actual, serial.actual, rtol=1e-6, atol=1e-10)


def test_pert_loss_matches_finite_difference_in_x(binary_model, binary_digits):
    m = binary_model
    _, _, Xte, yte = binary_digits
    s = m.s_test(Xte[1], yte[1], solver="exact").x
    idx = [7, 100]
    grads = m.influence_pert_loss(Xte[1], yte[1], idx, solver="exact")
    assert grads.shape == (2, m.n_params)

    def up_loss_at(x, y):  # -s . g(z), theta and H fixed
        return -(m.loss_gradient(x[None], np.array([y])) + m.weight_decay * m.theta_) @ s

    h = 1e-5
    for row, i in zip(grads, idx):
        x, y = m.X_train_np_[i], m.y_train_np_[i]
        fd = np.empty_like(x)
        for j in range(len(x)):
            e = np.zeros_like(x)
            e[j] = h
            fd[j] = (up_loss_at(x + e, y) - up_loss_at(x - e, y)) / (2 * h)
        np.testing.assert_allclose(row, fd, rtol=1e-5, atol=1e-8)


def test_self_influence_equals_quadratic_form(binary_model):
    m = binary_model
    idx = np.arange(20)
    G = m.per_example_gradients(idx)
    want = -np.einsum("ip,ip->i", G, np.linalg.solve(m.hessian(), G.T).T)
    np.testing.assert_allclose(m.self_influence(idx), want, rtol=1e-8)
    np.testing.assert_allclose(m.self_influence(idx, solver="cg"), want, rtol=1e-6)
    assert np.all(want < 0)


def test_s_test_cache_is_used_and_invalidated(tmp_path, binary_digits, monkeypatch):
    Xtr, ytr, Xte, yte = binary_digits
    m = BinaryLogisticRegression(weight_decay=0.01, cache_dir=str(tmp_path)).fit(Xtr, ytr)
    calls = []
    original = CGSolver._solve

    def counting(self, v):
        calls.append(1)
        return original(self, v)

    monkeypatch.setattr(CGSolver, "_solve", counting)
    a = m.s_test(Xte[0], yte[0], solver="cg")
    b = m.s_test(Xte[0], yte[0], solver="cg")
    assert len(calls) == 1 and len(list(tmp_path.glob("s_test-*.npz"))) == 1
    np.testing.assert_array_equal(a.x, b.x)
    assert b.residual == a.residual and b.solver == "cg"
    m.s_test(Xte[0], yte[0], solver="cg", tol=1e-6)  # other solver settings: new entry
    assert len(calls) == 2
    m.set_theta(m.theta_ * 1.01)  # parameters changed: the old entry must not be used
    c = m.s_test(Xte[0], yte[0], solver="cg")
    assert len(calls) == 3
    assert not np.allclose(c.x, a.x)
    m.set_training_data(Xtr[:-1], ytr[:-1])  # data changed
    m.s_test(Xte[0], yte[0], solver="cg")
    assert len(calls) == 4
    # a corrupt cache file is ignored, not trusted
    for f in tmp_path.glob("s_test-*.npz"):
        f.write_bytes(b"garbage")
    m.s_test(Xte[0], yte[0], solver="cg")
    assert len(calls) == 5


def test_bad_inputs_raise_clear_errors(binary_model, digits):
    from influence import LogisticRegression

    m = binary_model
    with pytest.raises(ValueError, match="shape"):
        BinaryLogisticRegression().fit(np.ones(10), np.ones(10))
    with pytest.raises(ValueError, match="labels must have shape"):
        BinaryLogisticRegression().fit(np.ones((10, 3)), np.ones(9))
    X = np.ones((10, 3))
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        BinaryLogisticRegression().fit(X, np.zeros(10))
    with pytest.raises(ValueError, match="0 or 1"):
        BinaryLogisticRegression().fit(np.ones((3, 2)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="example shape"):
        m.losses(np.ones((2, 5)), np.zeros(2))
    with pytest.raises(IndexError):
        m.per_example_gradients([10_000])
    with pytest.raises(ValueError, match="theta must have"):
        m.set_theta(np.ones(3))
    with pytest.raises(RuntimeError, match="call fit"):
        LogisticRegression().gradient()
    Xd, yd = digits
    with pytest.raises(ValueError, match=r"lie in \[0, 4\]"):
        LogisticRegression(n_classes=5).fit(Xd[:50], yd[:50])
    with pytest.raises(ValueError, match="explicit Hessian refused"):
        big = BinaryLogisticRegression(max_hessian_params=10)
        big.set_training_data(Xd[:20], (yd[:20] > 4).astype(int))
        big.hessian()


def test_pickle_roundtrip_keeps_state(binary_model):
    import pickle

    m2 = pickle.loads(pickle.dumps(binary_model))
    np.testing.assert_array_equal(m2.theta_, binary_model.theta_)
    assert m2.get_config() == binary_model.get_config()
    v = np.arange(binary_model.n_params, dtype=float)
    np.testing.assert_allclose(m2.hvp(v), binary_model.hvp(v), rtol=1e-14)


UNGUARDED_SCRIPT = '''
import json, sys
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from influence import leave_one_out
from influence.generic_neural_net import GenericNeuralNet, ParamBlock


class RidgeRegression(GenericNeuralNet):
    """A model class that exists only in this script (workers must get it by value)."""

    def _param_blocks(self, x_shape, y):
        return [ParamBlock("w", (x_shape[0],))]

    def _forward(self, params, x):
        return tf.linalg.matvec(x, params[0])

    def _loss(self, outputs, y):
        return 0.5 * (outputs - y) ** 2


X, y = load_digits(return_X_y=True)
X, y = X[:120] / 16.0, y[:120].astype(float)
model = RidgeRegression(weight_decay=0.1).fit(X[:100], y[:100])
idx = np.arange(4)
pooled = leave_one_out(model, X[100:103], y[100:103], idx, n_jobs=2)   # no __main__ guard on purpose
serial = leave_one_out(model, X[100:103], y[100:103], idx, n_jobs=1)
json.dump({"pooled": pooled.actual.tolist(), "serial": serial.actual.tolist()}, sys.stdout)
'''


def test_loo_pool_from_an_unguarded_script_with_its_own_model_class(tmp_path):
    """Workers must not re-run the caller's script (Python's spawn pool hung here) and must
    receive a model class defined in ``__main__``; the pooled numbers equal the serial ones."""
    from conftest import REPO

    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["pooled"]) == 4 and np.any(np.abs(out["serial"]) > 0)
    np.testing.assert_allclose(out["pooled"], out["serial"], rtol=1e-6, atol=1e-12)


def test_influence_matrix_equals_closed_form_per_test_point(binary_model, binary_digits):
    """Binary LR without bias: g_i = (sigmoid(w.x_i) - y_i) x_i + wd w,
    H = (1/n) X^T diag(p(1-p)) X + wd I; row k is -grad L(z_test_k)^T H^-1 g_i."""
    m = binary_model
    Xtr, ytr, Xte, yte = binary_digits
    w, wd = m.theta_, m.weight_decay
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    p = sig(Xtr @ w)
    H = (Xtr.T * (p * (1 - p))) @ Xtr / len(Xtr) + wd * np.eye(len(w))
    G = (p - ytr)[:, None] * Xtr + wd * w
    T = (sig(Xte[:5] @ w) - yte[:5])[:, None] * Xte[:5]
    expected = -T @ np.linalg.solve(H, G.T)
    got = m.influence_matrix(Xte[:5], yte[:5], solver="exact")
    assert got.shape == (5, len(Xtr))
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())
    # CG (one multi-column solve) and a subset of training points give the same numbers
    idx = np.array([3, 0, 249, 17])
    cg = m.influence_matrix(Xte[:5], yte[:5], indices=idx, solver="cg", tol=1e-12)
    np.testing.assert_allclose(cg, expected[:, idx], rtol=1e-7, atol=1e-9 * np.abs(expected).max())


def test_influence_matrix_rows_match_single_test_point_influence(multiclass_model, digits):
    """Each row equals influence_up_loss for that test point alone (a different code path:
    one-column solve, forward-mode scores); their mean is not what the mean test loss gives."""
    m = multiclass_model
    X, y = digits
    Xte, yte = X[400:403], y[400:403]
    M = m.influence_matrix(Xte, yte, solver="exact")
    for k in range(3):
        np.testing.assert_allclose(M[k], m.influence_up_loss(Xte[k], yte[k], solver="exact"), rtol=1e-8,
                                   atol=1e-12 * np.abs(M[k]).max())
    # the mean over test points of I_up,loss is I_up,loss of the mean test loss (linearity)
    np.testing.assert_allclose(M.mean(axis=0), m.influence_up_loss(Xte, yte, solver="exact"), rtol=1e-8,
                               atol=1e-12 * np.abs(M).max())
    with pytest.raises(ValueError):
        m.influence_matrix(Xte[:0], yte[:0])


class _OnlyInThisProcess(BinaryLogisticRegression):
    """A model that cannot be rebuilt in another process (its unpickling fails there)."""

    def __getstate__(self):
        return {**super().__getstate__(), "pid": os.getpid()}

    def __setstate__(self, state):
        if state["pid"] != os.getpid():
            raise RuntimeError("this model lives in one process only")
        super().__setstate__(state)


def test_loo_falls_back_to_this_process_when_workers_cannot_rebuild_the_model(binary_digits, caplog):
    Xtr, ytr, Xte, yte = binary_digits
    m = _OnlyInThisProcess(weight_decay=0.01).fit(Xtr[:120], ytr[:120])
    idx = np.array([0, 5, 9])
    serial = leave_one_out(m, Xte[:2], yte[:2], idx, n_jobs=1)
    with caplog.at_level("WARNING", logger="influence.refit_validation"):
        pooled = leave_one_out(m, Xte[:2], yte[:2], idx, n_jobs=2)
    assert "worker processes failed" in caplog.text and "retraining in this process" in caplog.text
    np.testing.assert_allclose(pooled.actual, serial.actual, rtol=1e-12, atol=1e-15)
    assert np.any(serial.actual != 0)


def test_influence_matrix_on_disk_in_test_chunks(multiclass_model, digits, tmp_path):
    """out=*.npy writes the same matrix, chunk by chunk, and returns it memory-mapped; a
    failure leaves no file; test_chunk gives the same numbers with smaller solves."""
    m = multiclass_model
    X, y = digits
    Xte, yte = X[400:407], y[400:407]
    idx = np.arange(0, 400, 3)
    want = m.influence_matrix(Xte, yte, indices=idx, solver="exact")
    path = tmp_path / "sub" / "influence.npy"
    got = m.influence_matrix(Xte, yte, indices=idx, solver="exact", out=path, test_chunk=3)
    assert isinstance(got, np.memmap) and not got.flags.writeable
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(np.load(path), got)
    assert [p.name for p in path.parent.iterdir()] == ["influence.npy"]  # no temporary left
    in_memory = m.influence_matrix(Xte, yte, indices=idx, solver="cg", tol=1e-12, test_chunk=2)
    np.testing.assert_allclose(in_memory, want, rtol=1e-6, atol=1e-10)
    bad = tmp_path / "bad.npy"
    with pytest.raises(ValueError, match="damping"):  # fails inside the write
        m.influence_matrix(Xte, yte, indices=idx, solver="exact", out=bad, damping=float("nan"))
    assert not bad.exists() and not any(p.name.startswith(".bad") for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=".npy"):
        m.influence_matrix(Xte, yte, out=tmp_path / "x.csv")
    with pytest.raises(ValueError, match="test_chunk"):
        m.influence_matrix(Xte, yte, test_chunk=0)


def test_linear_datamodeling_score_against_direct_refits(binary_model, binary_digits):
    """LDS: each subset's actual change is a direct re-fit without it, the prediction is
    the sum of -I/n over it; exact influence ranks the subsets well, permuted influence not."""
    from influence import linear_datamodeling_score, retrain_test_losses

    m = binary_model
    _, _, Xte, yte = binary_digits
    Xq, yq = Xte[:4], yte[:4]
    infl = m.influence_matrix(Xq, yq, solver="exact")
    res = linear_datamodeling_score(m, Xq, yq, infl, n_subsets=12, fraction=0.1, seed=3, n_jobs=1)
    assert res.removed.shape == (12, 25) and res.actual.shape == res.predicted.shape == (12, 4)
    assert all(len(set(r)) == 25 for r in res.removed)
    j = 5
    theta = m.retrain_without(res.removed[j])
    np.testing.assert_allclose(res.actual[j], m.losses(Xq, yq, theta) - m.losses(Xq, yq), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(res.predicted[j], -infl[:, res.removed[j]].sum(axis=1) / m.n_train_, rtol=1e-12)
    assert res.score > 0.8 and res.per_test.shape == (4,)
    shuffled = np.random.default_rng(0).permutation(infl.T).T  # each test point's scores, shuffled
    worse = linear_datamodeling_score(m, Xq, yq, shuffled, n_subsets=12, fraction=0.1, seed=3, n_jobs=1)
    np.testing.assert_array_equal(worse.actual, res.actual)  # same seed, same subsets
    assert worse.score < res.score - 0.3
    # several estimators on the same re-fits: the same scores as separate calls
    both = linear_datamodeling_score(m, Xq, yq, {"exact": infl, "shuffled": shuffled}, n_subsets=12,
                                     fraction=0.1, seed=3, n_jobs=1)
    assert both["exact"].score == res.score and both["shuffled"].score == worse.score
    # a slow estimator joins on some of the test points without a re-fit: the same numbers
    part = worse.rescored(infl[[0, 2]], m.n_train_, tests=[0, 2])
    np.testing.assert_array_equal(part.actual, res.actual[:, [0, 2]])
    np.testing.assert_allclose(part.per_test, res.per_test[[0, 2]], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.rescored(shuffled, m.n_train_).predicted, worse.predicted, rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        res.rescored(infl[:2], m.n_train_)
    with pytest.raises(ValueError, match="shuffled"):
        linear_datamodeling_score(m, Xq, yq, {"exact": infl, "shuffled": shuffled[:, :3]})
    # the pool gives the serial numbers; bad inputs are refused
    pooled = retrain_test_losses(m, list(res.removed[:3]), Xq, yq, n_jobs=2)
    np.testing.assert_allclose(pooled - m.losses(Xq, yq), res.actual[:3], rtol=1e-6, atol=1e-10)
    with pytest.raises(ValueError, match="shape"):
        linear_datamodeling_score(m, Xq, yq, infl[:, :10])
    with pytest.raises(ValueError, match="fraction"):
        linear_datamodeling_score(m, Xq, yq, infl, fraction=1.0)
    with pytest.raises(ValueError, match="NaN"):
        linear_datamodeling_score(m, Xq, yq, infl * np.nan)


def test_most_influential_names_helpful_and_harmful_by_retraining(binary_model, binary_digits):
    """The ranking's sign convention checked against re-fits: removing the listed helpful
    points raises the test loss, removing the harmful ones lowers it, by the predicted amounts."""
    m = binary_model
    _, _, Xte, yte = binary_digits
    x, y = Xte[5], yte[5]
    r = m.most_influential(x, y, k=4, solver="exact")
    change = m.predicted_loss_diffs(x, y, solver="exact")
    np.testing.assert_array_equal(r.helpful, np.argsort(-change)[:4])
    np.testing.assert_array_equal(r.harmful, np.argsort(change)[:4])
    assert np.all(r.helpful_change > 0) and np.all(np.diff(r.helpful_change) <= 0)
    assert np.all(r.harmful_change < 0) and np.all(np.diff(r.harmful_change) >= 0)
    for points, predicted in ((r.helpful, r.helpful_change), (r.harmful, r.harmful_change)):
        actual = leave_one_out(m, x, y, points, n_jobs=1).actual
        assert np.all(np.sign(actual) == np.sign(predicted))
        np.testing.assert_allclose(actual, predicted, rtol=0.3)  # first order: the largest is 21% off
    # a subset of indices: positions map back to training indices
    sub = np.arange(100, 200)
    rs = m.most_influential(x, y, k=3, indices=sub, solver="exact")
    np.testing.assert_array_equal(rs.helpful, sub[np.argsort(-change[sub])[:3]])
    with pytest.raises(ValueError, match="k must"):
        m.most_influential(x, y, k=0)


def test_influence_matrix_resumes_after_a_failure(multiclass_model, digits, tmp_path, monkeypatch):
    """resume=True: a run that fails after its first test chunk keeps its rows and a
    checkpoint; the next call solves only the missing chunks and gives the same matrix."""
    m = multiclass_model.clone()
    m.set_training_data(multiclass_model.X_train_np_, multiclass_model.y_train_np_).set_theta(multiclass_model.theta_)
    X, y = digits
    Xte, yte = X[400:407], y[400:407]
    idx = np.arange(0, 400, 5)
    want = m.influence_matrix(Xte, yte, indices=idx, solver="exact")
    path = tmp_path / "I.npy"
    solves = []
    from influence import InfluenceFunction

    real = InfluenceFunction.inverse_hvp

    def failing_after_one(self, v):
        if solves:
            raise RuntimeError("interrupted")
        solves.append(v.shape[1])
        return real(self, v)

    monkeypatch.setattr(InfluenceFunction, "inverse_hvp", failing_after_one)
    with pytest.raises(RuntimeError, match="interrupted"):
        m.influence_matrix(Xte, yte, indices=idx, solver="exact", out=path, test_chunk=3, resume=True)
    assert not path.exists()
    assert (tmp_path / "I.npy.partial.npy").is_file() and (tmp_path / "I.npy.partial.json").is_file()

    def counting(self, v):
        solves.append(v.shape[1])
        return real(self, v)

    monkeypatch.setattr(InfluenceFunction, "inverse_hvp", counting)
    got = m.influence_matrix(Xte, yte, indices=idx, solver="exact", out=path, test_chunk=3, resume=True)
    assert solves == [3, 3, 1]  # the first chunk was not solved again
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["I.npy"]
    # another computation (different test points) never reuses a stale checkpoint
    solves.clear()
    monkeypatch.setattr(InfluenceFunction, "inverse_hvp", failing_after_one)
    with pytest.raises(RuntimeError):
        m.influence_matrix(Xte[:6], yte[:6], indices=idx, solver="exact", out=path, test_chunk=3, resume=True)
    monkeypatch.setattr(InfluenceFunction, "inverse_hvp", counting)
    solves.clear()
    other = m.influence_matrix(Xte[1:7], yte[1:7], indices=idx, solver="exact", out=path, test_chunk=3, resume=True)
    assert solves == [3, 3]
    np.testing.assert_allclose(other, want[1:7], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="resume=True needs out"):
        m.influence_matrix(Xte, yte, resume=True)

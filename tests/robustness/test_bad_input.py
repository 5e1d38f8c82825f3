"""No silent wrong answers: every case here returned a wrong number with exit code 0, or a
library-internal traceback, before; now it raises, warns with the number, or recomputes."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from influence import BinaryLogisticRegression, CGSolver, LogisticRegression, leave_one_out


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def fitted(digits):
    X, y = digits
    return LogisticRegression(weight_decay=0.01).fit(X[:200], y[:200]), X, y


# ---------------------------------------------------------------- resumable influence matrices
@pytest.mark.parametrize("damage", ["truncated", "overwritten", "header"])
def test_a_damaged_partial_matrix_is_recomputed_not_trusted(fitted, tmp_path, monkeypatch, caplog, damage):
    from influence import InfluenceFunction

    m, X, y = fitted
    Xte, yte = X[300:306], y[300:306]
    want = m.influence_matrix(Xte, yte, solver="exact")
    path = tmp_path / "I.npy"
    real = InfluenceFunction.inverse_hvp
    calls = []

    def failing_third(self, v):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return real(self, v)

    monkeypatch.setattr(InfluenceFunction, "inverse_hvp", failing_third)
    with pytest.raises(RuntimeError):
        m.influence_matrix(Xte, yte, solver="exact", out=path, test_chunk=2, resume=True)
    monkeypatch.setattr(InfluenceFunction, "inverse_hvp", real)
    partial = tmp_path / "I.npy.partial.npy"
    raw = partial.read_bytes()
    header = len(raw) - 6 * m.n_train_ * 8
    if damage == "truncated":  # header intact, rows of the finished chunks cut off
        partial.write_bytes(raw[:header + 3 * m.n_train_ * 8])
    elif damage == "overwritten":  # same size, a finished chunk's rows replaced
        partial.write_bytes(raw[:header] + b"\0" * (2 * m.n_train_ * 8) + raw[header + 2 * m.n_train_ * 8:])
    else:  # the header itself cut
        partial.write_bytes(raw[:20])
    with caplog.at_level(logging.WARNING, logger="influence.result_store"):
        got = m.influence_matrix(Xte, yte, solver="exact", out=path, test_chunk=2, resume=True)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert str(partial) in caplog.text or "set aside" in caplog.text
    if damage == "header":
        assert any(p.name.startswith("I.npy.partial.npy.unusable-") for p in tmp_path.iterdir())  # kept, renamed


# ---------------------------------------------------------------- identities of cached results
def test_frozen_keras_weights_are_part_of_the_cache_identity(tmp_path, digits):
    import keras

    from influence import KerasModel

    X, y = digits
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((64,), dtype="float64"), keras.layers.Dense(8, activation="tanh",
                                                                                  dtype="float64", name="body"),
                            keras.layers.Dense(10, dtype="float64", name="head")])
    a = KerasModel(net, loss="softmax", trainable=["head"], weight_decay=0.01, cache_dir=str(tmp_path))
    a.set_training_data(X[:100], y[:100])
    s_a = a.s_test(X[200], y[200], solver="cg").x
    body = net.get_layer("body")
    body.kernel.assign(body.kernel.numpy() * 1.5)  # change the frozen layer, keep the head
    b = KerasModel(net, loss="softmax", trainable=["head"], weight_decay=0.01, cache_dir=str(tmp_path))
    b.set_training_data(X[:100], y[:100])
    np.testing.assert_array_equal(a.theta_, b.theta_)
    s_b = b.s_test(X[200], y[200], solver="cg").x
    fresh = b.s_test(X[200], y[200], solver="cg", use_cache=False).x
    assert rel(s_b, fresh) < 1e-12 and rel(s_b, s_a) > 1e-3


# ---------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize("value", [-0.01, float("nan"), float("inf")])
def test_weight_decay_is_validated(value):
    with pytest.raises(ValueError, match="weight_decay"):
        BinaryLogisticRegression(weight_decay=value)


@pytest.mark.parametrize("opts, name", [({"tol": -1.0}, "tol"), ({"tol": float("nan")}, "tol"),
                                        ({"maxiter": -1}, "maxiter"), ({"maxiter": 0}, "maxiter"),
                                        ({"damping": float("inf")}, "damping"), ({"damping": -1e-3}, "damping")])
def test_cg_options_are_validated_before_any_work(fitted, opts, name):
    m, X, y = fitted
    with pytest.raises(ValueError, match=name):
        CGSolver(**opts)
    with pytest.raises(ValueError, match=name):
        m.s_test(X[300], y[300], solver="cg", **opts)


def test_a_fit_that_stops_short_of_the_optimum_says_so(digits, caplog):
    from influence.generic_neural_net import NotStationaryError

    X, y = digits
    with caplog.at_level(logging.WARNING):
        m = LogisticRegression(weight_decay=0.01, max_iter=3, polish=False).fit(X[:200], y[:200])
    assert m.grad_norm_ > 1e-3 and "not a stationary point" in caplog.text and f"{m.grad_norm_:.3g}" in caplog.text
    assert m.s_test(X[300], y[300]).info["gradient_norm"] == m.grad_norm_  # recorded in every result
    with pytest.raises(NotStationaryError, match="gradient norm"):
        LogisticRegression(weight_decay=0.01, max_iter=3, polish=False, nonstationary="raise").fit(X[:200], y[:200])


def test_one_class_training_set_is_refused(digits):
    X, _ = digits
    with pytest.raises(ValueError, match="n_classes >= 2"):
        LogisticRegression().fit(X[:50], np.zeros(50, dtype=int))
    with pytest.raises(ValueError, match="n_classes"):
        LogisticRegression(n_classes=1)


def test_leave_one_out_without_test_points_is_refused(fitted):
    m, X, y = fitted
    with pytest.raises(ValueError, match="no test points"):
        leave_one_out(m, X[:0], y[:0], [0, 1])


def test_a_hand_edited_journal_record_is_re_fitted(fitted, tmp_path, caplog):
    m, X, y = fitted
    Xte, yte = X[300:303], y[300:303]
    journal = tmp_path / "refits.jsonl"
    first = leave_one_out(m, Xte, yte, [0, 1], n_jobs=1, journal=journal)
    lines = journal.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["record"] = entry["record"][:1]  # shortened: once broadcast across the test points
    journal.write_text("\n".join([json.dumps(entry)] + lines[1:]) + "\n")
    with caplog.at_level(logging.WARNING):
        again = leave_one_out(m, Xte, yte, [0, 1], n_jobs=1, journal=journal)
    assert "re-fitting it" in caplog.text
    np.testing.assert_allclose(again.actual, first.actual, rtol=1e-9, atol=1e-12)


def test_a_dogfish_cache_corrupted_in_place_is_not_reused(tmp_path, caplog):
    from helpers.archives import make_dogfish_tar
    from influence.datasets.dogfish import load_dogfish

    (tmp_path / "data" / "dogfish").mkdir(parents=True)
    make_dogfish_tar(tmp_path / "data" / "dogfish" / "imagenette_tench_springer.tar")
    d = load_dogfish(tmp_path / "data", n_train=3, n_test=2, side=11, seed=5, cache_dir=tmp_path / "cache")
    ypath = tmp_path / "cache" / f"dogfish-{d.key}" / "y_train.npy"
    raw = bytearray(ypath.read_bytes())
    raw[-1] = 1  # same size, a label of 72057594037927936 + ...
    ypath.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        again = load_dogfish(tmp_path / "data", n_train=3, n_test=2, side=11, seed=5, cache_dir=tmp_path / "cache")
    assert "ignoring unusable cache" in caplog.text
    np.testing.assert_array_equal(again.y_train, d.y_train)


# ---------------------------------------------------------------- clear messages, model left as it was
def test_a_failed_fit_leaves_the_model_as_it_was(digits):
    X, y = digits
    m = LogisticRegression(weight_decay=0.01)
    with pytest.raises(ValueError, match="labels must have shape"):
        m.fit(X[:100], y[:99][y[:99] < 9][:90])  # builds a 9-class layout, then fails on the shapes
    assert not m._built and m.n_classes is None
    m.fit(X[:100], y[:100])
    assert m.n_classes == 10


@pytest.mark.parametrize("case", ["nan_labels", "empty", "complex", "huge"])
def test_bad_training_data_gets_a_clear_message(digits, case):
    X, y = digits
    if case == "nan_labels":
        yy = y[:50].astype(float)
        yy[3] = np.nan
        with pytest.raises(ValueError, match="labels"):
            LogisticRegression().fit(X[:50], yy)
    elif case == "empty":
        with pytest.raises(ValueError, match="training set is empty"):
            LogisticRegression().fit(X[:0], y[:0])
    elif case == "complex":
        with pytest.raises(ValueError, match="real-valued"):
            LogisticRegression().fit(X[:50] + 1j, y[:50])
    else:
        with pytest.raises(FloatingPointError, match="scale the features"):
            BinaryLogisticRegression(weight_decay=0.01).fit(X[:50] * 1e308, (y[:50] > 4).astype(int))


def test_influence_before_fit_says_call_fit(digits):
    X, y = digits
    with pytest.raises(RuntimeError, match="call fit"):
        LogisticRegression().most_influential(X[:1], y[:1])


def test_an_unwritable_cache_dir_keeps_the_finished_solve(fitted, tmp_path, caplog):
    m, X, y = fitted
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    cached = LogisticRegression(**{**m.get_config(), "cache_dir": str(blocker / "cache")})
    cached.set_training_data(m.X_train_np_, m.y_train_np_).set_theta(m.theta_)
    with caplog.at_level(logging.WARNING):
        res = cached.s_test(X[300], y[300], solver="cg")
    assert "s_test not cached" in caplog.text and res.converged


# ---------------------------------------------------------------- data errors and scripts
def test_weights_errors_are_data_errors():
    from inception.model import WeightsError, WeightsMissingError
    from influence.datasets.manifest import DataError, DataMissingError

    assert issubclass(WeightsError, DataError) and issubclass(WeightsMissingError, DataMissingError)


def test_verify_names_every_bad_file(tmp_path):
    from influence.datasets.manifest import DataError, MANIFEST, verify

    folder = tmp_path / MANIFEST["mnist"].folder
    folder.mkdir(parents=True)
    files = MANIFEST["mnist"].files
    for f in files[:2]:
        (folder / f.name).write_bytes(b"corrupt")
    with pytest.raises(DataError) as err:
        verify("mnist", tmp_path)
    msg = str(err.value)
    assert all(f.name in msg for f in files)  # the two corrupt ones and the missing ones


@pytest.mark.parametrize("argv, what", [(["--test-idx", "-1"], "not an index"), (["--test-idx", "999999"], "not an index"),
                                        (["--out", "FILE"], "is a file"), (["--out", "FILE/sub"], "cannot be written")])
def test_bad_arguments_are_refused_before_any_work(tmp_path, argv, what):
    (tmp_path / "FILE").write_text("x")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "fig2_logreg_loo.py"), "--quick",
                           "--data-dir", str(tmp_path / "none"), *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and what in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_data_unchanged_in_size_and_mtime_but_not_content_is_not_up_to_date(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import reproduce_all

    (tmp_path / "mnist").mkdir()
    f = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    f.write_bytes(b"a" * 100)
    script = REPO / "scripts" / "demo_digits.py"
    hashes = {}
    key = reproduce_all.run_key(script, [], ["mnist"], str(tmp_path), hashes)
    st = f.stat()
    f.write_bytes(b"b" * 100)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored
    assert reproduce_all.run_key(script, [], ["mnist"], str(tmp_path), hashes) != key
    assert reproduce_all.run_key(script, [], ["mnist"], str(tmp_path), hashes) == \
        reproduce_all.run_key(script, [], ["mnist"], str(tmp_path), {})  # the cache never changes the answer


# ---------------------------------------------------------------- a Keras model written the Keras way
def test_softmax_outputs_are_refused_and_logits_model_gives_the_logits(digits):
    import keras

    from influence import KerasModel
    from influence.models.keras_model import logits_model

    X, y = digits
    keras.utils.set_random_seed(0)
    probs = keras.Sequential([keras.Input((64,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(10, activation="softmax")])
    with pytest.raises(ValueError, match="applied twice"):
        KerasModel(probs, loss="softmax")
    custom = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10), keras.layers.Lambda(keras.ops.softmax)])
    with pytest.raises(ValueError, match="rows sum to 1"):
        KerasModel(custom, loss="softmax").set_training_data(X[:50], y[:50])
    logits = KerasModel(logits_model(probs), loss="softmax").set_training_data(X[:100], y[:100])
    keras_loss = float(keras.losses.SparseCategoricalCrossentropy()(y[:100], probs(X[:100])))
    assert logits.objective() == pytest.approx(keras_loss, rel=1e-5)  # no weight decay: the same objective
    assert final_activation_unchanged(probs)


def final_activation_unchanged(net):
    return net.layers[-1].activation.__name__ == "softmax"


def test_regression_targets_shaped_n_by_1_equal_n(digits):
    import keras
    from sklearn.datasets import load_diabetes

    from influence import KerasModel

    X, y = load_diabetes(return_X_y=True)
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((10,), dtype="float64"), keras.layers.Dense(1, dtype="float64")])
    a = KerasModel(net, loss="squared", weight_decay=1e-3).set_training_data(X[:100], y[:100, None])
    b = KerasModel(net, loss="squared", weight_decay=1e-3).set_training_data(X[:100], y[:100])
    assert a.objective() == pytest.approx(b.objective(), rel=1e-12, abs=1e-10)
    sa = a.s_test(X[200:203], y[200:203, None], solver="exact").x
    sb = b.s_test(X[200:203], y[200:203], solver="exact").x
    assert np.max(np.abs(sa - sb)) <= 1e-10 * max(1.0, np.max(np.abs(sb)))
    np.testing.assert_allclose(a.gradient_dots(sa), b.gradient_dots(sb), rtol=1e-10, atol=1e-10)
    wide = keras.Sequential([keras.Input((10,), dtype="float64"), keras.layers.Dense(2, dtype="float64")])
    with pytest.raises(ValueError, match="do not match the model's outputs"):
        KerasModel(wide, loss="squared").set_training_data(X[:100], y[:100])


def test_perturbation_influence_on_integer_tokens_fails_before_any_solve(monkeypatch):
    import keras

    from influence import InfluenceFunction, KerasModel

    rng = np.random.default_rng(0)
    X, y = rng.integers(0, 20, (40, 6)), rng.integers(0, 2, 40)
    net = keras.Sequential([keras.Input((6,), dtype="int32"), keras.layers.Embedding(20, 4),
                            keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    m = KerasModel(net, loss="softmax", weight_decay=1e-2).set_training_data(X, y)
    monkeypatch.setattr(InfluenceFunction, "inverse_hvp", lambda self, v: pytest.fail("solved first"))
    with pytest.raises(ValueError, match="no gradient with respect"):
        m.influence_pert_loss(X[:1], y[:1], [0, 1])


def test_a_failed_cg_solve_raises_unless_the_caller_keeps_it(binary_model):
    from helpers.indefinite import NegativeDecayLogistic
    from influence import SolveFailedError

    m = binary_model
    lmin = np.linalg.eigvalsh(m.hessian())[0]
    neg = NegativeDecayLogistic(weight_decay=-(lmin + 0.5))
    neg.set_training_data(m.X_train_np_, m.y_train_np_).set_theta(m.theta_)
    v = np.random.default_rng(0).standard_normal(m.n_params)
    with pytest.raises(SolveFailedError, match="negative curvature") as err:
        neg.inverse_hvp(v, "cg")
    assert err.value.result.info["negative_curvature"] and err.value.result.residual > 1e-3
    kept = neg.inverse_hvp(v, "cg", on_failure="warn")
    assert kept.info["negative_curvature"] and not kept.converged
    with pytest.raises(SolveFailedError, match="stopped after 2 iterations"):
        m.inverse_hvp(v, "cg", maxiter=2)


def test_cg_tolerance_defaults_to_what_float32_can_reach(digits):
    import keras

    from influence import KerasModel

    X, y = digits
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])  # float32, Keras's default
    m = KerasModel(net, loss="softmax", weight_decay=1e-2).set_training_data(X[:200].astype("float32"), y[:200])
    res = m.s_test(X[300], y[300], solver="cg")
    assert m.dtype == "float32" and res.info["tol"] == 1e-5 and res.converged and res.residual <= 1e-4


def test_float32_networks_run_every_solver_and_a_mismatched_dtype_is_refused(digits):
    import keras

    from influence import KerasModel

    X, y = digits
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(10)])
    with pytest.raises(ValueError, match="compute in float32"):
        KerasModel(net, loss="softmax", dtype="float64")
    m = KerasModel(net, loss="softmax", weight_decay=1e-2).set_training_data(X[:150].astype("float32"), y[:150])
    for name, opts in [("exact", {"damping": 1.0}), ("cg", {"damping": 1.0}), ("cg", {"curvature": "gauss-newton"}),
                       ("lissa", {"scale": "auto", "depth": 50, "damping": 1.0}), ("arnoldi", {"rank": 10}),
                       ("kfac", {"damping": 0.1}), ("ekfac", {"damping": 0.1})]:
        res = m.s_test(X[200], y[200], solver=name, use_cache=False, **opts)
        assert np.all(np.isfinite(res.x)) and res.x.shape == (m.n_params,), name
        if name in ("exact", "cg"):
            assert res.converged, (name, opts)

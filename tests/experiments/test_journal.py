"""Journals of long runs: re-fits and attacked targets recorded as they finish, resumed later."""
import json

import numpy as np
import pytest

from conftest import REPO, shared_data_dir
from influence import leave_one_out
from influence.refit_validation import retrain_test_losses
from influence.result_store import Journal

DATA = shared_data_dir()
needs_mnist = pytest.mark.skipif(DATA is None or not (DATA / "mnist").is_dir(), reason="MNIST not in the data directory")
WEIGHTS = DATA / "inception" / "inception_v3_2015_12_05_notop_keras_order.npz" if DATA else None
needs_weights = pytest.mark.skipif(WEIGHTS is None or not WEIGHTS.is_file(),
                                   reason="Inception v3 weights not in the data directory")


def test_journal_round_trip_ignores_other_settings_and_torn_lines(tmp_path):
    path = tmp_path / "run.jsonl"
    book = Journal(path, {"a": 1})
    book.add("x", {"v": [1.5, 2.0]}, arrays={"img": np.arange(6).reshape(2, 3)})
    book.add(7, [3.0])
    other = Journal(path, {"a": 2})  # other settings: nothing of the first run applies
    assert len(other) == 0 and "x" not in other
    other.add("x", {"v": [9.0]})
    with open(path, "a") as f:  # a run killed mid-line
        f.write('{"key": "' + book.key + '", "name": "torn", "rec')
    again = Journal(path, {"a": 1})
    assert len(again) == 2 and again.get("x") == {"v": [1.5, 2.0]} and again.get("7") == [3.0]
    assert "torn" not in again
    np.testing.assert_array_equal(again.arrays("x")["img"], np.arange(6).reshape(2, 3))
    assert again.arrays("7") is None
    again.add("y", 1)  # written on a fresh line after the torn one
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["name"] == "y"
    assert Journal(path, {"a": 1}).get("y") == 1 and Journal(path, {"a": 2}).get("x") == {"v": [9.0]}


class CountingRefits:
    """Counts the re-fits a model makes (and can forbid them)."""

    def __init__(self, model, monkeypatch, forbid=False):
        self.calls = []
        original = model.retrain_without

        def retrain_without(indices):
            if forbid:
                raise AssertionError(f"re-fit without {list(indices)} should have come from the journal")
            self.calls.append(sorted(np.atleast_1d(indices).tolist()))
            return original(indices)

        monkeypatch.setattr(model, "retrain_without", retrain_without)


def test_refit_journal_resumes_only_missing_refits(binary_model, binary_digits, tmp_path, monkeypatch):
    _, _, Xte, yte = binary_digits
    xt, yt = Xte[:3], yte[:3]
    groups = [[0], [5, 9], [17], [2, 3, 4]]
    path = tmp_path / "refits.jsonl"
    plain = retrain_test_losses(binary_model, groups, xt, yt, n_jobs=1)
    with monkeypatch.context() as m:
        count = CountingRefits(binary_model, m)
        first = retrain_test_losses(binary_model, groups[:2], xt, yt, n_jobs=1, journal=path)
        assert len(count.calls) == 2
    np.testing.assert_allclose(first, plain[:2], rtol=0, atol=1e-12)
    with monkeypatch.context() as m:  # a later run of all four: only the two not recorded are re-fitted
        count = CountingRefits(binary_model, m)
        both = retrain_test_losses(binary_model, groups, xt, yt, n_jobs=1, journal=path)
        assert count.calls == [[17], [2, 3, 4]]
    np.testing.assert_allclose(both, plain, rtol=0, atol=1e-12)
    with monkeypatch.context() as m:  # everything recorded: no re-fit at all, same numbers
        CountingRefits(binary_model, m, forbid=True)
        np.testing.assert_array_equal(retrain_test_losses(binary_model, groups[::-1], xt, yt, n_jobs=1,
                                                          journal=path), both[::-1])
    # other test points or another theta: the recorded re-fits do not apply
    with monkeypatch.context() as m:
        count = CountingRefits(binary_model, m)
        retrain_test_losses(binary_model, groups[:1], Xte[3:5], yte[3:5], n_jobs=1, journal=path)
        assert count.calls == [[0]]
    shifted = binary_model.clone().fit(*binary_digits[:2])
    shifted.set_theta(shifted.theta_ + 1e-3)
    with monkeypatch.context() as m:
        count = CountingRefits(shifted, m)
        retrain_test_losses(shifted, groups[:1], xt, yt, n_jobs=1, journal=path)
        assert count.calls == [[0]]


def test_loo_with_control_through_the_journal(binary_model, binary_digits, tmp_path, monkeypatch):
    _, _, Xte, yte = binary_digits
    idx = np.array([3, 40, 77])
    path = tmp_path / "loo.jsonl"
    ref = leave_one_out(binary_model, Xte[:1], yte[:1], idx, control=True, n_jobs=1)
    first = leave_one_out(binary_model, Xte[:1], yte[:1], idx, control=True, n_jobs=1, journal=path)
    assert len(Journal(path, None)) == 0  # other settings see nothing
    with monkeypatch.context() as m:
        CountingRefits(binary_model, m, forbid=True)
        again = leave_one_out(binary_model, Xte[:1], yte[:1], idx, control=True, n_jobs=1, journal=path)
    for res in (first, again):
        np.testing.assert_allclose(res.actual, ref.actual, rtol=0, atol=1e-12)
        assert res.info["control_test_loss"] == pytest.approx(ref.info["control_test_loss"], abs=1e-12)
    # the control is a re-fit on all points, recorded like the others (4 lines: control + 3)
    assert len(path.read_text().splitlines()) == 4


def _fig2_quick_command(tmp_path):
    import sys

    out = tmp_path / "fig2_cnn_loo"
    return out, [sys.executable, str(REPO / "scripts" / "fig2_cnn_loo.py"), "--quick", "--data-dir", str(DATA),
                 "--out", str(out), "--n-train", "120", "--adam-steps", "20", "--retrain-steps", "3",
                 "--num-remove", "3", "--no-kfac", "--jobs", "1"]


@needs_mnist
def test_fig2_cnn_loo_resumes_from_its_journals(tmp_path):
    """A second run of the same command restores the fit and every re-fit from the first's
    journals (no training: the log says so) and writes the same metrics."""
    import subprocess
    import sys

    data = DATA
    out, cmd = _fig2_quick_command(tmp_path)
    runs = []
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((proc.stderr, json.loads((out / "metrics.json").read_text())["metrics"]))
    assert "fit restored" not in runs[0][0] and "fit restored" in runs[1][0]
    assert "re-fits: 4 of 4 recorded" in runs[1][0]
    assert "Adam:" in runs[0][0] and "Adam:" not in runs[1][0]  # the training bar: only the first run trains
    for key in ("pearson", "spearman", "train_objective", "control_drift", "damping_used", "hessian_min_eig"):
        assert runs[1][1][key] == runs[0][1][key], key
    assert len((out / "refits.jsonl").read_text().splitlines()) == 4  # control + 3, nothing added
    # the K-FAC benchmark's CNN rows alone, on this stored run
    bench = tmp_path / "cnn_kfac"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_influence.py"), "--cnn-kfac-only",
                           "--data-dir", str(data), "--cnn-loo", str(out), "--cnn-cg-tests", "1", "--out", str(bench)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (bench / "BENCHMARK.md").read_text()
    assert "ekfac: score all 120 points for 100 test points" in text and "CG (damping" in text
    assert "LOO Pearson on the 3 stored re-fits" in text
    diag = next(line for line in text.splitlines() if "span of H's top 20 eigenvectors" in line)
    assert all(k in diag for k in ("CG (stored)", "kfac", "ekfac")), diag
    assert "EK-FAC's LOO Pearson as its damping grows" in text


@pytest.mark.slow
@needs_mnist
def test_leaderboard_cnn_rows_on_a_stored_fig2_run(tmp_path):
    """The leaderboard's CNN rows on a stored (quick) Fig 2 CNN run: LOO from its re-fits, the
    LDS of every estimator (CG on H and G included) from re-fits that continue the recorded fit,
    journaled so that a second run re-fits nothing."""
    import subprocess
    import sys

    data = DATA
    out, cmd = _fig2_quick_command(tmp_path)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = tmp_path / "board"
    replays = []
    for i in range(2):  # the second run re-scores every estimator on the journaled re-fits
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_estimators.py"), "--quick",
                               "--models", "cnn", "--data-dir", str(data), "--outputs", str(tmp_path), "--out",
                               str(board), "--lds-tests", "3", "--lds-subsets", "4", "--jobs", "1"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        replays.append("running the figure's fit again" in proc.stderr)
    assert replays == [True, False]  # TracIn's checkpoints: the fit is replayed once, then read from its journal
    assert "re-fits: 4 of 4 recorded" in proc.stderr
    replay = json.loads((board / "cnn_tracin_checkpoints.jsonl").read_text().splitlines()[0])["record"]
    assert replay["max_abs_theta_diff"] < 1e-10  # same configuration, data and seed: the figure's own fit
    rows = json.loads((board / "metrics.json").read_text())["metrics"]
    assert np.isfinite(rows["cnn.EK-FAC.lds"]) and np.isfinite(rows["cnn.EK-FAC.loo_pearson"])
    assert np.isfinite(rows["cnn.TracIn (checkpoints).lds"]) and np.isfinite(rows["cnn.Arnoldi rank 50, fill = wd.lds"])
    # CG on H and on G: LOO from the figure's solves, LDS from new (Gauss-Newton-preconditioned) solves
    assert np.isfinite(rows["cnn.CG (the figure's solve).loo_pearson"])
    assert np.isfinite(rows["cnn.CG (the figure's solve).lds"])
    assert np.isfinite(rows["cnn.CG, Gauss-Newton (the figure's solve).lds"])
    assert "LDS: 3 test points over 4 re-fits" in (board / "ESTIMATORS.md").read_text()


@needs_weights
def test_fig5_partial_runs_add_up_through_the_journal(tmp_path):
    """Decile 1 alone, then both deciles: the second run attacks only decile 2's target; a
    third identical run attacks nothing and writes the same rates."""
    import os
    import subprocess
    import sys

    from test_dogfish_original import make_original_npz

    shared = DATA
    data = tmp_path / "data"
    (data / "dogfish").mkdir(parents=True)
    (data / "inception").symlink_to((shared / "inception").resolve())
    make_original_npz(data / "dogfish" / "dataset_dog-fish_train-900_test-300.npz", n_train=(5, 5), n_test=(3, 3))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "fig5"
    cmd = [sys.executable, str(REPO / "scripts" / "fig5_training_set_attack.py"), "--data-dir", str(data), "--quick",
           "--n-train", "5", "--n-test", "3", "--deciles", "2", "--per-decile", "1", "--max-iter", "2",
           "--least-confident", "0", "--sweep-targets", "0", "--no-second-alone", "--out", str(out)]
    metrics = []
    for extra in (["--only-deciles", "1"], [], []):
        proc = subprocess.run(cmd + extra, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics.append(json.loads((out / "metrics.json").read_text())["metrics"])
    assert [(m["attacks_run"], m["attacks_reused"]) for m in metrics] == [(2, 0), (2, 2), (0, 4)]
    assert [m["rankings_run"] for m in metrics] == [1, 1, 0]  # each target's candidates are ranked once
    assert metrics[0]["estimate_covers_deciles"] == [1] and metrics[1]["estimate_covers_deciles"] == [1, 2]
    first = metrics[0]["flip_rates_by_decile"][0]
    assert metrics[1]["flip_rates_by_decile"][0] == first
    for key in ("flip_rate_1", "flip_rate_2", "flip_rates_by_decile", "max_abs_pixel_change"):
        assert metrics[2][key] == metrics[1][key], key
    assert (out / "fig5_training_set_attack.png").is_file()
    # the figure's example lost its stored images: its attack is repeated once and its images kept
    stored = sorted(out.glob("attacks-*.npz"))
    assert stored
    for f in stored:
        f.unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "metrics.json").read_text())["metrics"]
    assert (again["attacks_run"], again["attacks_reused"]) == (0, 4)
    assert len(list(out.glob("attacks-*.npz"))) >= 1  # each attack that became the example on the way, again
    for key in ("flip_rate_1", "flip_rate_2", "flip_rates_by_decile"):
        assert again[key] == metrics[1][key], key

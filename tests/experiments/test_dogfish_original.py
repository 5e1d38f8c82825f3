"""The original release's dog-fish npz (loader, checks, use by Figs 4 and 5) and the
confidence-stratified target sampler of the Fig 5 attack."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, shared_data_dir

DATA = shared_data_dir()
WEIGHTS = DATA / "inception" / "inception_v3_2015_12_05_notop_keras_order.npz" if DATA else None
needs_weights = pytest.mark.skipif(WEIGHTS is None or not WEIGHTS.is_file(), reason="Inception weights not present")


def make_original_npz(path, n_train=(4, 3), n_test=(2, 2), side=299, flat=False, seed=0, **override):
    """A file in the original release's layout: pixels u -> (u / 255 - 0.5) * 2, label 0 = dog."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, counts in (("train", n_train), ("test", n_test)):
        y = np.concatenate([np.full(c, label) for label, c in enumerate(counts)])
        u = rng.integers(0, 256, (len(y), side, side, 3)).astype(np.uint8)
        X = ((u / 255.0 - 0.5) * 2).astype(np.float32)
        arrays[f"X_{split}"] = X.reshape(len(y), -1) if flat else X
        arrays[f"Y_{split}"] = y
        arrays[f"_u_{split}"] = u
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if not k.startswith("_")})
    return arrays


def test_original_npz_loads_back_to_the_8bit_pixels(tmp_path):
    from influence.datasets.dogfish import SOURCE_ORIGINAL, load_original_dogfish

    for flat in (False, True):
        path = tmp_path / f"orig{flat}.npz"
        arrays = make_original_npz(path, side=13, flat=flat)
        d = load_original_dogfish(path, side=13)
        assert d.source == SOURCE_ORIGINAL and d.X_train.dtype == np.uint8 and d.X_train.shape == (7, 13, 13, 3)
        np.testing.assert_array_equal(d.X_train, arrays["_u_train"])  # exact: u = (x + 1) * 127.5
        np.testing.assert_array_equal(d.X_test, arrays["_u_test"])
        np.testing.assert_array_equal(d.y_train, [0, 0, 0, 0, 1, 1, 1])
    sub = load_original_dogfish(path, n_train=2, n_test=1, seed=3, side=13)
    assert sorted(sub.y_train.tolist()) == [0, 0, 1, 1] and sorted(sub.y_test.tolist()) == [0, 1]
    rows = [int(n.split(":")[-1]) for n in sub.names_train]
    np.testing.assert_array_equal(sub.X_train, arrays["_u_train"][rows])


def test_original_npz_rejects_wrong_shape_range_labels_and_keys(tmp_path):
    from influence.datasets.manifest import DataError
    from influence.datasets.dogfish import load_original_dogfish

    cases = {
        "shape": ({"X_train": np.zeros((7, 12, 13, 3), np.float32)}, r"shape \(7, 12, 13, 3\)"),
        "range": ({"X_test": np.full((4, 13, 13, 3), 2.0, np.float32)}, r"ranges over \[2, 2\]"),
        "labels": ({"Y_train": np.array([0, 1, 2, 0, 1, 1, 0])}, r"labels \[2\] outside \{0, 1\}"),
        "count": ({"Y_test": np.array([0, 1, 1])}, "3 labels for 4 images"),
        "dtype": ({"X_train": np.zeros((7, 13, 13, 3), np.uint8)}, "dtype uint8"),
    }
    for name, (override, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        make_original_npz(path, side=13, **override)
        with pytest.raises(DataError, match=message):
            load_original_dogfish(path, side=13)
    path = tmp_path / "keys.npz"
    np.savez(path, X_train=np.zeros((1, 13, 13, 3)), Y_train=np.zeros(1))
    with pytest.raises(DataError, match=r"lacks the arrays \['X_test', 'Y_test'\]"):
        load_original_dogfish(path, side=13)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="unreadable"):
        load_original_dogfish(tmp_path / "junk.npz", side=13)
    path = tmp_path / "ok.npz"
    make_original_npz(path, side=13)  # 4 dogs and 3 fish for training
    with pytest.raises(DataError, match="holds 3 fish images, fewer than the 4 requested"):
        load_original_dogfish(path, n_train=4, side=13)


def test_stratified_sampler_draws_per_decile_from_the_candidates_only():
    from influence.applications.attack import stratified_targets

    rng = np.random.default_rng(0)
    margins = rng.normal(3, 4, 500)
    correct = np.flatnonzero(margins > 0)  # "correctly classified": positive log-odds of the true label
    st = stratified_targets(margins, correct, n_strata=10, per_stratum=7, seed=1)
    assert len(st.targets) == 70 and len(np.unique(st.targets)) == 70
    assert set(st.targets.tolist()) <= set(correct.tolist())
    np.testing.assert_array_equal(np.bincount(st.stratum), np.full(10, 7))
    assert st.sizes.sum() == len(correct) and st.sizes.max() - st.sizes.min() <= 1
    ranked = np.sort(margins[correct])
    edges = np.cumsum(st.sizes)
    for s in range(10):  # each target's margin lies in its decile's range, the deciles in order
        m = margins[st.targets[st.stratum == s]]
        assert np.all((m >= st.lows[s]) & (m <= st.highs[s]))
        assert st.lows[s] == ranked[edges[s] - st.sizes[s]] and st.highs[s] == ranked[edges[s] - 1]
    assert np.all(st.highs[:-1] <= st.lows[1:])
    again = stratified_targets(margins, correct, 10, 7, seed=1)
    np.testing.assert_array_equal(again.targets, st.targets)
    assert not np.array_equal(stratified_targets(margins, correct, 10, 7, seed=2).targets, st.targets)
    part = stratified_targets(margins, correct, 10, 7, seed=1, strata=[0, 3])  # a partial run: same draws
    np.testing.assert_array_equal(part.targets, np.concatenate([st.targets[st.stratum == 0],
                                                                st.targets[st.stratum == 3]]))
    # the reweighted estimate: each decile's rate weighted by its size
    flags = margins[st.targets] < np.median(margins[correct])
    rates = st.rates(flags)
    assert st.estimate(flags) == pytest.approx(np.sum(rates * st.sizes) / st.sizes.sum())
    np.testing.assert_allclose(rates[:5], 1.0)
    np.testing.assert_allclose(rates[5:], 0.0)
    small = stratified_targets(margins, correct[:25], n_strata=10, per_stratum=7, seed=0)  # groups of 2-3
    np.testing.assert_array_equal(np.bincount(small.stratum), small.sizes)
    with pytest.raises(ValueError, match="cannot fill"):
        stratified_targets(margins, correct[:5], n_strata=10)
    with pytest.raises(ValueError, match="strata must lie"):
        stratified_targets(margins, correct, 10, 7, strata=[10])


@needs_weights
def test_figs_4_and_5_use_and_record_the_original_file(tmp_path):
    """With the original npz in <data>/dogfish/, both scripts run on it and say so."""
    data = tmp_path / "data"
    (data / "dogfish").mkdir(parents=True)
    (data / "inception").symlink_to((DATA / "inception").resolve())
    make_original_npz(data / "dogfish" / "dataset_dog-fish_train-900_test-300.npz", n_train=(5, 5),
                      n_test=(3, 3))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    common = ["--data-dir", str(data), "--quick", "--n-train", "5", "--n-test", "3"]
    runs = {"fig4_inception_vs_rbf": [],
            "fig5_training_set_attack": ["--deciles", "1", "--per-decile", "1", "--max-iter", "1",
                                         "--least-confident", "0", "--sweep-targets", "0", "--no-second-alone"]}
    for name, extra in runs.items():
        out = tmp_path / name
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *common, *extra, "--out",
                               str(out)], capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = json.loads((out / "metrics.json").read_text())
        assert m["config"]["data_source"].startswith("original release"), m["config"]
    m5 = json.loads((tmp_path / "fig5_training_set_attack" / "metrics.json").read_text())
    assert m5["metrics"]["data_source"].startswith("original release")
    assert m5["config"]["step_input_units"] == pytest.approx(0.1 * 2 / 255)  # a level is 2/255 in its units
    assert m5["metrics"]["max_abs_pixel_change"] <= 0.5
    assert m5["metrics"]["flip_rates_by_decile"][0]["n"] == 1

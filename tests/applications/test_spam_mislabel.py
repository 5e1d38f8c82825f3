"""Spam loader on a generated archive, closed-form self-influence, and the flip/fix bookkeeping."""
import io
import tarfile

import numpy as np
import pytest

from conftest import shared_data_dir
from influence import BinaryLogisticRegression
from influence.datasets.manifest import DataError
from influence.applications.mislabel import check_order, fix_checked, flip_labels, run_repeat
from influence.datasets.spam import load_spam, read_emails

HAM = ["Meeting moved to Monday, please bring the gas nomination reports.",
       "Attached are the revised volumes for the pipeline meetings.",
       "Please review the contract and send comments before Friday."]
SPAM = ["Cheap meds online!!! Click here to buy viagra now, limited offer.",
        "You have WON a free prize, claim your money today.",
        "Buy cheap software now, best prices, click here."]


def write_archive(path, n_copies=4, extra=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        def add(name, text):
            data = text.encode("latin-1")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for k in range(n_copies):
            for i, t in enumerate(HAM):
                add(f"enron1/ham/{k:02d}{i}.ham.txt", f"Subject: re {k}\n{t} caf\xe9")
            for i, t in enumerate(SPAM):
                add(f"enron1/spam/{k:02d}{i}.spam.txt", f"Subject: offer {k}\n{t}")
        add("enron1/Summary.txt", "not an email")
        for name, text in (extra or {}).items():
            add(name, text)


def test_loader_on_generated_archive(tmp_path):
    write_archive(tmp_path / "spam" / "enron1.tar.gz")
    texts, labels, names = read_emails(tmp_path)
    assert len(texts) == 24 and labels.sum() == 12 and "café" in texts[0]
    assert all(n.endswith(".txt") and ("/ham/" in n or "/spam/" in n) for n in names)
    d = load_spam(tmp_path, n_train=18, min_df=2, cache_dir=tmp_path / "cache")
    assert d.X_train.shape[0] == 18 and d.X_test.shape[0] == 6
    assert d.X_train.shape[1] == len(d.vocabulary) > 0
    assert "click" in d.vocabulary and "the" not in d.vocabulary  # stop words dropped
    assert all(w.isalpha() and w == w.lower() for w in d.vocabulary)
    if "lemmas" in d.info["tokenizer"]:
        assert "meeting" in d.vocabulary and "meetings" not in d.vocabulary
    cached = load_spam(tmp_path, n_train=18, min_df=2, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(cached.X_train, d.X_train)
    assert len(list((tmp_path / "cache").glob("spam-*.npz"))) == 1
    # another split reuses the cached tokens and equals a featurisation without any cache
    assert len(list((tmp_path / "cache").glob("enron1-tokens-*.npz"))) == 1
    other = load_spam(tmp_path, seed=1, n_train=18, min_df=2, cache_dir=tmp_path / "cache")
    fresh = load_spam(tmp_path, seed=1, n_train=18, min_df=2)
    np.testing.assert_array_equal(other.X_train, fresh.X_train)
    np.testing.assert_array_equal(other.y_test, fresh.y_test)
    assert other.vocabulary == fresh.vocabulary
    assert not np.array_equal(other.y_train, d.y_train) or not np.array_equal(other.X_train, d.X_train)


def test_loader_rejects_corrupt_or_missing_archive(tmp_path):
    with pytest.raises(DataError, match="missing data file.*fetch spam"):
        read_emails(tmp_path)
    write_archive(tmp_path / "spam" / "enron1.tar.gz")
    raw = (tmp_path / "spam" / "enron1.tar.gz").read_bytes()
    (tmp_path / "spam" / "enron1.tar.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_emails(tmp_path)


@pytest.mark.skipif(shared_data_dir() is None, reason="real Enron1 archive not present (set INFLUENCE_DATA_DIR)")
def test_real_enron1_counts():
    texts, labels, _ = read_emails(shared_data_dir())
    assert len(texts) == 5172 and int(labels.sum()) == 1500 and int((labels == 0).sum()) == 3672


def test_closed_form_self_influence_equals_generic(binary_model):
    m = binary_model
    closed = m.self_influence_closed_form()
    generic = m.self_influence(solver="exact", include_regularizer=False)
    np.testing.assert_allclose(closed, generic, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(m.self_influence_closed_form([3, 7]), closed[[3, 7]])


def test_flip_and_fix_bookkeeping():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    y_noisy, flipped = flip_labels(y, 0.1, rng)
    assert len(flipped) == 20 and np.all(y_noisy[flipped] != y[flipped])
    assert np.array_equal(np.flatnonzero(y_noisy != y), flipped)
    checked = np.concatenate([flipped[:7], np.setdiff1d(np.arange(200), flipped)[:30]])
    y_fixed, n_fixed = fix_checked(y_noisy, y, checked)
    assert n_fixed == 7
    np.testing.assert_array_equal(y_fixed[checked], y[checked])  # exactly the checked labels restored
    unchecked = np.setdiff1d(np.arange(200), checked)
    np.testing.assert_array_equal(y_fixed[unchecked], y_noisy[unchecked])  # nothing else touched
    assert np.sum(y_fixed != y) == 13


def test_check_orders_and_repeat(binary_digits):
    Xtr, ytr, Xte, yte = binary_digits
    m = BinaryLogisticRegression(weight_decay=0.01).fit(Xtr, ytr)
    rng = np.random.default_rng(0)
    inf = check_order(m, "influence", rng)
    assert np.all(np.diff(np.abs(m.self_influence_closed_form())[inf]) <= 0)
    assert np.all(np.diff(m.train_losses()[check_order(m, "loss", rng)]) <= 1e-15)
    assert sorted(check_order(m, "random", rng)) == list(range(len(ytr)))
    with pytest.raises(ValueError):
        check_order(m, "oracle", rng)
    r = run_repeat(Xtr, ytr, Xte, yte, seed=1, flip_fraction=0.1, check_fractions=[0.0, 0.2, 1.0],
                   weight_decay=0.01)
    assert r["fraction_fixed"].shape == (3, 3)
    np.testing.assert_array_equal(r["fraction_fixed"][:, 0], 0)
    np.testing.assert_allclose(r["fraction_fixed"][:, 2], 1)  # checking everything fixes every flip
    assert np.all(r["test_accuracy"][:, 0] == r["test_accuracy_noisy"])
    # flipped points have high loss: both informed strategies beat random at 20% checked
    assert r["fraction_fixed"][0, 1] > r["fraction_fixed"][2, 1] and r["fraction_fixed"][1, 1] > r["fraction_fixed"][2, 1]


def test_sparse_fast_fit_matches_library_fit(binary_digits):
    import scipy.sparse

    from influence.models.logistic import fit_binary_logistic

    Xtr, ytr, _, _ = binary_digits
    m = BinaryLogisticRegression(weight_decay=0.01).fit(Xtr, ytr)
    w = fit_binary_logistic(scipy.sparse.csr_matrix(Xtr), ytr, 0.01, tol=1e-10)
    np.testing.assert_allclose(w, m.theta_, rtol=1e-5, atol=1e-6)
    w_dense = fit_binary_logistic(Xtr, ytr, 0.01, theta0=m.theta_ * 0.5, tol=1e-10)
    np.testing.assert_allclose(w_dense, m.theta_, rtol=1e-5, atol=1e-6)


def test_repeat_jobs_over_splits_equal_serial_dense_runs(binary_digits):
    """Jobs on different splits, sparse inputs, a thread pool: same results as one dense repeat each."""
    from concurrent.futures import ThreadPoolExecutor

    import scipy.sparse

    from influence.applications.mislabel import run_repeat_jobs

    Xtr, ytr, Xte, yte = binary_digits
    X, y = np.vstack([Xtr, Xte]), np.concatenate([ytr, yte])
    splits = []
    for k in range(2):
        perm = np.random.default_rng(k).permutation(len(y))
        tr, te = perm[:len(ytr)], perm[len(ytr):]
        splits.append((X[tr], y[tr], X[te], y[te]))
    fr = [0.0, 0.1, 0.3]
    jobs = [(scipy.sparse.csr_matrix(a), b, scipy.sparse.csr_matrix(c), d, seed)
            for (a, b, c, d), seed in zip(splits + splits[:1], (3, 4, 5))]
    with ThreadPoolExecutor(2) as pool:
        got = run_repeat_jobs(jobs, 0.1, fr, 0.01, executor=pool)
    for r, ((a, b, c, d), seed) in zip(got, zip(splits + splits[:1], (3, 4, 5))):
        ref = run_repeat(a, b, c, d, seed, 0.1, fr, 0.01)
        assert r["seed"] == seed
        np.testing.assert_array_equal(r["fraction_fixed"], ref["fraction_fixed"])
        np.testing.assert_array_equal(r["test_accuracy"], ref["test_accuracy"])

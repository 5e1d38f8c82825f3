import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers for the tests in every subfolder


def shared_data_dir() -> Path | None:
    """The real data directory, if one is configured or sits beside the checkout."""
    for cand in (os.environ.get("INFLUENCE_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled 8x8 digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


@pytest.fixture(scope="session")
def binary_digits(digits):
    """Digits 1 vs 7 (labels 0/1), split 250 train / rest test."""
    X, y = digits
    keep = (y == 1) | (y == 7)
    X, y = X[keep], (y[keep] == 7).astype(int)
    return X[:250], y[:250], X[250:], y[250:]


@pytest.fixture(scope="session")
def multiclass_model(digits):
    from influence import LogisticRegression

    X, y = digits
    return LogisticRegression(weight_decay=0.01).fit(X[:400], y[:400])


@pytest.fixture(scope="session")
def binary_model(binary_digits):
    from influence import BinaryLogisticRegression

    Xtr, ytr, _, _ = binary_digits
    return BinaryLogisticRegression(weight_decay=0.01).fit(Xtr, ytr)


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def multiclass_hessian_closed_form(X, W, wd):
    """(1/n) sum_i kron(x_i x_i^T, diag(p_i) - p_i p_i^T) + wd I for row-major vec(W)."""
    P = softmax(X @ W)
    n, d = X.shape
    k = W.shape[1]
    H = np.zeros((d * k, d * k))
    for i in range(n):
        A = np.diag(P[i]) - np.outer(P[i], P[i])
        H += np.kron(np.outer(X[i], X[i]), A)
    return H / n + wd * np.eye(d * k)


def fit_tiny_cnn(**overrides):
    """A 3-class AllCNN (two 2-channel convs) fitted to 24 random 8x8 images, batches of 7."""
    from influence import AllCNN

    rng = np.random.default_rng(0)
    X = rng.random((24, 8, 8, 1))
    y = rng.integers(0, 3, 24)
    cfg = dict(n_classes=3, channels=(2, 2), strides=(1, 2), weight_decay=0.01, learning_rate=0.01,
               train_batch_size=8, batch_size=7)
    return AllCNN(**{**cfg, **overrides}).fit(X, y)

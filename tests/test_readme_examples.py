"""The README's Python examples run as written, on scikit-learn's digits (the names they leave
to the reader, X_train / y_train / x_test / y_test, are bound to a small split first), and
what they print is checked."""
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_its_examples():
    blocks = python_blocks()
    assert len(blocks) >= 2 and "LogisticRegression" in blocks[0] and "KerasModel" in blocks[1]


@pytest.mark.parametrize("k", [0, 1])
def test_readme_example_runs(digits, k, capsys):
    X, y = digits
    namespace = {"X_train": X[:200].astype(np.float64), "y_train": y[:200], "x_test": X[400], "y_test": y[400]}
    if k == 1:  # the Keras example: float32 inputs as Keras gives them
        namespace["X_train"] = namespace["X_train"].astype(np.float32)
        namespace["x_test"] = namespace["x_test"].astype(np.float32)
        import keras

        keras.utils.set_random_seed(0)
    exec(compile(python_blocks()[k], f"README.md example {k + 1}", "exec"), namespace)
    if k == 0:
        loo = namespace["loo"]
        assert loo.pearson > 0.9, loo.pearson  # a convex model: influence predicts the re-fits
        ranked = namespace["ranked"]
        assert len(ranked.helpful) == 5 and len(ranked.harmful) == 5
    else:
        assert namespace["scores"].shape == (5, 200)
        assert np.all(np.isfinite(namespace["kpred"]))
        assert np.isfinite(namespace["kloo"].pearson)

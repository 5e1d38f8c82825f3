"""The hospital readmission loader on small generated tables (and the real file when present)."""
import zipfile

import numpy as np
import pandas as pd
import pytest

from conftest import shared_data_dir
from influence.datasets.manifest import DataError
from influence.datasets.hospital import (CATEGORIES, CHILD_FEATURE, NUMERIC, encode, feature_names, load_hospital, read_raw,
                                remove_rows)


def synthetic_table(n=60, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cols = {"encounter_id": [str(i) for i in range(n)], "patient_nbr": [str(i) for i in range(n)]}
    for c in NUMERIC:
        cols[c] = [str(v) for v in rng.integers(0, 20, n)]
    for c, cats in CATEGORIES.items():
        cols[c] = list(rng.choice(cats, n))
    cols["weight"] = ["?"] * n
    cols["readmitted"] = list(rng.choice(["NO", ">30", "<30"], n, p=[0.4, 0.3, 0.3]))
    return pd.DataFrame(cols)


def write_zip(folder, df, name="dataset_diabetes/diabetic_data.csv"):
    (folder / "hospital").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "hospital" / "dataset_diabetes.zip", "w") as zf:
        zf.writestr("__MACOSX/dataset_diabetes/._diabetic_data.csv", b"junk")
        zf.writestr(name, df.to_csv(index=False))


def test_feature_count_and_one_hot_columns():
    names = feature_names()
    assert len(names) == 127
    assert names[:8] == NUMERIC
    df = pd.DataFrame({**{c: ["3", "5"] for c in NUMERIC},
                       **{c: [cats[0], cats[-1]] for c, cats in CATEGORIES.items()}})
    df.loc[1, "age"] = "[0-10)"
    df.loc[0, "age"] = "[90-100)"
    X = encode(df)
    assert X.shape == (2, 127)
    np.testing.assert_array_equal(X[:, :8], [[3.0] * 8, [5.0] * 8])
    child = names.index(CHILD_FEATURE)
    assert X[:, child].tolist() == [0.0, 1.0]
    assert X[:, names.index("age=[90-100)")].tolist() == [1.0, 0.0]
    # a two-category column keeps one indicator, of its second category
    assert "change=No" not in names and X[:, names.index("change=Ch")].tolist() == [0.0, 1.0]
    assert X[:, names.index("diabetesMed=Yes")].tolist() == [0.0, 1.0]
    # every other categorical row has exactly one indicator set per column
    for c, cats in CATEGORIES.items():
        if len(cats) != 2:
            cols = [names.index(f"{c}={v}") for v in cats]
            np.testing.assert_array_equal(X[:, cols].sum(axis=1), [1.0, 1.0])


def test_loader_reads_zip_and_splits(tmp_path):
    df = synthetic_table(200)
    write_zip(tmp_path, df)
    raw = read_raw(tmp_path)
    assert raw.shape == df.shape
    d = load_hospital(tmp_path, n_per_class=20, seed=3)
    assert d.X_train.shape == (40, 127) and d.y_train.sum() == 20
    assert len(d.y_test) == 160 and set(d.train_rows) | set(d.test_rows) == set(range(200))
    assert np.array_equal(d.y_train, (df["readmitted"].to_numpy()[d.train_rows] == "<30").astype(int))
    d2 = load_hospital(tmp_path, n_per_class=20, seed=3)
    np.testing.assert_array_equal(d.train_rows, d2.train_rows)


def test_remove_rows_removes_exactly_the_requested():
    X = np.arange(30, dtype=float).reshape(10, 3)
    y = np.arange(10)
    cands = np.array([1, 4, 6, 8])
    X2, y2, keep, removed = remove_rows(X, y, cands, 3, seed=0)
    assert len(removed) == 3 and set(removed) <= set(cands)
    assert len(y2) == 7 and not set(removed) & set(y2.tolist())
    np.testing.assert_array_equal(X2, X[keep])
    with pytest.raises(ValueError, match="cannot remove"):
        remove_rows(X, y, cands, 5, seed=0)


def test_loader_errors(tmp_path):
    with pytest.raises(DataError, match="missing data file.*fetch hospital"):
        read_raw(tmp_path)
    df = synthetic_table(20)
    write_zip(tmp_path / "a", df.drop(columns=["insulin"]))
    with pytest.raises(DataError, match="lacks column.*insulin"):
        load_hospital(tmp_path / "a", n_per_class=2)
    bad = df.copy()
    bad.loc[3, "race"] = "Martian"
    write_zip(tmp_path / "b", bad)
    with pytest.raises(DataError, match="unknown value.*Martian"):
        load_hospital(tmp_path / "b", n_per_class=2)
    bad = df.copy()
    bad.loc[2, "num_medications"] = "many"
    write_zip(tmp_path / "c", bad)
    with pytest.raises(DataError, match="non-numeric"):
        load_hospital(tmp_path / "c", n_per_class=2)
    (tmp_path / "d" / "hospital").mkdir(parents=True)
    text = df.to_csv(index=False).splitlines()
    text[5] += ",extra,fields"
    (tmp_path / "d" / "hospital" / "diabetic_data.csv").write_text("\n".join(text))
    with pytest.raises(DataError, match="malformed row"):
        read_raw(tmp_path / "d")
    (tmp_path / "e" / "hospital").mkdir(parents=True)
    (tmp_path / "e" / "hospital" / "dataset_diabetes.zip").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="corrupt"):
        read_raw(tmp_path / "e")


@pytest.mark.skipif(shared_data_dir() is None, reason="real hospital data not present (set INFLUENCE_DATA_DIR)")
def test_real_hospital_file():
    raw = read_raw(shared_data_dir())
    assert raw.shape == (101766, 50)
    assert raw["readmitted"].value_counts().to_dict() == {"NO": 54864, ">30": 35545, "<30": 11357}
    X = encode(raw)
    assert X.shape == (101766, 127) and np.all(np.isfinite(X))

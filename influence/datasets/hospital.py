"""UCI "Diabetes 130-US hospitals 1999-2008" (Strack et al. 2014) for the paper's Sec. 5.3.

Reads ``dataset_diabetes/diabetic_data.csv`` straight from ``hospital/dataset_diabetes.zip``
in the data directory (or a plain ``diabetic_data.csv`` there), 101,766 rows x 50 columns.

Features (127, as the paper): the 8 numeric columns (:data:`NUMERIC`) as they are, plus a
one-hot encoding of 31 categorical columns (:data:`CATEGORIES`): demographics (race,
gender, age bucket), the discharge disposition, the two lab results, the 23 medication
columns, ``change`` and ``diabetesMed``. A column with two categories keeps one indicator
(of its second category); every other column one indicator per category. The identifiers
(encounter, patient), columns that are mostly missing or have hundreds of codes (weight,
payer code, medical specialty, diagnoses 1-3) and the admission type and source ids are
left out; this choice reproduces the paper's count of 127. The category lists are fixed:
a value outside them is an error, not a silent new column.

Label: 1 if ``readmitted`` is ``<30`` (readmitted within 30 days), else 0.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import numpy as np

from .manifest import DataError, DataMissingError, fetch_hint, resolve_data_dir

NUMERIC = ["time_in_hospital", "num_lab_procedures", "num_procedures", "num_medications", "number_outpatient",
           "number_emergency", "number_inpatient", "number_diagnoses"]
_MED4 = ["No", "Steady", "Up", "Down"]
_MED2 = ["No", "Steady"]
CATEGORIES: dict[str, list[str]] = {
    "race": ["Caucasian", "AfricanAmerican", "?", "Other", "Asian", "Hispanic"],
    "gender": ["Female", "Male", "Unknown/Invalid"],
    "age": [f"[{a}-{a + 10})" for a in range(0, 100, 10)],
    "discharge_disposition_id": [str(i) for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,
                                                  19, 20, 22, 23, 24, 25, 27, 28)],
    "max_glu_serum": ["None", "Norm", ">200", ">300"],
    "A1Cresult": ["None", "Norm", ">7", ">8"],
    **{m: _MED4 for m in ["metformin", "repaglinide", "nateglinide", "chlorpropamide", "glimepiride", "glipizide",
                          "glyburide", "pioglitazone", "rosiglitazone", "acarbose", "miglitol", "insulin",
                          "glyburide-metformin"]},
    "tolazamide": ["No", "Steady", "Up"],
    **{m: _MED2 for m in ["acetohexamide", "tolbutamide", "troglitazone", "glipizide-metformin",
                          "glimepiride-pioglitazone", "metformin-rosiglitazone", "metformin-pioglitazone"]},
    "examide": ["No"],
    "citoglipton": ["No"],
    "change": ["No", "Ch"],
    "diabetesMed": ["No", "Yes"],
}
LABEL = "readmitted"
LABEL_VALUES = ("NO", ">30", "<30")
CHILD_FEATURE = "age=[0-10)"


def feature_names() -> list[str]:
    """The 127 column names, in order: numeric first, then the indicators."""
    names = list(NUMERIC)
    for col, cats in CATEGORIES.items():
        names += [f"{col}={cats[1]}"] if len(cats) == 2 else [f"{col}={c}" for c in cats]
    return names


def encode(df) -> np.ndarray:
    """Features of a DataFrame of raw string columns (see the module docstring)."""
    missing = [c for c in NUMERIC + list(CATEGORIES) if c not in df.columns]
    if missing:
        raise DataError(f"hospital data lacks column(s) {missing}")
    blocks = []
    for col in NUMERIC:
        try:
            blocks.append(df[col].astype(np.float64).to_numpy()[:, None])
        except (ValueError, TypeError) as exc:
            raise DataError(f"column {col!r} has a non-numeric value ({exc})") from exc
    for col, cats in CATEGORIES.items():
        values = df[col].to_numpy()
        unknown = sorted(set(values) - set(cats))
        if unknown:
            raise DataError(f"column {col!r} has unknown value(s) {unknown[:5]}; known: {cats}")
        use = cats[1:2] if len(cats) == 2 else cats
        blocks.append(np.stack([(values == c) for c in use], axis=1).astype(np.float64))
    return np.concatenate(blocks, axis=1)


def read_raw(data_dir=None):
    """The raw table as strings (101,766 x 50), from the zip or a plain CSV."""
    import pandas as pd

    root = resolve_data_dir(data_dir)
    folder = root / "hospital"
    zpath, cpath = folder / "dataset_diabetes.zip", folder / "diabetic_data.csv"
    try:
        if cpath.is_file():
            raw = cpath.read_bytes()
        elif zpath.is_file():
            with zipfile.ZipFile(zpath) as zf:
                names = [n for n in zf.namelist() if n.endswith("diabetic_data.csv") and "__MACOSX" not in n]
                if not names:
                    raise DataError(f"{zpath} holds no diabetic_data.csv")
                raw = zf.read(names[0])
        else:
            raise DataMissingError(f"missing data file {zpath} (or {cpath}). " + fetch_hint("hospital", root))
    except zipfile.BadZipFile as exc:
        raise DataError(f"{zpath} is not a readable zip file ({exc}); it is corrupt or truncated. "
                        + fetch_hint("hospital", root)) from exc
    try:
        df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, on_bad_lines="error")
    except pd.errors.ParserError as exc:
        raise DataError(f"malformed row in the hospital CSV: {exc}") from exc
    if LABEL not in df.columns:
        raise DataError(f"hospital data lacks the label column {LABEL!r}")
    bad = sorted(set(df[LABEL]) - set(LABEL_VALUES))
    if bad:
        raise DataError(f"column 'readmitted' has unknown value(s) {bad[:5]}")
    return df


@dataclass
class HospitalData:
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    train_rows: np.ndarray  # row numbers in the CSV
    test_rows: np.ndarray
    feature_names: list


def load_hospital(data_dir=None, n_per_class: int = 10000, seed: int = 0, df=None) -> HospitalData:
    """Balanced training set (``n_per_class`` readmitted and not, seeded); the rest is test."""
    df = read_raw(data_dir) if df is None else df
    X = encode(df)
    y = (df[LABEL].to_numpy() == "<30").astype(np.int64)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) < n_per_class or len(neg) < n_per_class:
        raise ValueError(f"need {n_per_class} rows per class, have {len(pos)} readmitted and {len(neg)} not")
    train = np.sort(np.concatenate([rng.choice(pos, n_per_class, replace=False),
                                    rng.choice(neg, n_per_class, replace=False)]))
    test = np.setdiff1d(np.arange(len(y)), train)
    return HospitalData(X[train], y[train], X[test], y[test], train, test, feature_names())


def remove_rows(X: np.ndarray, y: np.ndarray, candidates: np.ndarray, n_remove: int, seed: int):
    """Drop ``n_remove`` of the ``candidates`` rows (seeded); return X, y, kept index, removed index."""
    candidates = np.asarray(candidates)
    if n_remove > len(candidates):
        raise ValueError(f"cannot remove {n_remove} of {len(candidates)} candidate rows")
    removed = np.sort(np.random.default_rng(seed).choice(candidates, n_remove, replace=False))
    keep = np.setdiff1d(np.arange(len(y)), removed)
    return X[keep], y[keep], keep, removed

"""MNIST loader with the paper's split.

The four standard IDX files are read from ``<data_dir>/mnist/``. As in the original
code, the first 5,000 training images form a validation set, leaving 55,000 training and
10,000 test images. Pixels are scaled to [0, 1]; images are flattened to 784 values unless
``flatten=False``.
"""
from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass

import numpy as np

from .manifest import MANIFEST, DataError, dataset_path, fetch_hint, file_checksum, resolve_data_dir

logger = logging.getLogger(__name__)

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
N_VALIDATION = 5000


@dataclass
class Split:
    """Inputs ``x`` and integer labels ``y`` of one part of a dataset."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx) -> "Split":
        return Split(self.x[idx], self.y[idx])


@dataclass
class DataSplits:
    train: Split
    validation: Split
    test: Split


def read_idx(path: os.PathLike, expected_magic: int) -> np.ndarray:
    """Parse a gzipped IDX file (big-endian header: magic, dims; then uint8 data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} is not a readable gzip file ({exc}); it is corrupt or truncated.") from exc
    if len(raw) < 8:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[0:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: magic number {magic}, expected {expected_magic}; not an MNIST IDX file of this kind")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims))
    if len(raw) != header + size:
        raise DataError(f"{path}: header says shape {dims} ({size} bytes) but the data has {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(data_dir=None, flatten: bool = True, verify: bool = True, dtype=np.float32) -> DataSplits:
    """Load MNIST with the paper's 55,000 / 5,000 / 10,000 train / validation / test split.

    ``verify`` checks the decompressed bytes of each file against the manifest's SHA-256.
    Raises :class:`~influence.datasets.manifest.DataError` for missing or corrupt files.
    """
    root = resolve_data_dir(data_dir)
    arrays = {}
    for f in MANIFEST["mnist"].files:
        path = dataset_path("mnist", f.name, root)
        magic = IMAGE_MAGIC if "images" in f.name else LABEL_MAGIC
        try:
            arr = read_idx(path, magic)
        except DataError as exc:
            if type(exc) is DataError and "influence.datasets fetch" not in str(exc):
                raise DataError(f"{exc} " + fetch_hint("mnist", root)) from exc
            raise
        if verify and file_checksum(path, "gz") != f.sha256:
            raise DataError(f"{path} does not match the MNIST checksum: corrupt or modified. " + fetch_hint("mnist", root))
        arrays[f.name.split("-")[0] + ("_x" if magic == IMAGE_MAGIC else "_y")] = arr
    train_x, train_y = arrays["train_x"], arrays["train_y"]
    test_x, test_y = arrays["t10k_x"], arrays["t10k_y"]
    if train_x.shape != (60000, 28, 28) or train_y.shape != (60000,) or test_x.shape != (10000, 28, 28) or test_y.shape != (10000,):
        raise DataError(f"unexpected MNIST shapes: train {train_x.shape}/{train_y.shape}, test {test_x.shape}/{test_y.shape}")

    def prep(x):
        x = x.astype(dtype) / 255.0
        return x.reshape(len(x), -1) if flatten else x[..., None]

    return DataSplits(
        train=Split(prep(train_x[N_VALIDATION:]), train_y[N_VALIDATION:].astype(np.int64)),
        validation=Split(prep(train_x[:N_VALIDATION]), train_y[:N_VALIDATION].astype(np.int64)),
        test=Split(prep(test_x), test_y.astype(np.int64)),
    )


def binary_subset(split: Split, pos_class: int, neg_class: int, signed: bool) -> Split:
    """The examples of two classes; label 1 (or +1) for ``pos_class``, 0 (or -1) for ``neg_class``."""
    keep = (split.y == pos_class) | (split.y == neg_class)
    y = (split.y[keep] == pos_class).astype(np.int64)
    return Split(split.x[keep], 2 * y - 1 if signed else y)


def load_binary_mnist(data_dir=None, pos_class: int = 1, neg_class: int = 7, signed: bool = False,
                      **kwargs) -> DataSplits:
    """MNIST restricted to two digits (default 1 vs 7, the paper's Fig 1 and Fig 3 task).

    Labels are {0, 1} for logistic regression, or {-1, +1} with ``signed=True`` for the SVM;
    ``pos_class`` gets label 1 / +1. Order within each split follows the paper's split.
    """
    d = load_mnist(data_dir, **kwargs)
    return DataSplits(*(binary_subset(s, pos_class, neg_class, signed) for s in (d.train, d.validation, d.test)))

"""Shared set-up of the dog-vs-fish experiments (Figs 4 and 5): images, network, features."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from influence.datasets.manifest import DataMissingError, resolve_data_dir
from influence.datasets.dogfish import DogFishData, load_dogfish, load_original_dogfish, original_path

from .features import cached_features
from .model import DEFAULT_WEIGHTS, ORIGINAL_UNITS, load_inception, weights_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class DogFishFeatures:
    data: DogFishData
    feature_model: object  # Keras model, pixels -> 2048 features
    preprocessing: object  # inception.model.Preprocessing
    F_train: np.ndarray  # (n_train, 2048) float64
    F_test: np.ndarray
    weights: str

    @property
    def source(self) -> str:
        """Which images: the original release's npz or the stand-in (see influence.datasets.dogfish)."""
        return self.data.source


def prepare_dogfish(data_dir=None, cache_dir=None, n_train: int = 900, n_test: int = 300, seed: int = 0,
                    weights=None, progress: bool = True, source: str = "auto") -> DogFishFeatures:
    """Images (uint8, cached), the Inception network with its weights, and cached features.

    ``source``: "auto" (the original release's npz when ``<data dir>/dogfish/`` holds it,
    else the stand-in), "original" (an error if it is absent) or "stand-in". With the
    original file the inputs are in the original's units, ``u / 127.5 - 1`` (one 8-bit
    level = 2/255), and the default 900 / 300 per class are the whole release, in its order.
    """
    if source not in ("auto", "original", "stand-in"):
        raise ValueError(f"source must be 'auto', 'original' or 'stand-in', got {source!r}")
    original = original_path(data_dir) if source != "stand-in" else None
    if source == "original" and original is None:
        from influence.datasets.dogfish import ORIGINAL_NPZ
        raise DataMissingError(f"no {ORIGINAL_NPZ} in {resolve_data_dir(data_dir) / 'dogfish'}: the original "
                               f"release's dog-fish file is not distributed here (see data/README.md)")
    if original is not None:
        data = load_original_dogfish(original, n_train, n_test, seed=seed)
        logger.info("dog-fish: the original release's file %s", original)
    else:
        data = load_dogfish(data_dir, n_train=n_train, n_test=n_test, seed=seed, cache_dir=cache_dir,
                            progress=progress)
    model, pre = load_inception(weights, data_dir=data_dir)
    if original is not None:
        pre = ORIGINAL_UNITS
    wpath = Path(weights) if weights not in (None, "imagenet") else resolve_data_dir(data_dir) / DEFAULT_WEIGHTS
    wkey = weights_fingerprint(wpath) if wpath.is_file() else str(weights)
    logger.info("dog-fish: %d train, %d test images; Inception features (cache %s)", len(data.y_train),
                len(data.y_test), cache_dir)
    F_train = cached_features(model, pre, data.X_train, wkey, cache_dir, progress=progress).astype(np.float64)
    F_test = cached_features(model, pre, data.X_test, wkey, cache_dir, progress=progress).astype(np.float64)
    return DogFishFeatures(data, model, pre, F_train, F_test, str(weights or wpath))

"""Inception v3 features of many images: batched, with a progress bar, cached on disk.

The cache file name is a hash of the weights file (size + head/tail bytes) and of the
images' bytes, so a different weights file or image set never reuses stale features.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from influence.utils import hash_arrays, save_npz

logger = logging.getLogger(__name__)


def apply_batched(model, inputs: np.ndarray, batch_size: int = 32, transform=None, progress: bool = False,
                  desc: str = "Inception features") -> np.ndarray:
    """``model(transform(inputs[batch]))`` over batches, concatenated (inference mode)."""
    starts = range(0, len(inputs), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=desc, leave=False)
    transform = transform or (lambda batch: batch)
    out = [np.asarray(model(transform(inputs[s:s + batch_size]), training=False)) for s in starts]
    return np.concatenate(out, axis=0) if out else np.zeros((0, model.output_shape[-1]), np.float32)


def extract_features(model, preprocessing, images_uint8: np.ndarray, batch_size: int = 32,
                     progress: bool = False) -> np.ndarray:
    """(n, 2048) float32 pooled features of ``images_uint8`` (n, 299, 299, 3)."""
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(f"images must have shape (n, height, width, 3), got {images_uint8.shape}")
    return apply_batched(model, images_uint8, batch_size, transform=preprocessing, progress=progress)


def cached_features(model, preprocessing, images_uint8: np.ndarray, weights_key: str, cache_dir=None,
                    batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """:func:`extract_features`, read from / written to ``cache_dir`` when given."""
    if cache_dir is None:
        return extract_features(model, preprocessing, images_uint8, batch_size, progress)
    key = hash_arrays(weights_key, repr(preprocessing), np.asarray(images_uint8))[:20]
    path = Path(cache_dir) / f"inception-features-{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                return f["features"]
        except Exception as exc:
            logger.warning("ignoring unreadable feature cache %s (%s)", path, exc)
    feats = extract_features(model, preprocessing, images_uint8, batch_size, progress)
    save_npz(path, features=feats)
    return feats

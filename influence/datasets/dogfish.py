"""Dog-vs-fish ImageNet photos (paper Sec. 5.1-5.2, Figs 4 and 5).

Reads ``dogfish/imagenette_tench_springer.tar`` straight from the archive: real ImageNet
JPEGs of one fish class (``n01440764``, tench) and one dog class (``n02102040``, English
springer) under ``train/`` and ``val/``: a stand-in for the paper's "dog" and "fish"
synsets (see data/README.md). Per class the files of train and val are pooled, sorted by
name and ``n_train + n_test`` of them are drawn with ``seed``; the first ``n_train`` go to
the training set. Images are converted to RGB (a few are grayscale) and resized to
``side x side`` (bilinear, aspect ratio not kept, as the original). Labels: 0 = dog,
1 = fish, as the paper.

Pixels are kept as uint8 (2,400 images at 299x299x3 are 643 MB; float32 would be 2.6 GB)
and cached as ``.npy`` files in ``cache_dir``, keyed by the archive's checksum and the
settings; scale them with the model's preprocessing on use.

The paper's own images: the original release cached its split as
``dataset_dog-fish_train-900_test-300.npz`` (``X_train``, ``Y_train``, ``X_test``, ``Y_test``;
299x299x3 images scaled to [-1, 1] as ``(u / 255 - 0.5) * 2`` for 8-bit pixels ``u``; label
0 = dog, 1 = fish). A user who has it puts it in ``<data dir>/dogfish/``:
:func:`original_path` then finds it (used before the stand-in), and :func:`load_original_dogfish`
checks and reads it (back to the 8-bit pixels ``u = (x + 1) * 127.5``, which is exact for
the release's arrays).
"""
from __future__ import annotations

import io
import logging
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import DataError, DataMissingError, fetch_hint, resolve_data_dir
from ..utils import atomic_path, hash_arrays, sha256_file, write_json

logger = logging.getLogger(__name__)

ARCHIVE = "imagenette_tench_springer.tar"
ORIGINAL_NPZ = "dataset_dog-fish_train-900_test-300.npz"
#: what ``DogFishData.source`` says for each kind of file
SOURCE_ORIGINAL = "original release (dataset_dog-fish_train-900_test-300.npz)"
SOURCE_STAND_IN = "stand-in (Imagenette tench vs English springer)"
CLASSES = {"n02102040": 0, "n01440764": 1}  # English springer = dog = 0, tench = fish = 1
CLASS_NAMES = ("dog", "fish")


@dataclass
class DogFishData:
    X_train: np.ndarray  # (n, side, side, 3) uint8
    y_train: np.ndarray  # (n,) int, 0 = dog, 1 = fish
    X_test: np.ndarray
    y_test: np.ndarray
    names_train: list
    names_test: list
    key: str  # cache key: archive checksum + settings
    source: str = SOURCE_STAND_IN  # SOURCE_ORIGINAL or SOURCE_STAND_IN


def _progress(items, desc, enabled):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, leave=False)


def original_path(data_dir=None) -> Path | None:
    """The original release's ``.npz`` in ``<data dir>/dogfish/`` when a user has put it there."""
    path = resolve_data_dir(data_dir) / "dogfish" / ORIGINAL_NPZ
    return path if path.is_file() else None


def archive_path(data_dir=None) -> Path:
    root = resolve_data_dir(data_dir)
    path = root / "dogfish" / ARCHIVE
    if not path.is_file():
        raise DataMissingError(f"missing data file {path}. " + fetch_hint("dogfish", root))
    return path


def list_images(tar: tarfile.TarFile) -> dict[int, list[tarfile.TarInfo]]:
    """JPEG members per label, sorted by path."""
    out: dict[int, list] = {0: [], 1: []}
    for m in tar.getmembers():
        parts = m.name.split("/")
        if m.isfile() and len(parts) >= 2 and parts[-2] in CLASSES and parts[-1].lower().endswith((".jpeg", ".jpg")):
            out[CLASSES[parts[-2]]].append(m)
    for v in out.values():
        v.sort(key=lambda m: m.name)
    return out


def decode_image(data: bytes, side: int) -> np.ndarray:
    """JPEG bytes -> (side, side, 3) uint8 RGB, bilinear resize."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.uint8)


def load_dogfish(data_dir=None, n_train: int = 900, n_test: int = 300, seed: int = 0, side: int = 299,
                 cache_dir: str | Path | None = None, progress: bool = False) -> DogFishData:
    """Balanced dog/fish train and test images (uint8) with labels 0 = dog, 1 = fish."""
    path = archive_path(data_dir)
    key = hash_arrays(sha256_file(path), {"n_train": n_train, "n_test": n_test, "seed": seed, "side": side})[:20]
    if cache_dir is not None:
        folder = Path(cache_dir) / f"dogfish-{key}"
        if (folder / "meta.json").is_file():
            try:
                import json
                meta = json.loads((folder / "meta.json").read_text())
                arrays = {k: np.load(folder / f"{k}.npy", allow_pickle=False)
                          for k in ("X_train", "y_train", "X_test", "y_test")}
                digests = meta.get("sha256") or {}
                bad = [k for k, a in arrays.items() if digests.get(k) != hash_arrays(a)]
                if bad:  # corrupted in place (same size), or a cache written before digests were kept
                    raise ValueError(f"{', '.join(bad)} do not match the digests recorded with the cache")
                for k in ("y_train", "y_test"):
                    if not np.all((arrays[k] == 0) | (arrays[k] == 1)):
                        raise ValueError(f"{k} holds labels other than 0 and 1")
                return DogFishData(**arrays, names_train=meta["names_train"], names_test=meta["names_test"], key=key)
            except Exception as exc:
                logger.warning("ignoring unusable cache %s (%s); decoding the images again", folder, exc)
    rng = np.random.default_rng(seed)
    sel = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:") as tar:
            members = list_images(tar)
            for label, ms in members.items():
                if len(ms) < n_train + n_test:
                    raise DataError(f"{path} holds {len(ms)} {CLASS_NAMES[label]} images, fewer than the "
                                    f"{n_train + n_test} requested")
                pick = rng.choice(len(ms), n_train + n_test, replace=False)
                sel["train"] += [(ms[i], label) for i in pick[:n_train]]
                sel["test"] += [(ms[i], label) for i in pick[n_train:]]
            out = {}
            for split, items in sel.items():
                X = np.empty((len(items), side, side, 3), dtype=np.uint8)
                for j, (m, _) in enumerate(_progress(items, f"decode {split}", progress)):
                    X[j] = decode_image(tar.extractfile(m).read(), side)
                out[split] = (X, np.array([lab for _, lab in items]), [m.name for m, _ in items])
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{path} is corrupt or truncated ({exc}). " + fetch_hint("dogfish", path.parent.parent)) \
            from exc
    data = DogFishData(out["train"][0], out["train"][1], out["test"][0], out["test"][1], out["train"][2],
                       out["test"][2], key)
    if cache_dir is not None:
        folder = Path(cache_dir) / f"dogfish-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in ("X_train", "y_train", "X_test", "y_test"):
            with atomic_path(folder / f"{k}.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, getattr(data, k))
        write_json(folder / "meta.json", {"names_train": data.names_train, "names_test": data.names_test,
                                          "sha256": {k: hash_arrays(getattr(data, k))
                                                     for k in ("X_train", "y_train", "X_test", "y_test")}})
    return data


def _original_images(X, name: str, path: Path, side: int) -> np.ndarray:
    """[-1, 1] images (n, side, side, 3) or flattened (n, side*side*3) -> uint8, with checks."""
    X = np.asarray(X)
    if X.ndim == 2 and X.shape[1] == side * side * 3:
        X = X.reshape(-1, side, side, 3)
    if X.ndim != 4 or X.shape[1:] != (side, side, 3):
        raise DataError(f"{path}: {name} has shape {X.shape}; the original release's images are "
                        f"(n, {side}, {side}, 3) (or flattened to (n, {side * side * 3}))")
    if not np.issubdtype(X.dtype, np.floating):
        raise DataError(f"{path}: {name} has dtype {X.dtype}; expected floating-point pixels in [-1, 1]")
    lo, hi = float(np.min(X)), float(np.max(X))
    if not np.isfinite(lo) or not np.isfinite(hi) or lo < -1 - 1e-6 or hi > 1 + 1e-6:
        raise DataError(f"{path}: {name} ranges over [{lo:.4g}, {hi:.4g}]; the original release scales pixels "
                        f"to [-1, 1] as (u / 255 - 0.5) * 2")
    u = (X.astype(np.float64) + 1.0) * 127.5
    off = float(np.max(np.abs(u - np.rint(u)))) if u.size else 0.0
    if off > 0.01:
        logger.warning("%s: %s is not on the 8-bit grid (largest distance %.3f level); rounding to the nearest "
                       "level", path, name, off)
    return np.clip(np.rint(u), 0, 255).astype(np.uint8)


def _original_labels(Y, name: str, path: Path, n: int) -> np.ndarray:
    Y = np.asarray(Y).reshape(-1)
    if len(Y) != n:
        raise DataError(f"{path}: {name} has {len(Y)} labels for {n} images")
    if not np.all(np.isin(Y, (0, 1))):
        bad = np.unique(Y[~np.isin(Y, (0, 1))])[:5]
        raise DataError(f"{path}: {name} holds labels {bad.tolist()} outside {{0, 1}} (0 = dog, 1 = fish)")
    return Y.astype(np.int64)


def load_original_dogfish(path, n_train: int | None = None, n_test: int | None = None, seed: int = 0,
                          side: int = 299) -> DogFishData:
    """The original release's dog-fish split from ``path`` (checked: keys, shapes, range, labels).

    ``n_train`` / ``n_test`` (per class) draw a seeded subset per class, e.g. for a quick
    run; ``None``, or the release's own count of every class (900 / 300), keeps every image
    in the release's order.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("X_train", "Y_train", "X_test", "Y_test") if k not in f.files]
            if missing:
                raise DataError(f"{path} lacks the arrays {missing} (has {sorted(f.files)}); the original release "
                                f"stores X_train, Y_train, X_test, Y_test")
            X_train = _original_images(f["X_train"], "X_train", path, side)
            X_test = _original_images(f["X_test"], "X_test", path, side)
            y_train = _original_labels(f["Y_train"], "Y_train", path, len(X_train))
            y_test = _original_labels(f["Y_test"], "Y_test", path, len(X_test))
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is unreadable ({type(exc).__name__}: {exc}); remove it to use the stand-in, or "
                        f"replace it with the original release's file") from exc
    rng = np.random.default_rng(seed)

    def subset(y, n):
        if n is None or np.all(np.bincount(y, minlength=2) == n):  # the whole release, as it is ordered
            return np.arange(len(y))
        idx = []
        for label in (0, 1):
            pool = np.flatnonzero(y == label)
            if len(pool) < n:
                raise DataError(f"{path} holds {len(pool)} {CLASS_NAMES[label]} images, fewer than the {n} requested")
            idx.append(np.sort(rng.choice(pool, n, replace=False)))
        return np.concatenate(idx)

    tr, te = subset(y_train, n_train), subset(y_test, n_test)
    key = hash_arrays("original", path.stat().st_size, int(path.stat().st_mtime), tr, te)[:20]
    return DogFishData(X_train[tr], y_train[tr], X_test[te], y_test[te], [f"original:train:{i}" for i in tr],
                       [f"original:test:{i}" for i in te], key, SOURCE_ORIGINAL)

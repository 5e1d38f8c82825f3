"""What the models write to disk: the s_test cache and resumable influence matrices.

``s_test`` vectors are cached as ``s_test-<key>.npz`` (the key hashes the model's
configuration, theta, the training data, the test points and the solver settings);
influence matrices larger than memory are written chunk by chunk, atomically, with an
optional checkpoint so that a killed run restarts where it stopped.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .utils import atomic_path, write_json

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- s_test cache
def load_solve(path: Path, key: str):
    """The :class:`~influence.solvers.SolveResult` cached at ``path`` for ``key`` (None: absent,
    another key's, or unreadable)."""
    from .solvers import SolveResult

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            info = json.loads(str(f["info"]))
            return SolveResult(x=f["x"], **info)
    except Exception as exc:  # a broken cache file is recomputed, never trusted
        logger.warning("ignoring unreadable cache file %s (%s)", path, exc)
        return None


def save_solve(path: Path, key: str, result) -> None:
    """Write a solve's ``x`` and diagnostics to ``path`` atomically."""
    info = {k: v for k, v in result.as_dict().items() if k != "x"}
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, key=key, x=result.x, info=json.dumps(info, default=float))


# ---------------------------------------------------------------------- matrices on disk
def read_checkpoint(path: Path, key: str) -> set | None:
    """The test-chunk start rows recorded as done in a checkpoint for ``key`` (None: no
    usable checkpoint, e.g. another computation's)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return set(info["done"]) if info.get("key") == key else None


def write_checkpoint(path: Path, key: str, done: set) -> None:
    write_json(path, {"key": key, "done": sorted(done)})


FillFn = Callable[[np.ndarray, set, "Callable[[int], None] | None"], object]


def fill_matrix(shape: tuple[int, int], fill: FillFn, out=None, resume_key: str | None = None) -> np.ndarray:
    """A float64 matrix of ``shape`` filled by ``fill(result, done, chunk_done)``.

    ``fill`` writes the rows of every chunk whose start row is not in ``done`` and calls
    ``chunk_done(start)`` (when not None) after each. ``out`` None: in memory. ``out`` a
    ``.npy`` path: written there as a memory map that appears only when complete, and
    returned opened read-only. With ``resume_key``, the rows go to ``<out>.partial.npy``
    and ``<out>.partial.json`` records the finished chunks after each one; a later call
    with the same key fills only the missing chunks. Both files are kept if ``fill``
    fails, and replaced by ``out`` when it completes.
    """
    if out is None:
        result = np.empty(shape)
        fill(result, set(), None)
        return result
    if resume_key is None:
        with atomic_path(out, suffix=".npy") as tmp:
            result = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=shape)
            fill(result, set(), None)
            result.flush()
            del result
        return np.load(out, mmap_mode="r")
    out = Path(out)
    partial, checkpoint = out.with_name(out.name + ".partial.npy"), out.with_name(out.name + ".partial.json")
    done = read_checkpoint(checkpoint, resume_key) if partial.is_file() else None
    if done is None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        result, done = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float64, shape=shape), set()
        write_checkpoint(checkpoint, resume_key, done)
    else:
        result = np.load(partial, mmap_mode="r+")
        logger.info("resuming %s: chunks starting at rows %s already done", partial, sorted(done))

    def chunk_done(start: int, result=result) -> None:
        result.flush()
        done.add(start)
        write_checkpoint(checkpoint, resume_key, done)

    fill(result, done, chunk_done)
    result.flush()
    del result, chunk_done  # close the memory map before the file is moved
    os.replace(partial, out)
    checkpoint.unlink()
    return np.load(out, mmap_mode="r")

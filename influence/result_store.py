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


# ---------------------------------------------------------------------- journals of long runs
class Journal:
    """Finished units of a long run (one re-fit, one attacked target), so that a killed or
    partial run resumes where it stopped.

    Each unit is one JSON line ``{"key": ..., "name": ..., "record": ...}`` appended to
    ``path`` and flushed to disk before :meth:`add` returns. ``settings`` (any JSON-able
    value, e.g. the run's configuration and a hash of its data and model) make up the
    key: lines written under another key, and a torn last line from a killed run, are
    ignored. Arrays that go with a record are written beside the journal, atomically, as
    ``<stem>-<key[:12]>-<name>.npz`` (:meth:`add` ``arrays``; :meth:`arrays`).
    """

    def __init__(self, path: str | os.PathLike, settings):
        from .utils import hash_arrays

        self.path = Path(path)
        self.key = hash_arrays(settings)
        self._records: dict[str, dict] = {}
        ignored = 0
        text = self.path.read_text() if self.path.is_file() else ""
        self._torn = bool(text) and not text.endswith("\n")
        if text:
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                    if entry["key"] != self.key:
                        ignored += 1
                        continue
                    self._records[str(entry["name"])] = entry["record"]
                except (ValueError, KeyError, TypeError):
                    ignored += 1  # a line torn by a killed run
        if self._records:
            logger.info("%s: resuming with %d finished unit(s)%s", self.path, len(self._records),
                        f" ({ignored} line(s) of other settings ignored)" if ignored else "")

    def __contains__(self, name) -> bool:
        return str(name) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, name, default=None):
        return self._records.get(str(name), default)

    def _array_path(self, name) -> Path:
        return self.path.with_name(f"{self.path.stem}-{self.key[:12]}-{name}.npz")

    def add(self, name, record, arrays: dict | None = None) -> None:
        """Record a finished unit (its arrays first, so a recorded unit always has them)."""
        from .utils import _json_default, save_npz

        if arrays:
            save_npz(self._array_path(name), **arrays)
        line = json.dumps({"key": self.key, "name": str(name), "record": record}, default=_json_default)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            if self._torn:
                f.write("\n")  # after a line torn by a killed run: start a fresh one
                self._torn = False
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._records[str(name)] = record

    def arrays(self, name) -> dict | None:
        """The arrays stored with a unit (None: none stored, or unreadable)."""
        path = self._array_path(name)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except Exception as exc:  # noqa: BLE001 -- recomputed, never trusted
            logger.warning("ignoring unreadable journal arrays %s (%s)", path, exc)
            return None

"""What the models write to disk: the s_test cache and resumable influence matrices.

``s_test`` vectors are cached as ``s_test-<key>.npz`` (the key hashes the model's
configuration, theta, the training data, the test points and the solver settings);
influence matrices larger than memory are written chunk by chunk, atomically, with an
optional checkpoint so that a killed run restarts where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .utils import atomic_path, remove_stale_temporaries, write_json

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
def rows_digest(rows: np.ndarray) -> str:
    """SHA-256 of a block of rows (what a checkpoint records for each finished chunk)."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.float64).tobytes()).hexdigest()


def read_checkpoint(path: Path, key: str) -> dict | None:
    """``{start row: "stop:rows digest"}`` of the chunks a checkpoint for ``key`` records as done (None:
    no usable checkpoint, e.g. another computation's, or one without digests)."""
    try:
        info = json.loads(path.read_text())
        if info.get("key") != key or not isinstance(info.get("chunks"), dict):
            return None
        return {int(k): str(v) for k, v in info["chunks"].items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def write_checkpoint(path: Path, key: str, chunks: dict) -> None:
    write_json(path, {"key": key, "chunks": {str(k): v for k, v in sorted(chunks.items())}})


def set_aside(path: Path, why: str) -> Path:
    """Rename an unusable file out of the way (kept, not deleted) and say so."""
    aside = path.with_name(f"{path.name}.unusable-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    logger.warning("%s: %s; set aside as %s and started over", path, why, aside.name)
    return aside


FillFn = Callable[[np.ndarray, set, "Callable[[int, int], None] | None"], object]


def fill_matrix(shape: tuple[int, int], fill: FillFn, out=None, resume_key: str | None = None) -> np.ndarray:
    """A float64 matrix of ``shape`` filled by ``fill(result, done, chunk_done)``.

    ``fill`` writes the rows of every chunk whose start row is not in ``done`` and calls
    ``chunk_done(start, stop)`` (when not None) after each. ``out`` None: in memory. ``out`` a
    ``.npy`` path: written there as a memory map that appears only when complete, and
    returned opened read-only. With ``resume_key``, the rows go to ``<out>.partial.npy``
    and ``<out>.partial.json`` records each finished chunk with a digest of its rows; a
    later call with the same key checks every recorded chunk against its digest, recomputes
    those that fail (with a warning naming the file) and the missing ones. A partial file
    that cannot be read as the matrix is set aside (renamed, not deleted) and the run
    starts over. Both files are kept if ``fill`` fails, and replaced by ``out`` when it completes.
    """
    if out is None:
        result = np.empty(shape)
        fill(result, set(), None)
        return result
    out = Path(out)
    remove_stale_temporaries(out.parent)
    if resume_key is None:
        with atomic_path(out, suffix=".npy") as tmp:
            result = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=shape)
            fill(result, set(), None)
            result.flush()
            del result
        return np.load(out, mmap_mode="r")
    partial, checkpoint = out.with_name(out.name + ".partial.npy"), out.with_name(out.name + ".partial.json")
    chunks = read_checkpoint(checkpoint, resume_key) if partial.is_file() else None
    result = None
    if chunks is not None:
        try:
            result = np.load(partial, mmap_mode="r+")
            if result.shape != tuple(shape) or result.dtype != np.float64:
                raise ValueError(f"it holds a {result.dtype} array of shape {result.shape}, not float64 {tuple(shape)}")
        except Exception as exc:  # noqa: BLE001 -- unreadable or not this matrix: never trusted
            result = None
            set_aside(partial, f"unreadable as the partial matrix ({exc})")
            chunks = None
    if result is None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        result, chunks = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float64, shape=shape), {}
        write_checkpoint(checkpoint, resume_key, chunks)
    else:
        for start in sorted(chunks):
            stop, _, digest = chunks[start].partition(":")
            if not stop.isdigit() or not start < int(stop) <= shape[0] or \
                    rows_digest(result[start:int(stop)]) != digest:
                logger.warning("%s: the rows of the chunk at row %d do not match their recorded digest (truncated "
                               "or overwritten); recomputing them", partial, start)
                del chunks[start]
        logger.info("resuming %s: chunks starting at rows %s verified", partial, sorted(chunks))
    done = set(chunks)

    def chunk_done(start: int, stop: int, result=result) -> None:
        result.flush()
        done.add(start)
        chunks[start] = f"{stop}:{rows_digest(result[start:stop])}"
        write_checkpoint(checkpoint, resume_key, chunks)

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

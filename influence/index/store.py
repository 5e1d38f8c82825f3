"""The index on disk: one HDF5 file per shard of training rows, joined by a manifest.

Layout of an index directory::

    manifest.json          everything that determines the stored rows (written atomically)
    shard-00000.h5         a finished shard: ``rows`` (n_s, k) and, unless the curvature is the
                           empirical Fisher, ``signals`` (n_s, c, k); attributes: the manifest's
                           hash, the row range, one checksum per chunk of ``chunk_rows`` rows
    shard-00001.parts/     a shard being built: one small HDF5 file per finished chunk
    curvature.h5           the projected curvature and its eigendecomposition, keyed by the
                           manifest and every chunk checksum

Every file appears by an atomic rename of a finished temporary file, so a build killed at
any point (SIGKILL included) leaves only whole files; a resumed build re-verifies each
chunk's SHA-256 and recomputes any chunk that is missing, unreadable, truncated or altered
(never read as zeros). A shard whose chunks are all done is consolidated into its shard
file, again atomically, and its parts are removed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ..utils import atomic_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def manifest_hash(manifest: dict) -> str:
    return hashlib.sha256(canonical(manifest).encode()).hexdigest()


def checksum(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            continue
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _write_h5(path: Path, arrays: dict, attrs: dict) -> None:
    """``arrays`` and ``attrs`` into a new HDF5 file at ``path``, atomically."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, a in arrays.items():
                if a is not None:
                    f.create_dataset(name, data=a, chunks=True if a.ndim and a.size else None)
            for k, v in attrs.items():
                f.attrs[k] = v


def write_keyed(path: Path, arrays: dict, key: str, names=None) -> None:
    """``arrays`` into a new HDF5 file at ``path`` (atomically) with ``key`` and a checksum over
    the arrays in ``names`` order (default: sorted by name), for :func:`read_keyed`."""
    names = list(names or sorted(arrays))
    _write_h5(path, arrays, {"key": key, "checksum": checksum(*[arrays[n] for n in names])})


def read_keyed(path: Path, key: str, names=None) -> dict | None:
    """The arrays written by :func:`write_keyed` when the file exists, was written under ``key``
    and its content matches its checksum; None otherwise (never a partly checked result)."""
    import h5py

    if not Path(path).exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("key") != key:
                return None
            names = list(names or sorted(f))
            arrays = {n: f[n][()] for n in names}
            if f.attrs.get("checksum") != checksum(*[arrays[n] for n in names]):
                return None
    except (OSError, KeyError):
        return None
    return arrays


class Shard:
    """Rows ``[start, stop)`` of the training set, built chunk by chunk (module docstring)."""

    def __init__(self, root: Path, number: int, start: int, stop: int, chunk_rows: int, key: str):
        self.root, self.number, self.start, self.stop = Path(root), int(number), int(start), int(stop)
        self.chunk_rows, self.key = int(chunk_rows), key
        self.path = self.root / f"shard-{self.number:05d}.h5"
        self.parts = self.root / f"shard-{self.number:05d}.parts"

    @property
    def n_rows(self) -> int:
        return self.stop - self.start

    def chunks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.chunk_rows, self.stop)) for s in range(self.start, self.stop, self.chunk_rows)]

    # ------------------------------------------------------------------ checks
    def finished(self) -> bool:
        """Whether the shard file exists, belongs to this manifest and range, and every chunk's
        checksum matches its content (a failed check removes the file: it is rebuilt)."""
        import h5py

        if not self.path.exists():
            return False
        try:
            with h5py.File(self.path, "r") as f:
                ok = (f.attrs.get("key") == self.key and int(f.attrs["start"]) == self.start
                      and int(f.attrs["stop"]) == self.stop)
                sums = list(f.attrs["checksums"]) if ok else []
                ok = ok and len(sums) == len(self.chunks())
                if ok:
                    for (lo, hi), want in zip(self.chunks(), sums):
                        a, b = lo - self.start, hi - self.start
                        sig = f["signals"][a:b] if "signals" in f else None
                        if checksum(f["rows"][a:b], sig) != want:
                            ok = False
                            logger.warning("index shard %s: chunk [%d, %d) fails its checksum; rebuilding the shard",
                                           self.path.name, lo, hi)
                            break
        except (OSError, KeyError, ValueError) as exc:
            logger.warning("index shard %s is unreadable (%s); rebuilding it", self.path.name, exc)
            ok = False
        if not ok:
            self.path.unlink(missing_ok=True)
        return ok

    def _part(self, lo: int) -> Path:
        return self.parts / f"chunk-{lo:012d}.h5"

    def _read_part(self, lo: int, hi: int):
        """``(rows, signals)`` of a finished chunk, or None (missing, unreadable or corrupt)."""
        import h5py

        path = self._part(lo)
        if not path.exists():
            return None
        try:
            with h5py.File(path, "r") as f:
                rows = f["rows"][()]
                sig = f["signals"][()] if "signals" in f else None
                ok = (f.attrs.get("key") == self.key and int(f.attrs["lo"]) == lo and int(f.attrs["hi"]) == hi
                      and rows.shape[0] == hi - lo and f.attrs.get("checksum") == checksum(rows, sig))
        except (OSError, KeyError, ValueError) as exc:
            logger.warning("index chunk %s unreadable (%s): recomputed", path.name, exc)
            ok = False
        if not ok:
            logger.warning("index chunk %s failed its check: recomputed", path.name)
            path.unlink(missing_ok=True)
            return None
        return rows, sig

    # ------------------------------------------------------------------ building
    def build(self, compute, progress=None) -> int:
        """Compute the missing chunks (``compute(lo, hi) -> (rows, signals or None)``), write each
        atomically, then consolidate the shard file. Returns the number of rows computed."""
        if self.finished():
            return 0
        self.parts.mkdir(parents=True, exist_ok=True)
        for stale in self.parts.glob("*.tmp*"):
            stale.unlink(missing_ok=True)
        computed = 0
        for lo, hi in self.chunks():
            if self._read_part(lo, hi) is None:
                rows, sig = compute(lo, hi)
                _write_h5(self._part(lo), {"rows": rows, "signals": sig},
                          {"key": self.key, "lo": lo, "hi": hi, "checksum": checksum(rows, sig)})
                computed += hi - lo
            if progress is not None:
                progress(hi - lo)
        self._consolidate()
        return computed

    def _consolidate(self) -> None:
        import h5py

        parts = [self._read_part(lo, hi) for lo, hi in self.chunks()]
        if any(p is None for p in parts):
            raise RuntimeError(f"index shard {self.number}: a chunk went missing while consolidating")
        k = parts[0][0].shape[1]
        dtype = parts[0][0].dtype
        with atomic_path(self.path) as tmp:
            with h5py.File(tmp, "w") as f:
                rows = f.create_dataset("rows", (self.n_rows, k), dtype=dtype,
                                        chunks=(max(1, min(self.chunk_rows, self.n_rows, 2 ** 22 // max(k, 1))), k))
                sig = None
                if parts[0][1] is not None:
                    c = parts[0][1].shape[1]
                    sig = f.create_dataset("signals", (self.n_rows, c, k), dtype=dtype,
                                           chunks=(max(1, min(self.chunk_rows, self.n_rows,
                                                              2 ** 22 // max(c * k, 1))), c, k))
                sums = []
                for (lo, hi), (r, s) in zip(self.chunks(), parts):
                    rows[lo - self.start:hi - self.start] = r
                    if sig is not None:
                        sig[lo - self.start:hi - self.start] = s
                    sums.append(checksum(r, s))
                f.attrs.update({"key": self.key, "start": self.start, "stop": self.stop, "checksums": sums,
                                "format": FORMAT_VERSION})
        shutil.rmtree(self.parts, ignore_errors=True)

    # ------------------------------------------------------------------ reading
    def read(self, name: str = "rows", block: int | None = None):
        """Yield ``(global row slice, array)`` over the shard file's ``name`` in blocks of rows."""
        import h5py

        with h5py.File(self.path, "r") as f:
            data = f[name]
            step = block or self.chunk_rows
            for a in range(0, self.n_rows, step):
                b = min(a + step, self.n_rows)
                yield slice(self.start + a, self.start + b), data[a:b]


def remove_index_files(root: Path) -> None:
    """Delete what an index directory holds (a manifest mismatch: the old rows are never reused)."""
    root = Path(root)
    for p in list(root.glob("shard-*.h5")) + [root / "manifest.json", root / "curvature.h5"]:
        p.unlink(missing_ok=True)
    for p in root.glob("shard-*.parts"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("*.tmp*"):
        p.unlink(missing_ok=True) if p.is_file() else shutil.rmtree(p, ignore_errors=True)


def write_manifest(root: Path, manifest: dict) -> None:
    from ..utils import write_json

    os.makedirs(root, exist_ok=True)
    write_json(Path(root) / "manifest.json", manifest)


def read_manifest(root: Path) -> dict | None:
    path = Path(root) / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

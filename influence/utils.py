"""Small helpers shared by the library: atomic file writes, hashing, progress bars."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only on success.

    A reader never sees a half-written file: either the old file or the new one. The file
    is made readable by everyone (0644).
    ``suffix`` keeps an extension on the temporary name for writers that look at it
    (``np.savez`` appends ``.npz`` otherwise, matplotlib picks the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp" + suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; results are for everyone to read
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_TEMPORARY = re.compile(r"^\.(?P<name>.+?)\.(?P<pid>\d+)\.[^./]+\.tmp")
_OLD_TEMPORARY = re.compile(r"^\..+\.[^./]+\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder, every: bool = False) -> list[Path]:
    """Remove the hidden temporary files that killed atomic writes (:func:`atomic_path`) left in
    ``folder``: those whose writing process no longer runs, or with ``every`` (a folder that
    only this run writes to) every one, including those of the older pattern without a pid."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMPORARY.match(p.name)
        stale = (m is not None and (every or (int(m["pid"]) != os.getpid() and not _alive(int(m["pid"]))))) or (
            every and m is None and _OLD_TEMPORARY.match(p.name) is not None)
        if stale and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    if removed:
        import logging

        logging.getLogger(__name__).info("removed %d temporary file(s) of killed writes in %s", len(removed), folder)
    return removed


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (numpy scalars and arrays allowed)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """``np.savez_compressed`` written atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def memo(store: dict, name: str, key, compute):
    """``store[name]``'s value if it was computed for ``key``, else ``compute()`` (kept for ``key``):
    one slot per name, so a value is reused only when everything it depends on (the key) matches."""
    hit = store.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    store[name] = (key, value)
    return value


def hash_arrays(*arrays: Any) -> str:
    """SHA-256 over the dtype, shape and bytes of each array (or JSON of other values)."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, np.ndarray) or np.isscalar(a) and not isinstance(a, str):
            a = np.ascontiguousarray(a)
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(a, sort_keys=True, default=_json_default).encode())
        h.update(b"|")
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s, refresh=True):
        pass

    def close(self):
        pass


class _SummaryBar:
    """A tqdm bar that leaves one summary line (``desc: n units, postfix``) when it closes."""

    def __init__(self, total, desc, unit):
        from tqdm.auto import tqdm

        self._tqdm, self._desc, self._unit, self._postfix = tqdm, desc, unit, ""
        self._bar = tqdm(total=total, desc=desc, leave=False, unit=unit)

    def update(self, n=1):
        self._bar.update(n)

    def set_postfix_str(self, s, refresh=True):
        self._postfix = s
        self._bar.set_postfix_str(s, refresh=refresh)

    def close(self):
        n = self._bar.n
        self._bar.close()
        if n:
            self._tqdm.write(f"{self._desc}: {n} {self._unit}{'s' if n != 1 else ''}"
                             + (f", {self._postfix}" if self._postfix else ""), file=sys.stderr)


class BatchSequence:
    """Minibatches of ``b`` indices out of ``n``: epochs of a permutation drawn with ``seed``
    (a new permutation when the current one has fewer than ``b`` left), handed out in chunks
    by :meth:`take`. The same seed gives the same sequence, so a leave-one-out re-fit (the
    point at weight 0) and its control re-fit see the same batches."""

    def __init__(self, n: int, b: int, seed):
        self.n, self.b = int(n), int(b)
        self._rng = np.random.default_rng(seed)
        self._order, self._pos = self._rng.permutation(self.n), 0

    def take(self, k: int) -> np.ndarray:
        """The next ``k`` batches, shape (k, b), int32."""
        batches = np.empty((k, self.b), dtype=np.int32)
        for j in range(k):
            if self._pos + self.b > self.n:
                self._order, self._pos = self._rng.permutation(self.n), 0
            batches[j] = self._order[self._pos:self._pos + self.b]
            self._pos += self.b
        return batches


def progress_on(flag) -> bool:
    """Whether a model's ``progress`` setting shows bars: True / False as given; ``"auto"`` (the
    default, like Keras's ``verbose="auto"``) when standard error is a terminal or a Jupyter
    kernel runs, unless the environment variable ``INFLUENCE_PROGRESS`` is 0 or 1."""
    if flag != "auto":
        return bool(flag)
    env = os.environ.get("INFLUENCE_PROGRESS")
    if env in ("0", "1"):
        return env == "1"
    import sys

    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or replaced stream
        pass
    return "ipykernel" in sys.modules


def bar(total=None, desc=None, enabled=True, unit="iteration"):
    """A progress bar to ``update`` by hand that leaves a one-line summary when ``close()``d (a
    no-op object when not ``enabled``)."""
    if not enabled:
        return _NoBar()
    try:
        return _SummaryBar(total, desc, unit)
    except ImportError:  # pragma: no cover
        return _NoBar()


def progress(iterable, total=None, desc=None, enabled=True):
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (and tqdm is installed)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def frozen_copy(a, *sources) -> np.ndarray:
    """``a`` as a read-only array that shares no memory with ``sources`` (the caller's arrays):
    copied when it might, then flagged read-only, so that neither the caller nor the library can
    change what a fitted model (and every cache keyed on it) was computed from."""
    a = np.asarray(a)
    if any(isinstance(s, np.ndarray) and np.may_share_memory(a, s) for s in sources) or a.base is not None \
            or a.flags.writeable and any(a is s for s in sources):
        a = a.copy()
    a.setflags(write=False)
    return a

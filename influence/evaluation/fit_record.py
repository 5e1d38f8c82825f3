"""The fit record of a long fit (the Fig 2 CNN): one owner for its writer and its readers.

A fit is recorded in a :class:`~influence.result_store.Journal` (``fit.jsonl`` with the
arrays beside it) under a key of the model's configuration and the training data: theta,
the Adam moments and step count that re-training continues, the final learning rate.
:func:`fit_from_journal` fits or restores; :func:`fitted_state` finds, in a figure's
output folder, the state of the fit whose theta is a given one (the leaderboard re-fits
from it).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..result_store import Journal
from ..utils import hash_arrays

logger = logging.getLogger(__name__)

FIT = "fit"  # the unit's name in the journal


def fit_journal(model, X, y, path) -> Journal:
    """The journal of ``model``'s fit on ``(X, y)`` at ``path``."""
    return Journal(path, {"model": model.cache_identity(), "data": hash_arrays(np.asarray(X), np.asarray(y))})


def fit_from_journal(model, X, y, path, fresh: bool = False) -> Journal:
    """Fit the model, or restore the fit an earlier run with the same configuration and data
    recorded at ``path``: a killed run resumes without re-training. Returns the journal (a
    run may record more of its fit there, e.g. the Hessian's extreme eigenvalues)."""
    if fresh and Path(path).exists():
        Path(path).unlink()
    book = fit_journal(model, X, y, path)
    saved = book.arrays(FIT) if FIT in book else None
    if saved is not None:
        model.restore_fit(X, y, saved["theta"], adam_state=(saved["m"], saved["v"], int(saved["t"])),
                          final_learning_rate=book.get(FIT)["final_learning_rate"])
        logger.info("fit restored from %s (delete it or pass --fresh to re-train)", path)
        return book
    model.fit(X, y)
    m, v, t = model.adam_state_
    book.add(FIT, {"final_learning_rate": model.final_learning_rate_},
             arrays={"theta": model.theta_, "m": m, "v": v, "t": np.int64(t)})
    return book


def fitted_state(folder, theta):
    """``(Adam state (m, v, t), final learning rate)`` of the fit recorded in ``folder/fit.jsonl``
    whose theta is ``theta`` bit for bit (None: no such fit)."""
    folder = Path(folder)
    for npz in sorted(folder.glob(f"fit-*-{FIT}.npz")):
        try:
            with np.load(npz) as f:
                if not np.array_equal(f["theta"], theta):
                    continue
                adam = (f["m"], f["v"], int(f["t"]))
            key = npz.name.split("-")[1]
            for line in (folder / "fit.jsonl").read_text().splitlines():
                entry = json.loads(line)
                if entry["key"].startswith(key) and entry["name"] == FIT:
                    return adam, float(entry["record"]["final_learning_rate"])
        except (OSError, ValueError, KeyError):
            continue
    return None

"""The contract every experiment script follows.

``scripts/<experiment>.py`` takes ``--data-dir``, ``--out`` (default
``output/<experiment>/``), ``--seed`` and ``--quick`` (a reduced run of minutes; the full
run is the default), and writes into ``--out``:

- ``metrics.json``: ``metrics`` (name -> our value), ``paper`` (name -> the paper's value,
  or null where the paper gives none), ``targets`` (name -> acceptance threshold),
  ``config``, ``wall_time_s`` and software versions;
- ``arrays.npz``: the raw arrays behind the figure;
- ``<experiment>.png`` and ``.pdf``: the figure;
- ``outputs.json``: the files this run wrote.

Every file is written atomically. A folder holds one run: a new run first removes the
files the previous one listed in ``outputs.json`` (journals of long runs, which a rerun
resumes from, are not outputs and stay) and the temporary files of killed writes. An
``--out`` that is a file or cannot be written to is refused before any work. A missing dataset exits with status 2 ("data missing"),
a corrupt or unreadable one with status 3 ("data unreadable"); both messages say how to
fetch the data.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .datasets.manifest import DataError, DataMissingError
from .utils import atomic_path, remove_stale_temporaries, save_npz, write_json

logger = logging.getLogger(__name__)

EXIT_DATA_MISSING = 2
EXIT_DATA_UNREADABLE = 3


def summary_line(doc: str | None) -> str:
    """The first non-empty line of a docstring: what a script reproduces, in one line."""
    return next((ln.strip() for ln in (doc or "").splitlines() if ln.strip()), "")


def experiment_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The contract's flags; ``description`` may be the script's whole docstring (its first line is used)."""
    parser = argparse.ArgumentParser(prog=f"scripts/{name}.py", description=summary_line(description))
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the datasets (default: $INFLUENCE_DATA_DIR or ./data)")
    parser.add_argument("--out", default=f"output/{name}",
                        help=f"folder for metrics.json, arrays.npz and the figures (default: output/{name})")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: 0)")
    parser.add_argument("--quick", action="store_true", help="reduced run of a few minutes (used by CI)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        type=str.upper, help="how much the run logs (default: INFO)")
    return parser


def index_in(size: int, what: str):
    """An argparse type: an integer index into ``what`` of ``size`` entries, refused at parse time."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not 0 <= value < size:
            raise argparse.ArgumentTypeError(f"{value} is not an index into {what} (0 to {size - 1})")
        return value
    return parse


def check_out(out: Path) -> str | None:
    """Why ``out`` cannot take this run's files (None: it can), found before any work."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"--out {out} cannot be written to ({exc.strerror or exc})"
    return None


def software_versions() -> dict[str, str]:
    import numpy
    import scipy
    import tensorflow

    out = {"python": platform.python_version(), "numpy": numpy.__version__, "scipy": scipy.__version__,
           "tensorflow": tensorflow.__version__}
    try:
        import keras
        out["keras"] = keras.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


class Experiment:
    """Output folder, timing and writers for one experiment run."""

    MANIFEST = "outputs.json"

    def __init__(self, name: str, args: argparse.Namespace):
        self.name = name
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self._written: list[str] = []
        self._remove_previous_run()

    def _remove_previous_run(self) -> None:
        """The last run's outputs (as its manifest lists them; without one, the contract's own
        names) and the temporaries of killed writes go, so the folder never mixes two runs."""
        manifest = self.out / self.MANIFEST
        try:
            names = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            names = ["metrics.json", "arrays.npz", f"{self.name}.png", f"{self.name}.pdf"]
        stale = [self.out / n for n in names if "/" not in str(n) and (self.out / n).is_file()]
        for path in stale:
            path.unlink()
        if manifest.is_file():
            manifest.unlink()
        if stale:
            logger.info("removed the previous run's outputs from %s: %s", self.out, ", ".join(p.name for p in stale))
        remove_stale_temporaries(self.out, every=True)

    def output(self, filename: str) -> Path:
        """``out/filename``, listed as one of this run's outputs (write it atomically)."""
        if filename not in self._written:
            self._written.append(filename)
            write_json(self.out / self.MANIFEST, {"experiment": self.name, "files": self._written})
        return self.out / filename

    def save_arrays(self, **arrays) -> Path:
        path = self.output("arrays.npz")
        save_npz(path, **arrays)
        return path

    def save_figure(self, fig, stem: str | None = None) -> list[Path]:
        """The figure as PNG and PDF; a quick run's figure is stamped as such above it."""
        stem = stem or self.name
        if getattr(self.args, "quick", False) and not getattr(fig, "_quick_stamped", False):
            fig.text(0.995, 1.01, "quick run: reduced sizes, not comparable with the paper", ha="right",
                     va="bottom", fontsize=8, color="firebrick")  # above everything; bbox "tight" keeps it
            fig._quick_stamped = True
        paths = []
        for ext in ("png", "pdf"):
            path = self.output(f"{stem}.{ext}")
            with atomic_path(path, suffix=f".{ext}") as tmp:
                fig.savefig(tmp, dpi=150, bbox_inches="tight", format=ext)
            paths.append(path)
        return paths

    def write_metrics(self, metrics: dict[str, Any], paper: dict[str, Any], targets: dict[str, str] | None = None,
                      config: dict[str, Any] | None = None, notes: str = "") -> Path:
        path = self.output("metrics.json")
        write_json(path, {
            "experiment": self.name,
            "quick": bool(self.args.quick),
            "seed": self.args.seed,
            "metrics": metrics,
            "paper": paper,
            "targets": targets or {},
            "config": config or {},
            "notes": notes,
            "wall_time_s": round(time.perf_counter() - self.t0, 2),
            "versions": software_versions(),
        })
        logger.info("wrote %s", path)
        return path


def run(name: str, description: str, main: Callable[[Experiment], None],
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, argv=None) -> int:
    """Parse the standard flags, set up logging and matplotlib, and run ``main``.

    Nothing here imports TensorFlow, so ``--help`` answers at once; scripts import the
    library inside ``main``.
    """
    parser = experiment_parser(name, description)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    out = Path(args.out)
    created = not out.exists()
    problem = check_out(out)
    if problem:
        parser.error(problem)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import matplotlib
    matplotlib.use("Agg")
    from .style import apply_style

    apply_style()  # one seaborn theme for every figure
    try:
        main(Experiment(name, args))
    except DataMissingError as exc:
        print(f"[{name}] data missing: {exc}", file=sys.stderr)
        return EXIT_DATA_MISSING
    except DataError as exc:
        print(f"[{name}] data unreadable: {exc}", file=sys.stderr)
        return EXIT_DATA_UNREADABLE
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that wrote nothing leaves no empty folder behind
    return 0

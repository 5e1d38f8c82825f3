"""Where data lives, what each dataset's files are, and how to fetch them.

The data directory is chosen, in order, by an explicit argument (scripts pass
``--data-dir``), the environment variable ``INFLUENCE_DATA_DIR``, or ``data/`` in the
current directory. Code never downloads during tests or experiments: a missing or corrupt
file raises :class:`DataError` naming the file and the command that fetches it::

    .venv/bin/python -m influence.datasets fetch mnist --data-dir data/
    .venv/bin/python -m influence.datasets verify mnist --data-dir data/

Each dataset's files are listed in :data:`MANIFEST` with their public URLs and
checksums. For gzip files the checksum is of the *decompressed* bytes, so re-compressed
copies of the same data verify too.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_VAR = "INFLUENCE_DATA_DIR"
DEFAULT_DATA_DIR = "data"


class DataError(RuntimeError):
    """A dataset file is missing, truncated or does not match its checksum (corrupt or
    unreadable data raise this class itself; missing data the subclass below)."""


class DataMissingError(DataError):
    """A dataset's file or folder is not there (an experiment is skipped, not failed)."""


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset, relative to the dataset's folder in the data directory."""

    name: str
    urls: tuple[str, ...]
    sha256: str
    #: "gz": ``sha256`` is of the decompressed bytes; "raw": of the file itself.
    checksum_of: str = "raw"


@dataclass(frozen=True)
class Dataset:
    name: str
    folder: str
    files: tuple[DataFile, ...]
    description: str = ""
    notes: str = ""
    extra: dict = field(default_factory=dict)


_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


def _mnist_file(name: str, sha: str) -> DataFile:
    return DataFile(name, tuple(m + name for m in _MNIST_MIRRORS), sha, checksum_of="gz")


MANIFEST: dict[str, Dataset] = {
    "mnist": Dataset(
        name="mnist",
        folder="mnist",
        description="MNIST handwritten digits, the four standard IDX files (LeCun et al.)",
        files=(
            _mnist_file("train-images-idx3-ubyte.gz", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
            _mnist_file("train-labels-idx1-ubyte.gz", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
            _mnist_file("t10k-images-idx3-ubyte.gz", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
            _mnist_file("t10k-labels-idx1-ubyte.gz", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        ),
    ),
}


MANIFEST["spam"] = Dataset(
    name="spam", folder="spam", description="Enron1 spam corpus (Metsis et al. 2006), enron1.tar.gz",
    files=(DataFile("enron1.tar.gz",
                    ("http://nlp.cs.aueb.gr/software_and_datasets/Enron-Spam/preprocessed/enron1.tar.gz",),
                    "fc85a8d3fa5e9845a7ee572de3e92ae057f7c2be06171818539ef0983da89ad8"),),
    notes="The public archive may be packed differently from the verified copy; the loader reads the emails.",
)
MANIFEST["hospital"] = Dataset(
    name="hospital", folder="hospital",
    description="UCI Diabetes 130-US hospitals 1999-2008 (dataset_diabetes.zip)",
    files=(DataFile("dataset_diabetes.zip",
                    ("https://archive.ics.uci.edu/static/public/296/diabetes+130-us+hospitals+for+years+1999-2008.zip",),
                    "2cc570fc34b09ba1169d94b68c27ce3802dce7dc4ab6082bed833a6c195507a5"),),
    notes="The UCI download may be packaged differently; the CSV inside is what the loader reads.",
)
MANIFEST["dogfish"] = Dataset(
    name="dogfish", folder="dogfish",
    description="ImageNet tench (fish) and English springer (dog) photos from Imagenette (fast.ai), one tar",
    files=(DataFile("imagenette_tench_springer.tar", (), "73ad71fd2fa9749bdb27bcb0bfd67951341fd6e3fe339556979f9f01a7401d1b"),
           DataFile("MANIFEST.sha256", (), "40f5389354a5db92440c9017992e73cba297f2753556d2301f13b96fccba770a")),
    notes="A repack of two classes of https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz "
          "(train/ and val/ of n01440764 and n02102040); build it from that archive, see data/README.md.",
)
MANIFEST["inception"] = Dataset(
    name="inception", folder="inception",
    description="Inception v3 ImageNet weights without the top layer (Google's 2015-12-05 release) as npz",
    files=(DataFile("inception_v3_2015_12_05_notop_keras_order.npz", (),
                    "94d71dbe83c043bea91a6cb9112ecc205c8ffc665ab03e840b6fcb5764925345"),
           DataFile("inception_v3_2015_12_05_notop_keras_order.json", (),
                    "5b8085655f1e3c011420ae173c240f59f7101036f80e348312aee802d4c6ab25")),
    notes="Converted from a public release (see the .json); users with internet can instead use Keras's "
          "stock weights: --inception-weights imagenet.",
)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: the argument, else ``$INFLUENCE_DATA_DIR``, else ``data/``."""
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def fetch_hint(dataset: str, data_dir: Path) -> str:
    return (
        f"Get it with `.venv/bin/python -m influence.datasets fetch {dataset} --data-dir {data_dir}` "
        f"(needs internet), or point --data-dir / ${ENV_VAR} at a folder that holds "
        f"{MANIFEST[dataset].folder}/ (see data/README.md)."
    )


def dataset_path(dataset: str, filename: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of one file of ``dataset``; raises :class:`DataError` if it does not exist."""
    root = resolve_data_dir(data_dir)
    if dataset not in MANIFEST:
        raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(MANIFEST)}")
    if not root.is_dir():
        raise DataMissingError(f"data directory {root} does not exist. " + fetch_hint(dataset, root))
    path = root / MANIFEST[dataset].folder / filename
    if not path.is_file():
        raise DataMissingError(f"missing data file {path}. " + fetch_hint(dataset, root))
    return path


def file_checksum(path: Path, checksum_of: str) -> str:
    """SHA-256 of the file, or of its decompressed bytes for ``checksum_of="gz"``."""
    h = hashlib.sha256()
    opener = gzip.open if checksum_of == "gz" else open
    try:
        with opener(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} is corrupt or truncated ({exc})") from exc
    return h.hexdigest()


def verify(dataset: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Check every file of ``dataset`` against the manifest; return their paths."""
    root = resolve_data_dir(data_dir)
    paths, errors = [], []
    for f in MANIFEST[dataset].files:  # every file is checked: the error names all that fail
        try:
            path = dataset_path(dataset, f.name, root)
            got = file_checksum(path, f.checksum_of)
        except DataError as exc:
            errors.append(exc)
            continue
        if got != f.sha256:
            errors.append(DataError(f"{path} does not match its checksum (sha256 {got[:12]}..., expected "
                                    f"{f.sha256[:12]}...): the file is corrupt or a different version."))
            continue
        paths.append(path)
    if errors:
        cls = DataMissingError if all(isinstance(e, DataMissingError) for e in errors) else DataError
        text = "; ".join(str(e).replace(fetch_hint(dataset, root), "").strip() for e in errors)
        raise cls(f"{len(errors)} of {len(MANIFEST[dataset].files)} file(s) of {dataset} failed: {text} "
                  + fetch_hint(dataset, root))
    return paths


def fetch(dataset: str, data_dir: str | os.PathLike | None = None, force: bool = False) -> list[Path]:
    """Download ``dataset`` from its public URLs, verify checksums, and move into place.

    Each file is downloaded to a temporary name and renamed only after its checksum
    matches, so an interrupted fetch leaves nothing half-written behind.
    """
    root = resolve_data_dir(data_dir)
    spec = MANIFEST[dataset]
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in spec.files:
        target = folder / f.name
        if target.is_file() and not force:
            try:
                if file_checksum(target, f.checksum_of) == f.sha256:
                    logger.info("%s already present and verified", target)
                    out.append(target)
                    continue
            except DataError:
                pass
        errors = []
        for url in f.urls:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{f.name}.", suffix=".part")
            os.close(fd)
            tmp_path = Path(tmp)
            try:
                logger.info("downloading %s", url)
                with urllib.request.urlopen(url, timeout=60) as resp, open(tmp_path, "wb") as dst:
                    shutil.copyfileobj(resp, dst)
                got = file_checksum(tmp_path, f.checksum_of)
                if got != f.sha256:
                    raise DataError(f"checksum mismatch for {url}")
                os.replace(tmp_path, target)
                out.append(target)
                break
            except Exception as exc:  # try the next mirror
                errors.append(f"{url}: {exc}")
            finally:
                if tmp_path.exists():
                    tmp_path.unlink()
        else:
            if not f.urls:
                raise DataError(f"{f.name} has no direct download: {spec.notes}")
            raise DataError(f"could not fetch {f.name}:\n  " + "\n  ".join(errors))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m influence.datasets", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["fetch", "verify", "list"],
                        help="fetch: download and check; verify: check what is there; list: files, URLs, checksums")
    parser.add_argument("datasets", nargs="*", help=f"dataset names: {', '.join(MANIFEST)} (default: all)")
    parser.add_argument("--data-dir", default=None, help=f"default: ${ENV_VAR} or ./{DEFAULT_DATA_DIR}")
    parser.add_argument("--force", action="store_true", help="download again even if present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = args.datasets or list(MANIFEST)
    status = 0
    for name in names:
        if name not in MANIFEST:
            parser.error(f"unknown dataset {name!r}; known: {', '.join(MANIFEST)}")
        spec = MANIFEST[name]
        if args.command == "list":
            print(f"{name}: {spec.description}")
            for f in spec.files:
                print(f"  {spec.folder}/{f.name}  sha256({f.checksum_of}) {f.sha256}  {f.urls[0] if f.urls else spec.notes}")
            continue
        try:
            paths = fetch(name, args.data_dir, args.force) if args.command == "fetch" else verify(name, args.data_dir)
            print(f"{name}: OK ({len(paths)} files)")
        except DataError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

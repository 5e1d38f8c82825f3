"""Data directory resolution, the MNIST loader, checksums and the fetch step (offline)."""
import gzip
import hashlib

import numpy as np
import pytest

from conftest import shared_data_dir
from influence.datasets import manifest as data_mod
from influence.datasets.manifest import DataError, DataFile, Dataset, dataset_path, fetch, resolve_data_dir, verify
from influence.datasets.mnist import IMAGE_MAGIC, LABEL_MAGIC, load_mnist, read_idx


def write_idx(path, arr, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("INFLUENCE_DATA_DIR", raising=False)
    assert str(resolve_data_dir()) == "data"
    monkeypatch.setenv("INFLUENCE_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir("elsewhere").name == "elsewhere"


def test_missing_data_dir_and_file_say_how_to_fetch(tmp_path):
    with pytest.raises(DataError, match="does not exist.*python -m influence.datasets fetch mnist"):
        load_mnist(tmp_path / "nope")
    (tmp_path / "mnist").mkdir()
    with pytest.raises(DataError, match="missing data file .*train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path)


def test_read_idx_roundtrip_and_errors(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28))
    p = tmp_path / "imgs.gz"
    write_idx(p, imgs, IMAGE_MAGIC)
    np.testing.assert_array_equal(read_idx(p, IMAGE_MAGIC), imgs)
    with pytest.raises(DataError, match="magic number"):
        read_idx(p, LABEL_MAGIC)
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(p.read_bytes()[:40])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_idx(corrupt, IMAGE_MAGIC)
    notgz = tmp_path / "notgz.gz"
    notgz.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="not a readable gzip"):
        read_idx(notgz, IMAGE_MAGIC)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:  # header promises 7 images, data has fewer
        f.write(IMAGE_MAGIC.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in (7, 28, 28)) + b"\0" * 100)
    with pytest.raises(DataError, match="header says shape"):
        read_idx(short, IMAGE_MAGIC)


def test_loader_rejects_checksum_mismatch(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (60000, 28, 28)), IMAGE_MAGIC)
    write_idx(folder / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 60000), LABEL_MAGIC)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10000, 28, 28)), IMAGE_MAGIC)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 10000), LABEL_MAGIC)
    with pytest.raises(DataError, match="checksum"):
        load_mnist(tmp_path)
    d = load_mnist(tmp_path, verify=False)  # right format, wrong content: loads when not verified
    assert d.train.x.shape == (55000, 784) and d.validation.x.shape == (5000, 784) and d.test.x.shape == (10000, 784)
    assert d.train.x.max() <= 1.0 and d.train.x.min() >= 0.0


@pytest.mark.skipif(shared_data_dir() is None, reason="real MNIST files not present (set INFLUENCE_DATA_DIR)")
def test_real_mnist_split():
    d = load_mnist(shared_data_dir())
    assert (len(d.train), len(d.validation), len(d.test)) == (55000, 5000, 10000)
    assert d.train.x.shape == (55000, 784) and d.train.x.dtype == np.float32
    assert 0.0 == d.train.x.min() and d.train.x.max() == 1.0
    counts = np.bincount(np.concatenate([d.validation.y, d.train.y]), minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(d.test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def fake_dataset(tmp_path, monkeypatch):
    """A one-file dataset served from file:// URLs (the first mirror is broken)."""
    src = tmp_path / "src"
    src.mkdir()
    payload = b"hello influence\n" * 100
    with gzip.open(src / "good.gz", "wb") as f:
        f.write(payload)
    (src / "bad.gz").write_bytes(b"not the file")
    spec = Dataset("toy", "toy", (DataFile("toy.gz", ((src / "bad.gz").as_uri(), (src / "good.gz").as_uri()),
                                           hashlib.sha256(payload).hexdigest(), "gz"),))
    monkeypatch.setitem(data_mod.MANIFEST, "toy", spec)
    return tmp_path / "data", spec


def test_fetch_verifies_and_falls_back_to_next_mirror(fake_dataset):
    root, spec = fake_dataset
    paths = fetch("toy", root)
    assert paths == [root / "toy" / "toy.gz"]
    assert verify("toy", root) == paths
    assert [p.name for p in (root / "toy").iterdir()] == ["toy.gz"]  # no partial files left behind
    assert dataset_path("toy", "toy.gz", root).is_file()


def test_fetch_failure_leaves_nothing_behind(fake_dataset, monkeypatch):
    root, spec = fake_dataset
    broken = Dataset("toy", "toy", (DataFile("toy.gz", (spec.files[0].urls[0],), spec.files[0].sha256, "gz"),))
    monkeypatch.setitem(data_mod.MANIFEST, "toy", broken)
    with pytest.raises(DataError, match="could not fetch toy.gz"):
        fetch("toy", root)
    assert list((root / "toy").iterdir()) == []


def test_verify_detects_corruption(fake_dataset):
    root, _ = fake_dataset
    fetch("toy", root)
    (root / "toy" / "toy.gz").write_bytes(b"corrupted")
    with pytest.raises(DataError, match="corrupt"):
        verify("toy", root)
    assert data_mod.main(["verify", "toy", "--data-dir", str(root)]) == 1
    assert data_mod.main(["fetch", "toy", "--data-dir", str(root)]) == 0  # re-fetches the bad file
    assert data_mod.main(["verify", "toy", "--data-dir", str(root)]) == 0

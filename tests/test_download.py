"""Download: sources in order, verification of decompressed content, atomic and all-or-nothing."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from imageclf.data import fashion_mnist as fm
from tests.conftest import FASHION_MNIST_DIR


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny_files(tmp_path: Path) -> tuple[Path, tuple[fm.RemoteFile, ...]]:
    """A source folder with gzipped IDX files and a matching file list (raw MD5s)."""
    src = tmp_path / "good"
    src.mkdir()
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 255, (6, 4, 4)),
        "train-labels-idx1-ubyte": np.arange(6) % 3,
        "t10k-images-idx3-ubyte": rng.integers(0, 255, (3, 4, 4)),
        "t10k-labels-idx1-ubyte": np.arange(3) % 3,
    }
    files = []
    for name, array in arrays.items():
        raw = idx_bytes(array)
        (src / f"{name}.gz").write_bytes(gzip.compress(raw))
        files.append(fm.RemoteFile(name, hashlib.md5(raw).hexdigest()))
    return src, tuple(files)


def test_fetch_verifies_and_records_source(tmp_path, tiny_files):
    src, files = tiny_files
    dest = tmp_path / "raw"
    used = fm.fetch(dest, [str(src)], files=files)
    assert set(used.values()) == {str(src)}
    images, labels = fm.load_split(dest, "train")
    assert images.shape == (6, 4, 4, 1) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    # A second fetch uses the verified local copy and needs no source at all.
    assert set(fm.fetch(dest, ["/nonexistent"], files=files).values()) == {"cached"}


def test_corrupt_and_wrong_checksum_sources_fall_through(tmp_path, tiny_files):
    src, files = tiny_files
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in files:
        (corrupt / f"{f.name}.gz").write_bytes(b"\x1f\x8b not really gzip")
        (wrong / f"{f.name}.gz").write_bytes(gzip.compress(b"other content"))
    used = fm.fetch(tmp_path / "raw", [str(corrupt), str(wrong), str(src)], files=files)
    assert set(used.values()) == {str(src)}


def test_all_sources_failing_says_what_was_tried_and_keeps_good_data(tmp_path, tiny_files):
    src, files = tiny_files
    dest = tmp_path / "raw"
    fm.fetch(dest, [str(src)], files=files)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    # Ask for a different file list (new checksums) from sources that cannot provide it.
    changed = tuple(fm.RemoteFile(f.name, "0" * 32) for f in files)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in files:
        (wrong / f"{f.name}.gz").write_bytes(gzip.compress(b"junk"))
    with pytest.raises(fm.DownloadError) as err:
        fm.fetch(dest, [str(wrong), "http://127.0.0.1:9/none"], files=changed, timeout=2)
    message = str(err.value)
    assert str(wrong) in message and "127.0.0.1:9" in message
    assert "wrong content" in message and "apt-get install dataset-fashion-mnist" in message
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


def test_parse_idx_rejects_truncated_and_bad_magic():
    good = idx_bytes(np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="truncated"):
        fm.parse_idx(good[:-1], 3)
    with pytest.raises(ValueError, match="magic"):
        fm.parse_idx(b"\x01" + good[1:], 3)
    with pytest.raises(ValueError, match="dimensions"):
        fm.parse_idx(good, 1)


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed"
)
def test_debian_copy_matches_official_raw_checksums(tmp_path):
    used = fm.fetch(tmp_path, [str(FASHION_MNIST_DIR)])
    assert set(used.values()) == {str(FASHION_MNIST_DIR)}
    images, labels = fm.load_split(tmp_path, "test")
    assert images.shape == (10000, 28, 28, 1) and np.bincount(labels).tolist() == [1000] * 10

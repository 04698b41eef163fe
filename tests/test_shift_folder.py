"""benchmarks/shift_folder.py: the domain-shift ImageFolder (its layout, formats, sizes, seed,
and that the test split's backgrounds are photos train never shows)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")

from benchmarks import shift_folder


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    """Small Fashion-MNIST-shaped IDX files (gzipped): 20 items per class and split, each a
    bright blob on black, so the test needs neither the dataset nor a download."""
    folder = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        labels = np.repeat(np.arange(10), 20)
        images = np.zeros((len(labels), 28, 28), np.uint8)
        for image, label in zip(images, labels, strict=True):
            h, w = 8 + label, 20 - label
            y, x = rng.integers(0, 28 - h), rng.integers(0, 28 - w)
            image[y : y + h, x : x + w] = rng.integers(80, 256, (h, w))
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_folder_layout_sizes_formats_and_seed(tmp_path, fashion_dir):
    counts = shift_folder.write_shift_folder(tmp_path / "a", 6, 3, seed=1, fashion_dir=fashion_dir)
    assert counts == {"train": 48, "test": 24}  # the eight default classes
    for split, per_class in (("train", 6), ("test", 3)):
        folders = sorted(p.name for p in (tmp_path / "a" / split).iterdir())
        assert folders == sorted(shift_folder.DEFAULT_CLASSES)
        assert all(len(list((tmp_path / "a" / split / f).iterdir())) == per_class for f in folders)
    images = [Image.open(p) for p in sorted((tmp_path / "a").rglob("*.*"))]
    assert {im.format for im in images} == {"JPEG", "PNG"}
    sizes = {im.size for im in images}
    assert len(sizes) > 30
    longer = [max(s) for s in sizes]
    ratios = [max(s) / min(s) for s in sizes]
    assert min(longer) >= 36 and max(longer) <= 200
    assert max(ratios) <= 2.05 and min(ratios) < 1.2 and max(ratios) > 1.6
    assert all(im.mode == "RGB" for im in images)

    shift_folder.write_shift_folder(tmp_path / "b", 6, 3, seed=1, fashion_dir=fashion_dir)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    shift_folder.write_shift_folder(tmp_path / "c", 6, 3, seed=2, fashion_dir=fashion_dir)
    assert files(tmp_path / "a") != files(tmp_path / "c")


def test_test_backgrounds_are_photos_train_never_shows(monkeypatch, tmp_path, fashion_dir):
    train, test = shift_folder.STYLES["train"], shift_folder.STYLES["test"]
    assert set(train.backgrounds).isdisjoint(test.backgrounds)
    assert (train.items_file, test.items_file) == ("train", "t10k")
    # Every background loads offline (some of skimage.data's images need pooch and a network).
    photos = {name: shift_folder.load_background(name) for name in shift_folder.TRAIN_BACKGROUNDS}
    photos |= {name: shift_folder.load_background(name) for name in shift_folder.TEST_BACKGROUNDS}
    assert all(p.dtype == np.uint8 and min(p.shape[:2]) >= 100 for p in photos.values())
    # Each split's images are drawn from its own photos only.
    loaded: list[str] = []
    monkeypatch.setattr(
        shift_folder, "load_background", lambda name: loaded.append(name) or photos[name]
    )
    shift_folder.write_shift_folder(tmp_path, 1, 0, fashion_dir=fashion_dir, classes=("bag",))
    assert loaded[: len(train.backgrounds)] == list(train.backgrounds)
    assert loaded[len(train.backgrounds) :] == list(test.backgrounds)


def test_all_ten_classes_on_request_and_unknown_ones_refused(tmp_path, fashion_dir):
    counts = shift_folder.write_shift_folder(
        tmp_path, 1, 1, fashion_dir=fashion_dir, classes=shift_folder.FOLDERS
    )
    assert counts == {"train": 10, "test": 10}
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == sorted(shift_folder.FOLDERS)
    with pytest.raises(ValueError, match="unknown classes"):
        shift_folder.write_shift_folder(tmp_path, 1, 1, fashion_dir=fashion_dir, classes=("hat",))

"""The canonical dataset every stage after ``download`` reads.

Whatever the source (Fashion-MNIST IDX files, an ImageFolder tree), ``download`` writes the same
thing: ``train.npz`` and ``test.npz`` (``images`` uint8 N×H×W×C, ``labels`` int64) and
``meta.json`` (class names, shape, provenance, content hashes). Later stages never care where
the images came from, which is what makes "any ImageFolder dataset" work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imageclf.io import atomic_dir, read_json, write_json
from imageclf.stage import InvalidInput
from imageclf.transforms import prepare_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Split:
    """One split held in memory: uint8 images (N, H, W, C) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class Dataset:
    train: Split
    test: Split
    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model input."""
        h, w, c = self.train.images.shape[1:]
        return c, h, w


def stratified_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices keeping ``fraction`` of every class (at least one image per class)."""
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        k = max(1, round(len(idx) * fraction))
        keep.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(keep))


def split_train_val(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) index arrays; val is empty when ``val_fraction`` is 0."""
    if val_fraction <= 0:
        return np.arange(len(labels)), np.arange(0)
    val = stratified_fraction(labels, val_fraction, seed + 1)
    train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    return train, val


def content_hash(split: Split) -> str:
    """A short hash of images and labels: ties a model to the exact data it saw."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(split.images).tobytes())
    digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()[:16]


def write_dataset(dest: Path, train: Split, test: Split, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the canonical dataset folder atomically (a failure leaves the old one in place)."""
    meta = {
        **meta,
        "image_shape": list(train.images.shape[1:]),
        "num_train": len(train),
        "num_test": len(test),
        "train_hash": content_hash(train),
        "test_hash": content_hash(test),
    }
    with atomic_dir(dest) as tmp:
        for name, split in (("train", train), ("test", test)):
            np.savez(tmp / f"{name}.npz", images=split.images, labels=split.labels)
        write_json(tmp / "meta.json", meta)
    return meta


def load_dataset(folder: Path) -> Dataset:
    """Load what ``download`` wrote; a clear error when it is missing."""
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(
            f"No dataset at {folder}: run the download stage first (dvc repro download)."
        )
    splits = {}
    for name in ("train", "test"):
        with np.load(folder / f"{name}.npz") as npz:
            splits[name] = Split(npz["images"], npz["labels"].astype(np.int64))
    return Dataset(splits["train"], splits["test"], read_json(folder / "meta.json"))


def read_imagefolder(root: Path, size: int, channels: int) -> tuple[Split, list[str]]:
    """Read ``root/<class>/<image>`` into a Split, through the shared :func:`prepare_image`."""
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder split {root} does not exist.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InvalidInput(f"{root} has no class folders: expected {root}/<class>/<image files>.")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    images.append(prepare_image(img, size, channels))
            except (OSError, Image.DecompressionBombError) as exc:
                raise InvalidInput(
                    f"{path} is not a readable image ({exc}); remove or fix it."
                ) from exc
            labels.append(label)
    if not images:
        raise InvalidInput(f"{root} holds no images with suffixes {sorted(IMAGE_SUFFIXES)}.")
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64)), classes

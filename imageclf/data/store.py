"""The canonical dataset every stage after ``download`` reads.

Whatever the source (Fashion-MNIST IDX files, an ImageFolder tree), ``download`` writes the same
thing: ``<split>_images.npy`` (uint8 N×H×W×C, uncompressed) and ``<split>_labels.npy`` (int64)
for ``train`` and ``test``, ``meta.json`` (class names, shape, provenance, content hashes, how to
load it) and, for folder datasets, ``files.csv`` plus ``files_thumbs.npy``: one row per source
file with what the quality gate needs. Later stages never care where the images came from.

Uncompressed ``.npy`` is what makes large datasets work: a dataset whose decoded images exceed
``data.ram_budget_mb`` is written straight to disk while it is decoded and opened with
``mmap_mode="r"``, so the train loader's workers read it page by page instead of holding it in
RAM; small ones are loaded whole (the fast path). Either way ``split.images`` is an ndarray.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imageclf.io import atomic_dir, read_json, write_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Split:
    """One split: uint8 images (N, H, W, C), in RAM or memory-mapped, and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        """The rows ``index``: copied when in RAM, a :class:`RowView` of a memory map (indexing a
        memory map copies, which would pull a dataset over the RAM budget into memory)."""
        index = np.asarray(index, dtype=np.int64)
        if isinstance(self.images, np.memmap | RowView):
            return Split(RowView(self.images, index), self.labels[index])
        return Split(self.images[index], self.labels[index])


class RowView:
    """Rows ``index`` of a memory-mapped image array, read only when indexed.

    Enough of the ndarray interface for the loaders and stages (``len``, ``shape``, ``dtype``,
    indexing with an int, a slice or an index array, each returning an ndarray in RAM).
    """

    def __init__(self, base: np.ndarray | RowView, index: np.ndarray) -> None:
        if isinstance(base, RowView):  # a view of a view: compose the indices
            base, index = base.base, base.index[index]
        self.base, self.index = base, np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __getitem__(self, key: int | slice | np.ndarray | list[int]) -> np.ndarray:
        rows = self.index[key]
        if np.ndim(rows) == 0:
            return np.asarray(self.base[int(rows)])
        return np.asarray(self.base[rows])

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self.base[self.index], dtype=dtype)


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


def content_hash(split: Split, chunk: int = 512) -> str:
    """A short hash of images and labels: ties a model to the exact data it saw.

    Hashed a chunk of images at a time, so a memory-mapped split is never copied into RAM whole.
    """
    digest = hashlib.sha256()
    for start in range(0, len(split.images), chunk):
        digest.update(np.ascontiguousarray(split.images[start : start + chunk]).tobytes())
    digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()[:16]


def images_file(folder: Path, split: str) -> Path:
    return folder / f"{split}_images.npy"


def labels_file(folder: Path, split: str) -> Path:
    return folder / f"{split}_labels.npy"


FILE_TABLE = "files.csv"
FILE_THUMBS = "files_thumbs.npy"


def exceeds_budget(count: int, image_shape: tuple[int, ...], ram_budget_mb: float) -> bool:
    """Whether ``count`` decoded uint8 images of ``image_shape`` are more than the RAM budget."""
    return count * int(np.prod(image_shape)) > ram_budget_mb * 2**20


class SplitWriter:
    """Collects one split's images as they are decoded, in RAM or straight into a ``.npy`` file.

    ``capacity`` is how many images may come (every listed file); bad files make the split
    shorter, and :meth:`finish` trims the file to the images that were really added.
    """

    def __init__(
        self, folder: Path, split: str, capacity: int, image_shape: tuple[int, ...], on_disk: bool
    ) -> None:
        self.folder, self.split, self.on_disk = folder, split, on_disk
        shape = (capacity, *image_shape)
        if on_disk:
            self._images: np.ndarray = np.lib.format.open_memmap(
                images_file(folder, split), mode="w+", dtype=np.uint8, shape=shape
            )
        else:
            self._images = np.empty(shape, dtype=np.uint8)
        self._labels: list[int] = []

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, image: np.ndarray, label: int) -> None:
        self._images[len(self._labels)] = image
        self._labels.append(label)

    def finish(self, chunk: int = 512) -> Split:
        """Write the labels (and, in RAM, the images); return the split as later stages see it."""
        count = len(self._labels)
        labels = np.asarray(self._labels, dtype=np.int64)
        np.save(labels_file(self.folder, self.split), labels)
        path = images_file(self.folder, self.split)
        if not self.on_disk:
            images = self._images[:count]
            np.save(path, images)
            return Split(images, labels)
        if count < len(self._images):  # skipped files: copy into a file of the right length
            trimmed = path.with_name(f".{path.name}.trim")
            out = np.lib.format.open_memmap(
                trimmed, mode="w+", dtype=np.uint8, shape=(count, *self._images.shape[1:])
            )
            for start in range(0, count, chunk):
                stop = min(start + chunk, count)
                out[start:stop] = self._images[start:stop]
            out.flush()
            del out
            self._images.flush()
            self._images = np.empty(0, dtype=np.uint8)  # unmap before the file is replaced
            os.replace(trimmed, path)
        else:
            self._images.flush()
            self._images = np.empty(0, dtype=np.uint8)
        return Split(np.load(path, mmap_mode="r"), labels)


@contextmanager
def dataset_draft(dest: Path) -> Iterator[Path]:
    """The folder a new dataset is written into; it replaces ``dest`` only if the block succeeds,
    so a failed download leaves the previous dataset intact."""
    with atomic_dir(dest) as tmp:
        yield tmp


def finish_dataset(
    folder: Path, train: Split, test: Split, meta: dict[str, Any], storage: str
) -> dict[str, Any]:
    """Write ``meta.json`` (shape, counts, content hashes, storage) beside the split files."""
    meta = {
        **meta,
        "image_shape": list(train.images.shape[1:]),
        "num_train": len(train),
        "num_test": len(test),
        "train_hash": content_hash(train),
        "test_hash": content_hash(test),
        "storage": storage,
    }
    write_json(folder / "meta.json", meta)
    return meta


def write_dataset(
    dest: Path, train: Split, test: Split, meta: dict[str, Any], storage: str = "memory"
) -> dict[str, Any]:
    """Write splits held in RAM as the canonical dataset folder, atomically.

    ``storage`` ("memory" or "mmap") is how :func:`load_dataset` will open it.
    """
    with dataset_draft(dest) as tmp:
        for name, split in (("train", train), ("test", test)):
            np.save(images_file(tmp, name), np.ascontiguousarray(split.images, dtype=np.uint8))
            np.save(labels_file(tmp, name), np.asarray(split.labels, dtype=np.int64))
        meta = finish_dataset(tmp, train, test, meta, storage)
    return meta


def load_dataset(folder: Path) -> Dataset:
    """Load what ``download`` wrote; a clear error when it is missing.

    ``meta.json``'s ``storage`` decides: ``mmap`` datasets (over ``data.ram_budget_mb`` when
    written) are opened read-only with ``mmap_mode="r"``, the rest are read into RAM.
    """
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(
            f"No dataset at {folder}: run the download stage first (dvc repro download)."
        )
    meta = read_json(folder / "meta.json")
    if not images_file(folder, "train").is_file():
        raise FileNotFoundError(
            f"{folder} holds a dataset in an older layout: rerun the download stage "
            "(dvc repro download)."
        )
    mode = "r" if meta.get("storage") == "mmap" else None
    splits = {
        name: Split(
            np.load(images_file(folder, name), mmap_mode=mode),
            np.load(labels_file(folder, name)).astype(np.int64),
        )
        for name in ("train", "test")
    }
    return Dataset(splits["train"], splits["test"], meta)


def channel_statistics(images: np.ndarray, chunk: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images in [0, 1], a chunk at a time (no float
    copy of the whole dataset, which may be memory-mapped from disk)."""
    channels = images.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    count = 0
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start : start + chunk], dtype=np.float64).reshape(-1, channels)
        total += block.sum(0)
        squares += np.square(block).sum(0)
        count += len(block)
    mean = total / max(count, 1) / 255.0
    var = np.maximum(squares / max(count, 1) / 255.0**2 - mean**2, 0.0)
    std = np.sqrt(var)
    return [float(m) for m in mean], [float(s) if s > 0 else 1.0 for s in std]

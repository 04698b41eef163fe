"""DataLoaders over a dataset held in memory (or memory-mapped), fetched a whole batch at a time.

A 28x28 image costs microseconds to learn from on a CPU; fetching it through ``__getitem__`` and
collating one sample at a time costs more. ``__getitems__`` (used by DataLoader when present)
turns each batch into one indexing op on a uint8 array, and applies the training augmentation
to the whole batch there, so that with ``num_workers > 0`` the worker processes do it.

Augmentation is random, but what it draws must not depend on how the data was loaded
(``dataloader_check`` picks the loader settings by measured speed): each batch carries its
running number from the sampler, and its augmentation draws from a generator seeded by the run
seed and that number, in whichever process it happens to be built.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from imageclf.config import AugmentStep
from imageclf.data.store import Split
from imageclf.data.transforms import Augmentation, build_augmentation, to_model_input


class NumberedBatch(NamedTuple):
    """The indices of one batch and its running number since the loader was built."""

    number: int
    indices: list[int]


class NumberedBatches(Sampler[NumberedBatch]):
    """Numbers the batches of ``batches`` in the order the loader asks for them (in the main
    process, whatever the number of workers), across epochs."""

    def __init__(self, batches: BatchSampler) -> None:
        self.batches = batches
        self.served = 0

    def __iter__(self) -> Iterator[NumberedBatch]:
        for indices in self.batches:
            number = self.served
            self.served += 1
            yield NumberedBatch(number, indices)

    def __len__(self) -> int:
        return len(self.batches)


def batch_generator(seed: int, number: int) -> torch.Generator:
    """The augmentation generator of batch ``number`` of a run seeded ``seed`` (independent
    streams for neighbouring numbers, via NumPy's SeedSequence)."""
    state = np.random.SeedSequence([seed % 2**63, number]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class InMemoryImages(torch.utils.data.Dataset):
    """A Split as a torch Dataset yielding model-ready float batches and int64 labels, each
    batch augmented by ``augmentation`` when given (training)."""

    def __init__(
        self, split: Split, augmentation: Augmentation | None = None, seed: int = 0
    ) -> None:
        # NumPy indexing works the same on an in-RAM array and on a memory map (only the rows
        # of the batch are read from disk).
        self.images = split.images
        self.labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augmentation is not None:
            raise TypeError("augmented images come in whole batches: use make_loader")
        return to_model_input(np.asarray(self.images[index]))[0], self.labels[index]

    def __getitems__(self, batch: NumberedBatch | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        number, indices = batch if isinstance(batch, NumberedBatch) else (None, batch)
        index = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(np.ascontiguousarray(self.images[index]))  # uint8 NHWC
        if self.augmentation is not None:
            if number is None:
                raise TypeError("augmented batches need their number: use make_loader")
            with torch.autograd.profiler.record_function("augment"):
                nchw = images.permute(0, 3, 1, 2)
                augmented = self.augmentation(nchw, batch_generator(self.seed, number))
                images = augmented.permute(0, 2, 3, 1)
        return to_model_input(images), self.labels[torch.from_numpy(index)]


def _keep_batch(batch: Any) -> Any:
    """collate_fn for datasets that already return whole batches (module level: picklable)."""
    return batch


@dataclass(frozen=True)
class LoaderSettings:
    """The knobs dataloader_check measures and train then uses."""

    num_workers: int = 0
    pin_memory: bool = False
    prefetch_factor: int = 2

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "prefetch_factor": self.prefetch_factor,
        }


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class (classes 0..num_classes-1), or a ValueError naming a label outside."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}"
        )
    return np.bincount(labels, minlength=num_classes)


def class_weights(labels: np.ndarray, num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse class frequencies to ``power``, normalised to mean 1 over the classes present (a
    class with no images gets 0: it is never a target), for ``CrossEntropyLoss(weight=...)``.

    At power 1 each class contributes the same total to the loss; 0.5 (the square root) corrects
    half as hard, trading less plain accuracy for balanced accuracy (docs/recipes.md). The loss
    keeps its usual scale (so the learning rate tuned without weights still fits)."""
    counts = class_counts(labels, num_classes)
    present = counts > 0
    inverse = np.zeros(num_classes, dtype=np.float64)
    inverse[present] = 1.0 / counts[present].astype(np.float64) ** power
    if present.any():
        inverse /= inverse[present].mean()
    return torch.tensor(inverse, dtype=torch.float32)


def loss_weights(
    cfg: Any, labels: np.ndarray, num_classes: int, device: torch.device | None = None
) -> torch.Tensor | None:
    """The loss's class weights under ``train.class_balance`` (and its power), or None: one rule
    for the train loop, the Lightning adapter, the profiler and the LR finder."""
    if cfg.class_balance != "weights":
        return None
    return class_weights(labels, num_classes, cfg.class_weight_power).to(device)


def balanced_sampler(labels: np.ndarray, seed: int) -> WeightedRandomSampler:
    """Draws len(labels) indices per epoch with replacement, each class equally likely."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    weights = torch.from_numpy(1.0 / counts[labels])
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)


def make_loader(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    settings: LoaderSettings | None = None,
    drop_last: bool = False,
    augment: Sequence[AugmentStep] = (),
    balance: bool = False,
) -> DataLoader:
    """A DataLoader yielding (float NCHW in [0,1], int64 labels) batches from ``split``.

    ``augment`` is a ``train.augment`` policy, applied per batch in the loader (in its workers
    when there are any); ``balance`` draws each epoch with a class-balanced weighted sampler
    (``train.class_balance: sampler``) instead of a plain shuffle.
    """
    settings = settings or LoaderSettings()
    _, h, _, c = split.images.shape
    augmentation = build_augmentation(augment, channels=c, size=h)
    dataset = InMemoryImages(split, augmentation, seed=seed)
    if balance:
        if not shuffle:
            raise ValueError("a class-balanced sampler draws at random: it needs shuffle=True")
        base: Sampler[int] = balanced_sampler(split.labels, seed)
    elif shuffle:
        base = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        base = SequentialSampler(dataset)
    workers = settings.num_workers
    return DataLoader(
        dataset,
        batch_sampler=NumberedBatches(
            BatchSampler(base, batch_size=batch_size, drop_last=drop_last)
        ),
        collate_fn=_keep_batch,
        num_workers=workers,
        pin_memory=settings.pin_memory and torch.cuda.is_available(),
        prefetch_factor=settings.prefetch_factor if workers > 0 else None,
        persistent_workers=workers > 0,
    )


def load_loader_settings(path: Path) -> LoaderSettings:
    """The setting dataloader_check chose (defaults when it has not run, e.g. in a notebook)."""
    if path.is_file():
        return LoaderSettings(**json.loads(path.read_text())["chosen"])
    logging.getLogger(__name__).warning("%s missing: using default loader settings", path)
    return LoaderSettings()

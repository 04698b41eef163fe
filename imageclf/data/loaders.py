"""DataLoaders over an in-memory dataset, fetched a whole batch at a time.

A 28x28 image costs microseconds to learn from on a CPU; fetching it through ``__getitem__`` and
collating one sample at a time costs more. ``__getitems__`` (used by DataLoader when present)
turns each batch into one indexing op on a uint8 tensor.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from imageclf.data.store import Split
from imageclf.transforms import to_model_input


class InMemoryImages(torch.utils.data.Dataset):
    """A Split as a torch Dataset yielding model-ready float batches and int64 labels."""

    def __init__(self, split: Split) -> None:
        self.images = torch.from_numpy(split.images)
        self.labels = torch.from_numpy(split.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_input(self.images[index])[0], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return to_model_input(self.images[index]), self.labels[index]


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
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                "prefetch_factor": self.prefetch_factor}


def make_loader(split: Split, batch_size: int, *, shuffle: bool, seed: int = 0,
                settings: LoaderSettings | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader yielding (float NCHW in [0,1], int64 labels) batches from ``split``."""
    settings = settings or LoaderSettings()
    dataset = InMemoryImages(split)
    generator = torch.Generator().manual_seed(seed)
    base = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    workers = settings.num_workers
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(base, batch_size=batch_size, drop_last=drop_last),
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

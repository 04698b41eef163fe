"""Check the input pipeline before spending minutes on training.

Two classic debugging moves: overfit one batch (a model that cannot drive the loss of 64 images
to ~0 has a bug in the model, the loss or the labels), and measure the loader across worker
settings (a starved model wastes the hardware; on 2 cores, extra workers often steal more
compute than they give).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from torch import nn

from imageclf.config import DataloaderCheckParams
from imageclf.data.loaders import LoaderSettings, make_loader
from imageclf.data.store import Split
from imageclf.engine import seed_everything
from imageclf.stage import StageError


class OverfitFailed(StageError):
    """The model could not memorise a single batch: something upstream is broken (a failed
    check, so a stage reports it in one sentence)."""


def overfit_one_batch(
    model: nn.Module, split: Split, cfg: DataloaderCheckParams, seed: int
) -> dict[str, Any]:
    """Train on one fixed batch; raise when the loss does not fall below the threshold."""
    seed_everything(seed)
    images, labels = next(iter(make_loader(split, cfg.overfit_batch_size, shuffle=True, seed=seed)))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.overfit_lr)
    criterion = nn.CrossEntropyLoss()
    model.train()
    losses = []
    for _ in range(cfg.overfit_steps):
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    result = {
        "initial_loss": losses[0],
        "final_loss": losses[-1],
        "steps": cfg.overfit_steps,
        "batch_size": len(labels),
        "threshold": cfg.overfit_max_loss,
        "passed": losses[-1] < cfg.overfit_max_loss,
        "curve": losses,
    }
    if not result["passed"]:
        raise OverfitFailed(
            f"Overfitting one batch of {len(labels)} images left the loss at {losses[-1]:.4f} "
            f"after {cfg.overfit_steps} steps (threshold {cfg.overfit_max_loss}): check labels, "
            "the model and the loss, or raise dataloader_check.overfit_steps / overfit_lr."
        )
    return result


def measure_throughput(
    split: Split, batch_size: int, settings: LoaderSettings, batches: int, seed: int
) -> float:
    """Images per second the loader delivers (after one warm-up batch that starts workers)."""
    loader = make_loader(split, batch_size, shuffle=True, seed=seed, settings=settings)
    iterator = iter(loader)
    next(iterator)
    seen = 0
    started = time.perf_counter()
    for images, _ in itertools.islice(iterator, batches):
        seen += len(images)
    elapsed = time.perf_counter() - started
    del iterator, loader
    return seen / max(elapsed, 1e-9)


def loader_grid(
    split: Split, batch_size: int, cfg: DataloaderCheckParams, seed: int
) -> tuple[list[dict[str, Any]], LoaderSettings]:
    """Throughput over the configured grid; return the table and the fastest setting.

    Ties within 5% go to the simplest setting (fewest workers, no pinning): it uses fewer
    cores that training needs and behaves the same everywhere.
    """
    rows = []
    grid = cfg.grid
    for workers, pin, prefetch in itertools.product(
        grid.num_workers, grid.pin_memory, grid.prefetch_factor
    ):
        if workers == 0 and prefetch != grid.prefetch_factor[0]:
            continue  # prefetch_factor has no meaning without workers
        if pin and not torch.cuda.is_available():
            continue  # pinning only speeds up host-to-GPU copies; without a GPU it is a no-op
        settings = LoaderSettings(workers, pin, prefetch)
        ips = measure_throughput(split, batch_size, settings, cfg.throughput_batches, seed)
        rows.append({**settings.as_dict(), "images_per_second": round(ips, 1)})
    best_ips = max(r["images_per_second"] for r in rows)
    good = [r for r in rows if r["images_per_second"] >= 0.95 * best_ips]
    chosen = min(good, key=lambda r: (r["num_workers"], r["pin_memory"], r["prefetch_factor"]))
    return rows, LoaderSettings(
        chosen["num_workers"], chosen["pin_memory"], chosen["prefetch_factor"]
    )

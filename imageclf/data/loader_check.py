"""Check the input pipeline before spending minutes on training.

Two classic debugging moves: overfit one batch (a model that cannot drive the loss of 64 images
to ~0 has a bug in the model, the loss or the labels), and measure the loader across worker
settings (a starved model wastes the hardware; on 2 cores, extra workers often steal more
compute than they give). The loader is measured as training uses it: with the train.augment
policy and train.class_balance, so that for photos (where per-image augmentation is the cost)
the workers are chosen for the work they will really do. For a folder dataset, the cost of
decoding one source file through the shared preprocessing is timed too: it is paid once, by
download, and it says what reading the images straight from the files would cost per epoch.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from imageclf.config import AugmentStep, DataloaderCheckParams
from imageclf.data.loaders import LoaderSettings, make_loader
from imageclf.data.store import FILE_TABLE, Split
from imageclf.data.transforms import prepare_image
from imageclf.errors import StageError
from imageclf.seeding import seed_everything


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
    split: Split,
    batch_size: int,
    settings: LoaderSettings,
    batches: int,
    seed: int,
    augment: Sequence[AugmentStep] = (),
    balance: bool = False,
) -> float:
    """Images per second the training loader delivers, augmentation included (after one
    warm-up batch that starts the workers)."""
    loader = make_loader(
        split,
        batch_size,
        shuffle=True,
        seed=seed,
        settings=settings,
        augment=augment,
        balance=balance,
    )
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
    split: Split,
    batch_size: int,
    cfg: DataloaderCheckParams,
    seed: int,
    augment: Sequence[AugmentStep] = (),
    balance: bool = False,
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
        ips = measure_throughput(
            split, batch_size, settings, cfg.throughput_batches, seed, augment, balance
        )
        rows.append({**settings.as_dict(), "images_per_second": round(ips, 1)})
    best_ips = max(r["images_per_second"] for r in rows)
    good = [r for r in rows if r["images_per_second"] >= 0.95 * best_ips]
    chosen = min(good, key=lambda r: (r["num_workers"], r["pin_memory"], r["prefetch_factor"]))
    return rows, LoaderSettings(
        chosen["num_workers"], chosen["pin_memory"], chosen["prefetch_factor"]
    )


def why_chosen(rows: list[dict[str, Any]], chosen: LoaderSettings) -> str:
    """One sentence for the report: the chosen setting's speed against the fastest one."""
    best = max(rows, key=lambda r: r["images_per_second"])
    mine = next(r for r in rows if all(r[k] == v for k, v in chosen.as_dict().items()))
    name = f"num_workers={chosen.num_workers}, pin_memory={chosen.pin_memory}" + (
        f", prefetch_factor={chosen.prefetch_factor}" if chosen.num_workers else ""
    )
    if mine["images_per_second"] >= best["images_per_second"]:
        return f"{name} was the fastest setting ({mine['images_per_second']:,.0f} images/s)."
    return (
        f"{name} ({mine['images_per_second']:,.0f} images/s) is within 5% of the fastest "
        f"({best['images_per_second']:,.0f} images/s with num_workers={best['num_workers']}) "
        "and simpler: fewer worker processes leave more cores to training."
    )


def augmentation_cost(
    split: Split,
    batch_size: int,
    batches: int,
    seed: int,
    augment: Sequence[AugmentStep],
    balance: bool = False,
) -> dict[str, Any]:
    """The loader's speed in the main process with and without the augmentation policy, and
    what the policy costs per image."""
    settings = LoaderSettings()
    plain = measure_throughput(split, batch_size, settings, batches, seed, (), balance)
    if not augment:
        return {"policy": [], "images_per_second_without": round(plain, 1), "ms_per_image": 0.0}
    augmented = measure_throughput(split, batch_size, settings, batches, seed, augment, balance)
    return {
        "policy": list(augment),
        "images_per_second_without": round(plain, 1),
        "images_per_second_with": round(augmented, 1),
        "ms_per_image": round(max(0.0, 1000 / augmented - 1000 / plain), 4),
    }


def source_files(dataset_folder: Path, meta: dict[str, Any], limit: int) -> list[Path]:
    """Up to ``limit`` readable training source files of a folder dataset (every n-th, so that
    all classes are represented), from the file table download writes beside ``meta.json``.
    Empty for datasets that did not come from image files (Fashion-MNIST)."""
    import csv

    root = (meta.get("source") or {}).get("imagefolder_root")
    table = dataset_folder / FILE_TABLE
    if not root or not table.is_file() or limit <= 0:
        return []
    with table.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") == "train" and not r.get("problem")]
    step = max(1, len(rows) // limit)
    files = [Path(root) / r["path"] for r in rows[::step][:limit]]
    return [p for p in files if p.is_file()]


def decode_cost(files: Sequence[Path], size: int, channels: int) -> dict[str, Any]:
    """Time reading + decoding + :func:`prepare_image` of each file (one core), as training
    from the files themselves would pay it once per image and epoch."""
    if not files:
        return {"files": 0, "note": "no source image files recorded: not a folder dataset"}
    times, pixels, sizes = [], [], []
    for path in files:
        started = time.perf_counter()
        with Image.open(path) as image:
            pixels.append(image.width * image.height)
            prepare_image(image, size, channels)
        times.append(time.perf_counter() - started)
        sizes.append(path.stat().st_size)
    per_image = statistics.median(times)
    return {
        "files": len(files),
        "ms_per_image_median": round(1000 * per_image, 3),
        "ms_per_image_max": round(1000 * max(times), 3),
        "images_per_second_per_core": round(1 / max(per_image, 1e-9), 1),
        "source_megapixels_mean": round(float(np.mean(pixels)) / 1e6, 3),
        "source_kilobytes_mean": round(float(np.mean(sizes)) / 1024, 1),
    }

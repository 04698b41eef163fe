"""The training loop and batched inference: plain PyTorch, one place, used by every stage.

Shape follows torchvision's reference classification script: explicit train/eval modes,
``zero_grad(set_to_none=True)``, gradient clipping, a per-step LR schedule, AMP where a GPU makes
it pay, and a callback after every epoch (the stage uses it to checkpoint and log to MLflow).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from imageclf import distributed
from imageclf.config import TrainParams
from imageclf.data.loaders import LoaderSettings, make_loader
from imageclf.data.store import Split
from imageclf.models import FlipTTA, split_head
from imageclf.stage import StageError
from imageclf.transforms import random_augment, to_model_input

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a generator for augmentation randomness."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int) -> None:
    """0 keeps torch's default (one per core); anything else pins intra-op threads."""
    if threads > 0:
        torch.set_num_threads(threads)


class TrainingDiverged(StageError, FloatingPointError):
    """The loss stopped being finite: a learning rate or data problem the user must fix."""


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    seconds: float
    images_per_second: float

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class TrainHistory:
    epochs: list[EpochMetrics] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> EpochMetrics:
        return self.epochs[-1]


def make_optimizer(model: nn.Module, cfg: TrainParams) -> torch.optim.Optimizer:
    """SGD/AdamW with no weight decay on BatchNorm and bias parameters (they only rescale)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainParams, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "onecycle" and total_steps >= 10:  # shorter runs cannot warm up
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=total_steps,
            pct_start=0.25,
            div_factor=10.0,
            final_div_factor=100.0,
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def train_model(
    model: nn.Module,
    train: Split,
    val: Split | None,
    cfg: TrainParams,
    *,
    seed: int,
    loader: LoaderSettings | None = None,
    device: torch.device | None = None,
    on_epoch_end: Callable[[EpochMetrics, nn.Module, torch.optim.Optimizer], None] | None = None,
    progress: bool = True,
) -> TrainHistory:
    """Train ``model`` in place; return per-epoch metrics.

    Under ``torchrun`` (see :mod:`imageclf.distributed`) each process trains a DDP replica on
    its shard of ``train``; the metrics are then over all ranks and ``on_epoch_end`` runs on
    rank 0 only, with the unwrapped model."""
    device = device or select_device()
    generator = seed_everything(seed + distributed.rank())  # own augmentation stream per rank
    model.to(device=device, memory_format=torch.channels_last)
    if distributed.world_size() > 1:
        train = train.subset(distributed.shard_indices(len(train), seed))
    replica = distributed.wrap(model, device)
    # Transfer learning's linear probe: for the first freeze_epochs only the classifier learns.
    features, _ = split_head(model) if cfg.freeze_epochs else (None, None)
    frozen_params = list(features.parameters()) if features is not None else []
    train_loader = make_loader(
        train,
        cfg.batch_size,
        shuffle=True,
        seed=seed,
        settings=loader,
        drop_last=len(train) > cfg.batch_size,
    )
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    use_amp = (
        device.type == "cuda"
    )  # CPU autocast (bf16) is slower than fp32 without AMX/avx512-bf16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history = TrainHistory()
    step = 0
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        replica.train()
        frozen = features is not None and epoch <= cfg.freeze_epochs
        if frozen:
            features.eval()  # batch-norm statistics stay the pretrained ones too
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        # The bar counts steps; it is never handed the loader: tqdm.auto calls iter() on its
        # iterable when built and again when iterated, and with persistent workers each iter()
        # starts an epoch (a permutation drawn from the sampler's generator, batches prefetched),
        # so the data order, hence the weights, would depend on train loader settings.
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=None if progress else True,
            leave=False,
            mininterval=2.0,
        )
        for images, labels in train_loader:
            if step >= total_steps:
                break
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            if cfg.augment:
                images = (
                    random_augment(images, generator)
                    if device.type == "cpu"
                    else random_augment(images.cpu(), generator).to(device)
                )
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits = replica(images)
                loss = criterion(logits, labels)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"Loss became {loss.item()} at epoch {epoch}, step {step}: lower train.lr "
                    "or check the data."
                )
            scaler.scale(loss).backward()
            if frozen:  # no step for them (SGD and AdamW skip parameters without a gradient);
                for p in frozen_params:  # DDP-safe, unlike toggling requires_grad mid-run
                    p.grad = None
            if cfg.grad_clip_norm > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            batch = labels.numel()
            loss_sum += loss.item() * batch
            correct += (logits.argmax(1) == labels).sum().item()
            seen += batch
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False
            )
            bar.update()
        bar.close()
        seconds = time.perf_counter() - t0
        loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], device)
        val_loss = val_acc = None
        if val is not None and len(val):
            val_loss, val_acc = evaluate_loss_accuracy(
                model, val, criterion, cfg.batch_size, device
            )
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=loss_sum / max(seen, 1),
            train_accuracy=correct / max(seen, 1),
            val_loss=val_loss,
            val_accuracy=val_acc,
            lr=optimizer.param_groups[0]["lr"],
            seconds=seconds,
            images_per_second=seen / max(seconds, 1e-9),
        )
        history.epochs.append(metrics)
        log.info("epoch %d: %s", epoch, metrics.as_dict())
        if on_epoch_end and distributed.is_main():
            on_epoch_end(metrics, model, optimizer)
        if step >= total_steps:
            break
    distributed.check_replicas_in_sync(model, device)
    history.seconds = time.perf_counter() - started
    return history


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    batch_size: int = 1000,
    tta_flip: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Logits for uint8 NHWC images; with ``tta_flip`` averages with the mirrored image."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size]).to(
            device, memory_format=torch.channels_last
        )
        out.append((FlipTTA(model) if tta_flip else model)(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.inference_mode()
def evaluate_loss_accuracy(
    model: nn.Module, split: Split, criterion: nn.Module, batch_size: int, device: torch.device
) -> tuple[float, float]:
    logits = predict_logits(model, split.images, batch_size, device=device)
    labels = torch.from_numpy(split.labels)
    loss = float(criterion(logits, labels))
    return (loss if math.isfinite(loss) else float("inf")), float(
        (logits.argmax(1) == labels).float().mean()
    )

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
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from imageclf.config import TrainParams
from imageclf.data.loaders import LoaderSettings, class_weights, make_loader
from imageclf.data.store import Split
from imageclf.data.transforms import to_model_input
from imageclf.models.zoo import FlipTTA, split_head
from imageclf.stage import StageError
from imageclf.training import distributed
from imageclf.training.transfer import TransferPlan, extract_features

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


def make_optimizer(
    model: nn.Module, cfg: TrainParams, plan: TransferPlan | None = None
) -> torch.optim.Optimizer:
    """SGD/AdamW with no weight decay on BatchNorm and bias parameters (they only rescale);
    with a transfer ``plan``, those two groups per layer group, at discriminative LRs."""
    if plan is not None:
        groups = plan.param_groups(cfg.lr, cfg.weight_decay)
    else:
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
            max_lr=[group["lr"] for group in optimizer.param_groups],  # discriminative LRs
            total_steps=total_steps,
            pct_start=0.25,
            div_factor=10.0,
            final_div_factor=100.0,
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    """Stop at the first non-finite loss, saying where: a learning rate or data problem."""
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"Loss became {loss.item()} at epoch {epoch}, step {step}: lower train.lr "
            "or check the data."
        )


def _end_epoch(
    history: TrainHistory,
    epoch: int,
    sums: tuple[float, float, float],
    val: tuple[float | None, float | None],
    seconds: float,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    on_epoch_end: Callable[[EpochMetrics, nn.Module, torch.optim.Optimizer], None] | None,
) -> None:
    """Record an epoch's metrics (``sums``: loss sum, correct, seen) and call ``on_epoch_end``
    (on rank 0 only under DDP): the one epoch ending of both training loops."""
    loss_sum, correct, seen = sums
    metrics = EpochMetrics(
        epoch=epoch,
        train_loss=loss_sum / max(seen, 1),
        train_accuracy=correct / max(seen, 1),
        val_loss=val[0],
        val_accuracy=val[1],
        lr=optimizer.param_groups[0]["lr"],
        seconds=seconds,
        images_per_second=seen / max(seconds, 1e-9),
    )
    history.epochs.append(metrics)
    log.info("epoch %d: %s", epoch, metrics.as_dict())
    if on_epoch_end and distributed.is_main():
        on_epoch_end(metrics, model, optimizer)


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

    Under ``torchrun`` (see :mod:`imageclf.training.distributed`) each process trains a DDP
    replica on its shard of ``train``; the metrics are then over all ranks and ``on_epoch_end``
    runs on rank 0 only, with the unwrapped model."""
    device = device or select_device()
    seed_everything(seed + distributed.rank())
    model.to(device=device, memory_format=torch.channels_last)
    if distributed.world_size() > 1:
        train = train.subset(distributed.shard_indices(len(train), seed))
    # Transfer learning (imageclf.training.transfer): frozen and unfrozen layer groups,
    # discriminative LRs, frozen BN, or a head on cached features; None for plain training.
    pretrained = bool(cfg.pretrained or cfg.init_from)
    plan = None
    if TransferPlan.needed(cfg, pretrained):
        plan = TransferPlan.for_model(model, cfg, pretrained)
    if plan is not None:
        if plan.features_only and distributed.world_size() > 1:
            raise StageError(
                "train.transfer: features trains a linear head on cached features in seconds: "
                "run it in one process, without torchrun."
            )
        plan.prepare()  # before DDP sees which parameters need gradients
    toggle_requires_grad = distributed.world_size() == 1  # DDP: drop gradients instead
    replica = distributed.wrap(model, device)
    train_loader = make_loader(  # augments each batch (train.augment), in its workers if any
        train,
        cfg.batch_size,
        shuffle=True,
        seed=seed + distributed.rank(),  # own augmentation stream per rank
        settings=loader,
        drop_last=len(train) > cfg.batch_size,
        augment=cfg.augment,
        balance=cfg.class_balance == "sampler",
    )
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = make_optimizer(model, cfg, plan)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    criterion = nn.CrossEntropyLoss(
        weight=class_weights(train.labels, split_head(model)[1].out_features).to(device)
        if cfg.class_balance == "weights"
        else None,
        label_smoothing=cfg.label_smoothing,
    )
    use_amp = (
        device.type == "cuda"
    )  # CPU autocast (bf16) is slower than fp32 without AMX/avx512-bf16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if plan is not None and plan.features_only:
        batches = train_loader.batch_sampler
        history = fit_head_on_features(
            model, train, val, cfg, batches, optimizer, scheduler, criterion, total_steps, device,
            on_epoch_end, progress,
        )  # fmt: skip
        plan.release()
        return history
    history = TrainHistory()
    step = 0
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        replica.train()
        frozen_params = plan.start_epoch(epoch, toggle_requires_grad) if plan is not None else []
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
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits = replica(images)
                loss = criterion(logits, labels)
            check_finite(loss, epoch, step)
            scaler.scale(loss).backward()
            for p in frozen_params:  # DDP: no step for frozen groups (SGD and AdamW skip
                p.grad = None  # parameters without a gradient), as requires_grad must stay
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
        _end_epoch(
            history, epoch, (loss_sum, correct, seen), (val_loss, val_acc), seconds, optimizer,
            model, on_epoch_end,
        )  # fmt: skip
        if step >= total_steps:
            break
    distributed.check_replicas_in_sync(model, device)
    if plan is not None:
        plan.release()
    history.seconds = time.perf_counter() - started
    return history


def fit_head_on_features(
    model: nn.Module,
    train: Split,
    val: Split | None,
    cfg: TrainParams,
    batches: Sampler[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    total_steps: int,
    device: torch.device,
    on_epoch_end: Callable[[EpochMetrics, nn.Module, torch.optim.Optimizer], None] | None,
    progress: bool,
) -> TrainHistory:
    """``train.transfer: features``: the frozen backbone's features of the un-augmented train
    and val images, computed once, then only the classifier trained on them for every epoch.

    ``batches`` is the train loader's batch sampler, so the order (and any class-balanced
    sampling) is the loader's. ``on_epoch_end`` gets the whole model (backbone and head), so the
    checkpoint is a normal one. Augmentation cannot apply to cached features."""
    features, head = split_head(model)
    started = time.perf_counter()
    train_x = extract_features(features, train.images, cfg.batch_size, device)
    train_y = torch.from_numpy(train.labels)
    has_val = val is not None and len(val) > 0
    val_x = extract_features(features, val.images, cfg.batch_size, device) if has_val else None
    log.info(
        "features of %d images (dim %d) in %.1f s%s",
        len(train_x) + (len(val_x) if val_x is not None else 0),
        train_x.shape[1],
        time.perf_counter() - started,
        "; train.augment does not apply to cached features" if cfg.augment else "",
    )
    history = TrainHistory()
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        # The bar counts steps and is never handed the sampler (see train_model on why).
        bar = tqdm(total=len(batches), desc=f"head {epoch}/{cfg.epochs}", disable=not progress)
        for batch in batches:
            if step >= total_steps:
                break
            # The loader's batch sampler may number its batches (augmentation seeds).
            rows = torch.as_tensor(getattr(batch, "indices", batch))
            x, y = train_x[rows].to(device), train_y[rows].to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = head(x)
            loss = criterion(logits, y)
            check_finite(loss, epoch, step)
            loss.backward()
            if cfg.grad_clip_norm > 0:
                nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update()
        bar.close()
        seconds = time.perf_counter() - t0
        val_loss = val_acc = None
        if val_x is not None:
            head.eval()
            with torch.inference_mode():
                val_logits = head(val_x.to(device)).float().cpu()
            labels = torch.from_numpy(val.labels)
            val_loss = float(criterion(val_logits.to(device), labels.to(device)))
            val_acc = float((val_logits.argmax(1) == labels).float().mean())
        _end_epoch(
            history, epoch, (loss_sum, correct, seen), (val_loss, val_acc), seconds, optimizer,
            model, on_epoch_end,
        )  # fmt: skip
        if step >= total_steps:
            break
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

"""The training loop and batched inference: plain PyTorch, one place, used by every stage.

Shape follows torchvision's reference classification script: explicit train/eval modes,
``zero_grad(set_to_none=True)``, mixed precision (``train.precision``), gradient accumulation
(``no_sync`` under DDP on all but the last micro-batch), gradient clipping with the pre-clip norm
measured every step, a per-step LR schedule sized in optimizer steps, an EMA of the weights,
batch mixing (MixUp/CutMix), early stopping, and exact resume: every epoch the whole training
state goes to a callback (the stage writes it to models/checkpoints/last.pt) and a run started
from that state continues as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from imageclf.config import TrainParams
from imageclf.data.loaders import LoaderSettings, loss_weights, make_loader
from imageclf.data.store import Split
from imageclf.data.transforms import to_model_input
from imageclf.errors import StageError
from imageclf.models.zoo import FlipTTA, split_head
from imageclf.seeding import seed_everything
from imageclf.training import distributed
from imageclf.training.ema import WeightEMA
from imageclf.training.mixing import BatchMixer, hard_labels
from imageclf.training.observers import Observers
from imageclf.training.resume import capture_loader, capture_rng, restore_loader, restore_rng
from imageclf.training.transfer import TransferPlan, extract_features

log = logging.getLogger(__name__)

# Norm layers: their weights and biases only rescale and shift activations, so weight decay
# (which pulls them toward 0) fights the normalisation instead of regularising.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# OneCycle: share of the steps spent warming up, starting LR = peak / div_factor, final LR =
# start / final_div_factor (torchvision's and fastai's usual shape).
ONECYCLE_PCT_START = 0.25
ONECYCLE_DIV_FACTOR = 10.0
ONECYCLE_FINAL_DIV_FACTOR = 100.0
# The stream number of batch mixing's seeds (beside augmentation's, keyed by batch number).
MIXING_STREAM = 1


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
    # The total gradient norm before clipping, over the epoch's optimizer steps, and the share
    # of steps it exceeded train.grad_clip_norm (clipped): exploding gradients show here first.
    grad_norm_mean: float | None = None
    grad_norm_max: float | None = None
    clipped_share: float | None = None
    # The EMA weights on the validation split (train.ema_decay > 0).
    ema_val_loss: float | None = None
    ema_val_accuracy: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class TrainHistory:
    epochs: list[EpochMetrics] = field(default_factory=list)
    seconds: float = 0.0
    # The EMA of the weights (train.ema_decay > 0), for the stage to keep when it validates better.
    ema: WeightEMA | None = None
    # The epoch with the best validation accuracy (raw or EMA), and whether early stopping ended
    # the run before train.epochs.
    best_epoch: int | None = None
    stopped_early: bool = False
    # The epoch a resumed run continued after (0: started fresh).
    resumed_after_epoch: int = 0

    @property
    def final(self) -> EpochMetrics:
        return self.epochs[-1]


def ema_validated_better(metrics: EpochMetrics) -> bool:
    """Whether the EMA of the weights scored higher than the weights on the validation split
    after this epoch (ties keep the trained weights; no EMA or no validation: False)."""
    if metrics.ema_val_accuracy is None or metrics.val_accuracy is None:
        return False
    return metrics.ema_val_accuracy > metrics.val_accuracy


def chosen_weights(history: TrainHistory) -> str:
    """Which weights a run keeps: "ema" when the EMA of the weights validated better than the
    weights themselves after the last epoch, else "raw". One rule for the train stage and the
    benchmarks, so that a benchmark scores the model the stage would save."""
    return "ema" if history.ema is not None and ema_validated_better(history.final) else "raw"


def is_no_decay(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Biases, norm layers' parameters and other vectors (layer scales) get no weight decay;
    conv and linear weights (and other matrices: embeddings) do."""
    return isinstance(module, NORM_LAYERS) or name == "bias" or param.ndim <= 1


def decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay) trainable parameters of ``model``, each in ``model.parameters()`` order."""
    no_decay_ids = {
        id(p)
        for module in model.modules()
        for name, p in module.named_parameters(recurse=False)
        if is_no_decay(module, name, p)
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    return (
        [p for p in trainable if id(p) not in no_decay_ids],
        [p for p in trainable if id(p) in no_decay_ids],
    )


def make_optimizer(
    model: nn.Module, cfg: TrainParams, plan: TransferPlan | None = None
) -> torch.optim.Optimizer:
    """SGD/AdamW with no weight decay on norm layers and biases (they only rescale); with a
    transfer ``plan``, those two groups per layer group, at discriminative LRs."""
    if plan is not None:
        groups = plan.param_groups(cfg.lr, cfg.weight_decay)
    else:
        decay, no_decay = decay_groups(model)
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def optimizer_steps(batches_per_epoch: int, cfg: TrainParams) -> int:
    """Optimizer steps in the whole run: one per ``accumulate_steps`` batches (the last group
    of an epoch may be shorter), capped at ``max_steps``. What the LR schedule is sized to."""
    total = math.ceil(batches_per_epoch / cfg.accumulate_steps) * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainParams, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR schedule over ``total_steps`` optimizer steps (:func:`optimizer_steps`)."""
    if cfg.schedule == "onecycle" and total_steps >= 10:  # shorter runs cannot warm up
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],  # discriminative LRs
            total_steps=total_steps,
            pct_start=ONECYCLE_PCT_START,
            div_factor=ONECYCLE_DIV_FACTOR,
            final_div_factor=ONECYCLE_FINAL_DIV_FACTOR,
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``train.precision`` asks for on ``device`` (None: fp32), or a
    StageError for a combination that cannot train. fp16 needs a GradScaler (its gradients
    underflow), bf16 does not (it has fp32's range)."""
    if precision == "auto":
        # CPU autocast (bf16) is slower than fp32 without AMX/avx512-bf16: fp32 there.
        return torch.float16 if device.type == "cuda" else None
    if precision == "fp16":
        if device.type != "cuda":
            raise StageError(
                "train.precision: fp16 needs a CUDA GPU (float16 training on the CPU is neither "
                "supported nor faster); use bf16, fp32 or auto on this machine."
            )
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise StageError(
                "train.precision: bf16 is not supported by this GPU; use fp16 or auto."
            )
        return torch.bfloat16
    return None


def check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    """Stop at the first non-finite loss, saying where: a learning rate or data problem."""
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"Loss became {loss.item()} at epoch {epoch}, step {step}: lower train.lr "
            "or check the data."
        )


@contextlib.contextmanager
def anomaly_detection(enabled: bool, epoch: int, step: int) -> Iterator[None]:
    """``train.detect_anomaly``: autograd checks every backward op for NaN and the error names
    the op (and, in the log, the forward line that created it) instead of a NaN loss later."""
    if not enabled:
        yield
        return
    try:
        with torch.autograd.detect_anomaly(check_nan=True):
            yield
    except RuntimeError as exc:
        found = re.search(r"Function '(\w+)' returned nan", str(exc))
        if found is None:
            raise
        raise TrainingDiverged(
            f"train.detect_anomaly: the backward of {found.group(1)} returned NaN at epoch "
            f"{epoch}, step {step}. The forward operation that created it is in the traceback "
            "logged above; check its inputs (a division by 0, sqrt or log of 0, a norm of a "
            "zero vector) or lower train.lr."
        ) from exc


def grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The total L2 norm of the gradients before clipping; clips them to ``max_norm`` when > 0."""
    if max_norm > 0:
        return nn.utils.clip_grad_norm_(parameters, max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    return nn.utils.get_total_norm(grads) if grads else torch.zeros(())


@dataclass
class _EpochSums:
    """Running sums of one epoch (loss, correct, seen images; gradient norms)."""

    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    norms: list[float] = field(default_factory=list)
    clipped: int = 0

    def grad_stats(self) -> dict[str, float]:
        finite = [n for n in self.norms if math.isfinite(n)]  # fp16 overflow steps are skipped
        if not finite:
            return {}
        return {
            "grad_norm_mean": float(np.mean(finite)),
            "grad_norm_max": float(max(finite)),
            "clipped_share": self.clipped / len(self.norms),
        }


@dataclass
class EarlyStopping:
    """Stop when the monitored validation accuracy has not improved by more than
    ``min_delta`` for ``patience`` epochs (0: never stop; the best epoch is still recorded)."""

    patience: int
    min_delta: float
    best: float = -math.inf
    best_epoch: int | None = None
    waited: int = 0

    def update(self, epoch: int, value: float | None) -> bool:
        """Record ``epoch``'s value; True when training should stop now."""
        if value is None:
            return False
        if value > self.best + self.min_delta or self.best_epoch is None:
            self.best, self.best_epoch, self.waited = value, epoch, 0
        else:
            self.waited += 1
        return self.patience > 0 and self.waited >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "waited": self.waited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.waited = (
            state["best"],
            state["best_epoch"],
            state["waited"],
        )


def mix_batch(
    mixer: BatchMixer, images: torch.Tensor, labels: torch.Tensor, seed: int, number: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix batch ``number`` with the randomness of (``seed``, ``number``) alone: torchvision's
    MixUp/CutMix draw from torch's global generator, whose position depends on how the loader
    was started (worker processes, resume); a forked, reseeded generator makes the mix a
    function of the batch, like the loader's augmentation."""
    state = np.random.SeedSequence([seed % 2**63, MIXING_STREAM, number]).generate_state(1)[0]
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(state))
        return mixer(images, labels)


def _end_epoch(
    history: TrainHistory,
    metrics: EpochMetrics,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    on_epoch_end: Callable[[EpochMetrics, nn.Module, torch.optim.Optimizer], None] | None,
    observers: Observers | None,
) -> None:
    """Record an epoch's metrics and call ``on_epoch_end`` and the observers (on rank 0 only
    under DDP): the one epoch ending of both training loops."""
    history.epochs.append(metrics)
    log.info("epoch %d: %s", metrics.epoch, metrics.as_dict())
    if distributed.is_main():
        if on_epoch_end:
            on_epoch_end(metrics, model, optimizer)
        if observers:
            observers.on_epoch_end(metrics.epoch, metrics.as_dict(), model)


def _epoch_metrics(
    epoch: int,
    sums: _EpochSums,
    val: tuple[float | None, float | None],
    ema_val: tuple[float | None, float | None],
    seconds: float,
    optimizer: torch.optim.Optimizer,
) -> EpochMetrics:
    return EpochMetrics(
        epoch=epoch,
        train_loss=sums.loss / max(sums.seen, 1),
        train_accuracy=sums.correct / max(sums.seen, 1),
        val_loss=val[0],
        val_accuracy=val[1],
        lr=optimizer.param_groups[0]["lr"],
        seconds=seconds,
        images_per_second=sums.seen / max(seconds, 1e-9),
        ema_val_loss=ema_val[0],
        ema_val_accuracy=ema_val[1],
        **sums.grad_stats(),
    )


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
    observers: Observers | None = None,
    resume: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
) -> TrainHistory:
    """Train ``model`` in place; return per-epoch metrics.

    Under ``torchrun`` (see :mod:`imageclf.training.distributed`) each process trains a DDP
    replica on its shard of ``train``; the metrics are then over all ranks, and
    ``on_epoch_end``, ``observers`` and ``save_state`` run on rank 0 only, with the unwrapped
    model. ``save_state`` gets, after every epoch, the whole training state (without the
    weights, which are ``model``'s): passed back as ``resume`` (with the weights under
    ``"model"``), it continues the run exactly where it was."""
    device = device or select_device()
    dtype = autocast_dtype(cfg.precision, device)
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
    # The EMA copies the model before DDP wraps it (and registers its gradient hooks).
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
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
    batches_per_epoch = len(train_loader)
    total_steps = optimizer_steps(batches_per_epoch, cfg)
    optimizer = make_optimizer(model, cfg, plan)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    criterion = nn.CrossEntropyLoss(
        # Only weighted runs need the head's size (some test models have no split head).
        weight=loss_weights(cfg, train.labels, split_head(model)[1].out_features, device)
        if cfg.class_balance == "weights"
        else None,
        label_smoothing=cfg.label_smoothing,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if plan is not None and plan.features_only:
        if resume is not None or cfg.ema_decay > 0 or cfg.mixup_alpha or cfg.cutmix_alpha:
            log.info(
                "train.transfer: features fits a head in seconds on cached features: it does "
                "not resume, mix batches or keep an EMA"
            )
        batches = train_loader.batch_sampler
        history = fit_head_on_features(
            model, train, val, cfg, batches, optimizer, scheduler, criterion, total_steps, device,
            on_epoch_end, progress, save_state,
        )  # fmt: skip
        plan.release()
        return history
    mixer = (
        BatchMixer.from_params(cfg, split_head(model)[1].out_features)
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
        else None
    )
    stopper = EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    watch = observers if observers and distributed.is_main() else None
    history = TrainHistory(ema=ema)
    step, first_epoch, seconds_before = 0, 1, 0.0
    # The global random state to put back once the first epoch's iterator exists (persistent
    # loader workers draw their base seed from it only then; see _restore).
    late_rng: dict[str, Any] | None = None
    if resume is not None:
        late_rng = _restore(
            resume, model, optimizer, scheduler, scaler, ema, stopper, train_loader, history
        )
        step, first_epoch, seconds_before = resume["step"], resume["epoch"] + 1, resume["seconds"]
    started = time.perf_counter()
    try:
        for epoch in range(first_epoch, cfg.epochs + 1):
            if step >= total_steps:
                break
            replica.train()
            frozen_params = plan.start_epoch(epoch, toggle_requires_grad) if plan else []
            t0 = time.perf_counter()
            sums = _EpochSums()
            # The bar counts steps; it is never handed the loader: tqdm.auto calls iter() on its
            # iterable when built and again when iterated, and with persistent workers each
            # iter() starts an epoch (a permutation drawn from the sampler's generator, batches
            # prefetched), so the data order, hence the weights, would depend on loader settings.
            bar = tqdm(
                total=batches_per_epoch,
                desc=f"epoch {epoch}/{cfg.epochs}",
                disable=None if progress else True,
                leave=False,
                mininterval=2.0,
            )
            batches = iter(train_loader)
            if late_rng is not None:
                restore_rng(late_rng)
                late_rng = None
            group_left = group_size = 0
            for index, (images, labels) in enumerate(batches):
                if group_left == 0:  # the first micro-batch of an optimizer step
                    if step >= total_steps:
                        break
                    group_size = group_left = min(cfg.accumulate_steps, batches_per_epoch - index)
                    optimizer.zero_grad(set_to_none=True)
                group_left -= 1
                images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
                labels = labels.to(device, non_blocking=True)
                targets = labels
                if mixer is not None:
                    number = (epoch - 1) * batches_per_epoch + index
                    images, targets = mix_batch(
                        mixer, images, labels, seed + distributed.rank(), number
                    )
                if watch is not None and step == 0 and index == 0:
                    _show_first_batch(watch, model, images)
                # DDP all-reduces gradients in backward: only on the last micro-batch.
                syncing = group_left == 0
                sync = contextlib.nullcontext() if syncing else _no_sync(replica)
                with sync, anomaly_detection(cfg.detect_anomaly, epoch, step):
                    autocast = (
                        torch.autocast(device.type, dtype=dtype)
                        if dtype is not None
                        else contextlib.nullcontext()
                    )
                    with autocast:
                        logits = replica(images)
                        loss = criterion(logits, targets)
                    check_finite(loss, epoch, step)
                    scaler.scale(loss / group_size if group_size > 1 else loss).backward()
                batch = labels.numel()
                sums.loss += loss.item() * batch
                sums.correct += (logits.argmax(1) == hard_labels(targets)).sum().item()
                sums.seen += batch
                bar.update()
                if not syncing:
                    continue
                for p in frozen_params:  # DDP: no step for frozen groups (SGD and AdamW skip
                    p.grad = None  # parameters without a gradient), as requires_grad must stay
                scaler.unscale_(optimizer)  # true gradients for the norm, clipping, observers
                if watch is not None:
                    watch.after_backward(step, model)
                norm = float(grad_norm(list(model.parameters()), cfg.grad_clip_norm))
                # fp16 overflow (inf norm): the scaler skips this step; it is not a clip
                clipped = math.isfinite(norm) and 0 < cfg.grad_clip_norm < norm
                lr = optimizer.param_groups[0]["lr"]  # the LR of this step (before the schedule's)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if ema is not None:
                    ema.update(model)
                step += 1
                sums.norms.append(norm)
                sums.clipped += int(clipped)
                if watch is not None:
                    watch.on_step_end(
                        step,
                        {
                            "loss": float(loss.item()),
                            "lr": lr,
                            "grad_norm": norm,
                            "clipped": float(clipped),
                        },
                    )
                bar.set_postfix(
                    loss=f"{sums.loss / sums.seen:.3f}",
                    acc=f"{sums.correct / sums.seen:.3f}",
                    refresh=False,
                )
            bar.close()
            seconds = time.perf_counter() - t0
            sums.loss, sums.correct, sums.seen = distributed.all_reduce_sum(
                [sums.loss, sums.correct, sums.seen], device
            )
            val_scores: tuple[float | None, float | None] = (None, None)
            ema_scores: tuple[float | None, float | None] = (None, None)
            if val is not None and len(val):
                val_scores = evaluate_loss_accuracy(model, val, criterion, cfg.batch_size, device)
                if ema is not None:
                    ema_scores = evaluate_loss_accuracy(
                        ema.module, val, criterion, cfg.batch_size, device
                    )
            metrics = _epoch_metrics(epoch, sums, val_scores, ema_scores, seconds, optimizer)
            monitored = [v for v in (val_scores[1], ema_scores[1]) if v is not None]
            stop = stopper.update(epoch, max(monitored) if monitored else None)
            history.best_epoch = stopper.best_epoch
            _end_epoch(history, metrics, optimizer, model, on_epoch_end, watch)
            finished = stop or epoch == cfg.epochs or step >= total_steps
            if save_state is not None or distributed.world_size() > 1:  # a collective
                ranks = distributed.gather_objects(
                    {"rng": capture_rng(), "loader": capture_loader(train_loader)}
                )
                if save_state is not None and distributed.is_main():
                    save_state(
                        {
                            "epoch": epoch,
                            "step": step,
                            "finished": finished,
                            "seconds": seconds_before + time.perf_counter() - started,
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(),
                            "ema": ema.state_dict() if ema is not None else None,
                            "early_stopping": stopper.state_dict(),
                            "history": [asdict(e) for e in history.epochs],
                            "ranks": ranks,
                        }
                    )
            if stop:
                history.stopped_early = epoch < cfg.epochs
                log.info(
                    "early stopping after epoch %d: val_accuracy has not improved by more than "
                    "%g for %d epochs (best %.4f at epoch %d)",
                    epoch,
                    cfg.early_stopping_min_delta,
                    cfg.early_stopping_patience,
                    stopper.best,
                    stopper.best_epoch,
                )
                break
    finally:
        if watch is not None:
            watch.close()
    distributed.check_replicas_in_sync(model, device)
    if plan is not None:
        plan.release()
    history.seconds = seconds_before + time.perf_counter() - started
    return history


def _show_first_batch(watch: Observers, model: nn.Module, images: torch.Tensor) -> None:
    """``on_train_start`` without letting it change training: a graph trace runs the model,
    which would move BatchNorm's running statistics and draw from the global generator."""
    buffers = [b.detach().clone() for b in model.buffers()]
    training = model.training
    with torch.random.fork_rng(devices=[]):
        watch.on_train_start(model, images)
    with torch.no_grad():
        for saved, b in zip(buffers, model.buffers(), strict=True):
            b.copy_(saved)
    model.train(training)


def _no_sync(replica: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync`` (gradients accumulate locally, no all-reduce), else nothing."""
    if isinstance(replica, nn.parallel.DistributedDataParallel):
        return replica.no_sync()
    return contextlib.nullcontext()


def _restore(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: WeightEMA | None,
    stopper: EarlyStopping,
    train_loader: torch.utils.data.DataLoader,
    history: TrainHistory,
) -> dict[str, Any] | None:
    """Load a :func:`train_model` state into freshly built objects. Returns the global random
    state still to restore after the next epoch's iterator is made (persistent loader workers),
    or None when it is restored here already.

    The order matters for bit-identical batches: a DataLoader draws its workers' base seed from
    torch's global generator each time it makes an iterator; persistent workers make one only
    in the first epoch, so a resumed run must make its iterator *before* putting the global
    state back, while a loader without workers makes one per epoch, as the killed run did."""
    ranks = state["ranks"]
    if len(ranks) != distributed.world_size():
        raise StageError(
            f"the checkpoint was written by {len(ranks)} processes, this run has "
            f"{distributed.world_size()}: resume with the same torchrun --nproc_per_node."
        )
    mine = ranks[distributed.rank()]
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if state["ema"] is None:
            raise StageError("the checkpoint has no EMA weights but train.ema_decay is set")
        ema.load_state_dict(state["ema"])
    stopper.load_state_dict(state["early_stopping"])
    history.epochs = [EpochMetrics(**row) for row in state["history"]]
    history.best_epoch = stopper.best_epoch
    history.resumed_after_epoch = state["epoch"]
    restore_loader(train_loader, mine["loader"])
    if train_loader.num_workers > 0:
        return mine["rng"]
    restore_rng(mine["rng"])
    return None


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
    save_state: Callable[[dict[str, Any]], None] | None = None,
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
        sums = _EpochSums()
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
            norm = float(grad_norm(list(head.parameters()), cfg.grad_clip_norm))
            optimizer.step()
            scheduler.step()
            step += 1
            sums.norms.append(norm)
            sums.clipped += int(0 < cfg.grad_clip_norm < norm)
            sums.loss += loss.item() * len(y)
            sums.correct += int((logits.argmax(1) == y).sum())
            sums.seen += len(y)
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
        metrics = _epoch_metrics(epoch, sums, (val_loss, val_acc), (None, None), seconds, optimizer)
        _end_epoch(history, metrics, optimizer, model, on_epoch_end, None)
        if save_state is not None:  # the epoch's weights; seconds to redo, so not resumable
            finished = epoch == cfg.epochs or step >= total_steps
            save_state({"epoch": epoch, "step": step, "finished": finished, "resumable": False})
        if step >= total_steps:
            break
    history.seconds = time.perf_counter() - started
    return history


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    batch_size: int = 1000,
    views: int = 1,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Logits for uint8 NHWC images; with ``views`` > 1 the mean log-probabilities of that many
    symmetric views (test-time augmentation, :class:`FlipTTA`)."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size]).to(
            device, memory_format=torch.channels_last
        )
        out.append((FlipTTA(model, views) if views > 1 else model)(x).float().cpu())
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

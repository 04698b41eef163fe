"""The training loop and batched inference: plain PyTorch, one place, used by every stage.

Shape follows torchvision's reference classification script (``train_model`` runs epochs of
``train_one_epoch`` then ``validate``): explicit train/eval modes,
``zero_grad(set_to_none=True)``, mixed precision (``train.precision``), gradient accumulation
(``no_sync`` under DDP on all but the last micro-batch), gradient clipping with the pre-clip norm
measured every step, a per-step LR schedule sized in optimizer steps, an EMA of the weights,
batch mixing (MixUp/CutMix), early stopping, and exact resume: every epoch the whole training
state goes to the observers (the stage's writes it to models/checkpoints/last.pt) and a run
started from that state continues as if it had never stopped. Everything else that watches or
records a run is an observer too (imageclf.training.observers). Running loss, accuracy and
gradient norms stay on the device, read once an epoch: the only host sync every step is the
check that the loss is finite.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
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
from imageclf.training.observers import Observers, TrainingObserver
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

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> EpochMetrics:
        """Back from :meth:`as_dict`, which leaves out what is None (no validation split)."""
        return cls(**{"val_loss": None, "val_accuracy": None, **row})


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


class _EpochSums:
    """Running sums of one epoch, kept on the device so that a step costs no host sync (the loss
    in float64, as the Python floats it replaces added it up); read once, by :meth:`summary`."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0
        self.norms: list[torch.Tensor] = []  # every optimizer step's gradient norm before clipping

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """A batch's mean ``loss`` and its predictions against its (hard) ``labels``."""
        self.loss += loss.detach().double() * len(labels)
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)

    def running(self) -> dict[str, str]:
        """Loss and accuracy so far, for the progress bar (a host sync)."""
        seen = max(self.seen, 1)
        return {"loss": f"{float(self.loss) / seen:.3f}", "acc": f"{int(self.correct) / seen:.3f}"}

    def summary(self, started: float, clip: float) -> dict[str, float]:
        """The epoch's train metrics, summed over all ranks. ``started`` is the epoch's
        perf_counter start: the clock stops after the one host sync, once the device is done."""
        device = self.loss.device
        norms = [n.to(device, torch.float64) for n in self.norms]
        loss, correct, *steps = torch.stack([self.loss, self.correct.double(), *norms]).tolist()
        seconds = time.perf_counter() - started
        loss, correct, seen = distributed.all_reduce_sum([loss, correct, self.seen], device)
        return {
            "train_loss": loss / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "seconds": seconds,
            "images_per_second": seen / max(seconds, 1e-9),
            **_grad_stats(steps, clip),
        }


def _grad_stats(norms: list[float], clip: float) -> dict[str, float]:
    """Mean and max gradient norm over an epoch's steps, and the share of steps clipped."""
    finite = [n for n in norms if math.isfinite(n)]  # fp16 overflow steps are skipped
    if not finite:
        return {}
    return {
        "grad_norm_mean": float(np.mean(finite)),
        "grad_norm_max": float(max(finite)),
        "clipped_share": sum(0 < clip < n for n in finite) / len(norms),
    }


class _StepScalars(Mapping[str, float]):
    """What ``on_step_end`` gets: the step's loss, lr, grad_norm (before clipping) and clipped
    (0/1), read from the device when an observer first looks (TensorBoard does, the gradient
    tools do not): a host sync every step would stall a GPU."""

    KEYS = ("loss", "lr", "grad_norm", "clipped")

    def __init__(self, loss: torch.Tensor, lr: float, norm: torch.Tensor, clip: float) -> None:
        self._tensors, self._lr, self._clip = (loss.detach(), norm), lr, clip
        self._values: dict[str, float] | None = None

    def __getitem__(self, key: str) -> float:
        if self._values is None:
            loss, norm = (float(t) for t in self._tensors)
            clipped = float(math.isfinite(norm) and 0 < self._clip < norm)  # inf: fp16 overflow
            self._values = dict(zip(self.KEYS, (loss, self._lr, norm, clipped), strict=True))
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.KEYS)

    def __len__(self) -> int:
        return len(self.KEYS)


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


@dataclass
class TrainingRun:
    """What one training run builds before its first step (:func:`_build`) and the step count it
    advances: the objects :func:`train_one_epoch` and :func:`validate` share (torchvision's
    reference script keeps them as locals of ``main``)."""

    cfg: TrainParams
    seed: int
    device: torch.device
    dtype: torch.dtype | None  # autocast's; None: fp32
    model: nn.Module
    replica: nn.Module  # ``model``, or its DDP wrapper
    loader: DataLoader[Any]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    total_steps: int
    plan: TransferPlan | None
    ema: WeightEMA | None
    mixer: BatchMixer | None
    stopper: EarlyStopping
    history: TrainHistory
    step: int = 0  # optimizer steps taken
    # The clock: perf_counter when this process began its epochs, plus a resumed run's seconds.
    started: float = 0.0
    seconds_before: float = 0.0

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started


def _build(
    model: nn.Module,
    train: Split,
    cfg: TrainParams,
    seed: int,
    loader: LoaderSettings | None,
    device: torch.device | None,
) -> TrainingRun:
    """Seeds, device, DDP shard and wrapper, transfer plan, loader, optimizer, schedule: in this
    order, which the weights depend on (the EMA copies the model before DDP wraps it and
    registers its gradient hooks)."""
    device = device or select_device()
    dtype = autocast_dtype(cfg.precision, device)
    seed_everything(seed + distributed.rank())
    model.to(device=device, memory_format=torch.channels_last)
    if distributed.world_size() > 1:
        train = train.subset(distributed.shard_indices(len(train), seed))
    plan = _transfer_plan(model, cfg)
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
    total_steps = optimizer_steps(len(train_loader), cfg)
    optimizer = make_optimizer(model, cfg, plan)
    mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
    return TrainingRun(
        cfg=cfg,
        seed=seed,
        device=device,
        dtype=dtype,
        model=model,
        replica=replica,
        loader=train_loader,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg, total_steps),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        criterion=_criterion(model, train, cfg, device),
        total_steps=total_steps,
        plan=plan,
        ema=ema,
        mixer=BatchMixer.from_params(cfg, split_head(model)[1].out_features) if mixing else None,
        stopper=EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta),
        history=TrainHistory(ema=ema),
    )


def _criterion(
    model: nn.Module, train: Split, cfg: TrainParams, device: torch.device
) -> nn.CrossEntropyLoss:
    """Cross-entropy with ``train.label_smoothing``, class-weighted by ``train.class_balance:
    weights`` (only weighted runs need the head's size: some test models have no split head)."""
    return nn.CrossEntropyLoss(
        weight=loss_weights(cfg, train.labels, split_head(model)[1].out_features, device)
        if cfg.class_balance == "weights"
        else None,
        label_smoothing=cfg.label_smoothing,
    )


def _transfer_plan(model: nn.Module, cfg: TrainParams) -> TransferPlan | None:
    """Transfer learning (imageclf.training.transfer): frozen and unfrozen layer groups,
    discriminative LRs, frozen BN, or a head on cached features; None for plain training."""
    pretrained = bool(cfg.pretrained or cfg.init_from)
    if not TransferPlan.needed(cfg, pretrained):
        return None
    plan = TransferPlan.for_model(model, cfg, pretrained)
    if plan.features_only and distributed.world_size() > 1:
        raise StageError(
            "train.transfer: features trains a linear head on cached features in seconds: "
            "run it in one process, without torchrun."
        )
    plan.prepare()  # before DDP sees which parameters need gradients
    return plan


def _callbacks(
    observers: Iterable[TrainingObserver] | None,
    on_epoch_end: Callable[[EpochMetrics, nn.Module, torch.optim.Optimizer], None] | None,
    save_state: Callable[[dict[str, Any]], None] | None,
    optimizer: torch.optim.Optimizer,
) -> Observers | None:
    """The run's observers as one, the function arguments first (as they always ran): on rank
    0 only, None on the other ranks and when there are none."""
    hooks = Observers(list(observers or []))
    if on_epoch_end is not None or save_state is not None:
        hooks.observers.insert(0, _Functions(on_epoch_end, save_state, optimizer))
    return hooks if hooks and distributed.is_main() else None


class _Functions(TrainingObserver):
    """``train_model``'s ``on_epoch_end`` and ``save_state`` function arguments as one more
    observer (benchmarks and tests pass functions; the train stage passes observers)."""

    def __init__(
        self,
        on_epoch_end: Callable[[EpochMetrics, nn.Module, torch.optim.Optimizer], None] | None,
        save_state: Callable[[dict[str, Any]], None] | None,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        self._on_epoch_end, self._save_state, self._optimizer = on_epoch_end, save_state, optimizer

    def on_epoch_end(self, epoch: int, scalars: Mapping[str, float], model: nn.Module) -> None:
        if self._on_epoch_end is not None:
            self._on_epoch_end(EpochMetrics.from_dict(scalars), model, self._optimizer)

    def save_state(self, state: dict[str, Any]) -> None:
        if self._save_state is not None:
            self._save_state(state)


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
    observers: Iterable[TrainingObserver] | None = None,
    resume: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
) -> TrainHistory:
    """Train ``model`` in place (the fit of torchvision's reference script: epochs of
    :func:`train_one_epoch` then :func:`validate`); return per-epoch metrics.

    ``observers`` (:class:`TrainingObserver`) get every step and epoch, and after every epoch
    the whole training state (without the weights, which are ``model``'s): passed back as
    ``resume`` (with the weights under ``"model"``), it continues the run exactly where it was.
    ``on_epoch_end(metrics, model, optimizer)`` and ``save_state(state)`` are the same hooks as
    plain functions. Under ``torchrun`` (see :mod:`imageclf.training.distributed`) each process
    trains a DDP replica on its shard of ``train``; the metrics are then over all ranks, and the
    hooks run on rank 0 only, with the unwrapped model."""
    run = _build(model, train, cfg, seed, loader, device)
    callbacks = _callbacks(observers, on_epoch_end, save_state, run.optimizer)
    if run.plan is not None and run.plan.features_only:
        return _fit_features(run, train, val, callbacks, progress, resume)
    # The global random state to put back once the first epoch's iterator exists (persistent
    # loader workers draw their base seed from it only then; see _restore).
    late_rng = _restore(resume, run) if resume is not None else None
    run.started = time.perf_counter()
    try:  # from epoch 1, or the one after the epoch a resumed run was saved after
        for epoch in range(run.history.resumed_after_epoch + 1, cfg.epochs + 1):
            if run.step >= run.total_steps:
                break
            scores = train_one_epoch(run, epoch, callbacks, progress, late_rng)
            late_rng = None
            if _end_epoch(run, validate(run, val, epoch, scores), callbacks):
                break
    finally:
        if callbacks is not None:
            callbacks.close()
    distributed.check_replicas_in_sync(model, run.device)
    if run.plan is not None:
        run.plan.release()
    run.history.seconds = run.elapsed()
    return run.history


def train_one_epoch(
    run: TrainingRun,
    epoch: int,
    callbacks: Observers | None,
    progress: bool,
    late_rng: dict[str, Any] | None = None,
) -> dict[str, float]:
    """One pass over the train loader, an optimizer step every ``train.accumulate_steps``
    batches; the epoch's train metrics (:meth:`_EpochSums.summary`)."""
    cfg, batches_per_epoch = run.cfg, len(run.loader)
    run.replica.train()
    toggle_requires_grad = distributed.world_size() == 1  # DDP: drop gradients instead
    frozen_params = run.plan.start_epoch(epoch, toggle_requires_grad) if run.plan else []
    t0 = time.perf_counter()
    sums = _EpochSums(run.device)
    # The bar counts steps; it is never handed the loader: tqdm.auto calls iter() on its
    # iterable when built and again when iterated, and with persistent workers each iter()
    # starts an epoch (a permutation drawn from the sampler's generator, batches prefetched),
    # so the data order, hence the weights, would depend on loader settings.
    bar = tqdm(
        total=batches_per_epoch,
        desc=f"epoch {epoch}/{cfg.epochs}",
        disable=None if progress else True,
        leave=False,
        mininterval=2.0,
    )
    batches = iter(run.loader)
    if late_rng is not None:
        restore_rng(late_rng)
    group_left = group_size = 0
    for index, (images, labels) in enumerate(batches):
        if group_left == 0:  # the first micro-batch of an optimizer step
            if run.step >= run.total_steps:
                break
            group_size = group_left = min(cfg.accumulate_steps, batches_per_epoch - index)
            run.optimizer.zero_grad(set_to_none=True)
        group_left -= 1
        images, targets = _to_device(run, images, labels, epoch, index)
        if callbacks is not None and run.step == 0 and index == 0:
            _show_first_batch(callbacks, run.model, images)
        loss, logits = _forward_backward(run, images, targets, epoch, group_size, group_left == 0)
        sums.add(loss, logits, hard_labels(targets))
        bar.update()
        if group_left == 0:  # the last micro-batch: step
            _optimizer_step(run, frozen_params, loss, sums, callbacks)
            if not bar.disable and run.step % cfg.log_every_steps == 0:
                bar.set_postfix(sums.running(), refresh=False)
    bar.close()
    return sums.summary(t0, cfg.grad_clip_norm)


def _to_device(
    run: TrainingRun, images: torch.Tensor, labels: torch.Tensor, epoch: int, index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of ``epoch`` on the device, channels_last, mixed (MixUp/CutMix: soft
    targets) when the run mixes batches."""
    images = images.to(run.device, non_blocking=True, memory_format=torch.channels_last)
    labels = labels.to(run.device, non_blocking=True)
    if run.mixer is None:
        return images, labels
    number = (epoch - 1) * len(run.loader) + index
    return mix_batch(run.mixer, images, labels, run.seed + distributed.rank(), number)


def _forward_backward(
    run: TrainingRun,
    images: torch.Tensor,
    targets: torch.Tensor,
    epoch: int,
    group_size: int,
    syncing: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of one micro-batch, after its backward: the loss scaled by 1/group_size
    (gradient accumulation) and by the fp16 scaler. DDP all-reduces the gradients only when
    ``syncing`` (the group's last micro-batch)."""
    sync = contextlib.nullcontext() if syncing else _no_sync(run.replica)
    with sync, anomaly_detection(run.cfg.detect_anomaly, epoch, run.step):
        autocast = (
            torch.autocast(run.device.type, dtype=run.dtype)
            if run.dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            logits = run.replica(images)
            loss = run.criterion(logits, targets)
        # A micro-batch's one host sync: training stops at the first non-finite loss, saying where.
        check_finite(loss, epoch, run.step)
        run.scaler.scale(loss / group_size if group_size > 1 else loss).backward()
    return loss, logits


def _optimizer_step(
    run: TrainingRun,
    frozen_params: list[nn.Parameter],
    loss: torch.Tensor,
    sums: _EpochSums,
    callbacks: Observers | None,
) -> None:
    """Unscale the gradients, measure (and clip) their norm, step the optimizer, the LR
    schedule and the EMA of the weights."""
    for p in frozen_params:  # DDP: no step for frozen groups (SGD and AdamW skip
        p.grad = None  # parameters without a gradient), as requires_grad must stay
    run.scaler.unscale_(run.optimizer)  # true gradients for the norm, clipping, observers
    if callbacks is not None:
        callbacks.after_backward(run.step, run.model)
    norm = grad_norm(list(run.model.parameters()), run.cfg.grad_clip_norm)
    lr = run.optimizer.param_groups[0]["lr"]  # the LR of this step (before the schedule's)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model)
    run.step += 1
    sums.norms.append(norm.detach())
    if callbacks is not None:
        callbacks.on_step_end(run.step, _StepScalars(loss, lr, norm, run.cfg.grad_clip_norm))


def validate(
    run: TrainingRun, val: Split | None, epoch: int, scores: dict[str, float]
) -> EpochMetrics:
    """The epoch's metrics: its train ``scores``, and the weights and their EMA on the
    validation split (every rank scores all of it)."""
    val_scores: tuple[float | None, float | None] = (None, None)
    ema_scores: tuple[float | None, float | None] = (None, None)
    if val is not None and len(val):
        val_scores = evaluate_loss_accuracy(
            run.model, val, run.criterion, run.cfg.batch_size, run.device
        )
        if run.ema is not None:
            ema_scores = evaluate_loss_accuracy(
                run.ema.module, val, run.criterion, run.cfg.batch_size, run.device
            )
    return EpochMetrics(
        epoch=epoch,
        **scores,
        val_loss=val_scores[0],
        val_accuracy=val_scores[1],
        lr=run.optimizer.param_groups[0]["lr"],
        ema_val_loss=ema_scores[0],
        ema_val_accuracy=ema_scores[1],
    )


def _end_epoch(run: TrainingRun, metrics: EpochMetrics, callbacks: Observers | None) -> bool:
    """Early stopping's verdict, the epoch's record and observers, then the resumable state;
    True when early stopping ends the run here."""
    cfg, epoch = run.cfg, metrics.epoch
    monitored = [v for v in (metrics.val_accuracy, metrics.ema_val_accuracy) if v is not None]
    stop = run.stopper.update(epoch, max(monitored) if monitored else None)
    run.history.best_epoch = run.stopper.best_epoch
    _record(run.history, metrics, run.model, callbacks)
    if callbacks is not None or distributed.world_size() > 1:  # a collective
        ranks = distributed.gather_objects(
            {"rng": capture_rng(), "loader": capture_loader(run.loader)}
        )
        if callbacks is not None:
            finished = stop or epoch == cfg.epochs or run.step >= run.total_steps
            callbacks.save_state(_state(run, epoch, finished, ranks))
    if stop:
        run.history.stopped_early = epoch < cfg.epochs
        log.info(
            "early stopping after epoch %d: val_accuracy has not improved by more than "
            "%g for %d epochs (best %.4f at epoch %d)",
            epoch,
            cfg.early_stopping_min_delta,
            cfg.early_stopping_patience,
            run.stopper.best,
            run.stopper.best_epoch,
        )
    return stop


def _record(
    history: TrainHistory, metrics: EpochMetrics, model: nn.Module, callbacks: Observers | None
) -> None:
    """An epoch's metrics into the history, the log and the observers: the one epoch ending of
    both training loops."""
    history.epochs.append(metrics)
    log.info("epoch %d: %s", metrics.epoch, metrics.as_dict())
    if callbacks is not None:
        callbacks.on_epoch_end(metrics.epoch, metrics.as_dict(), model)


def _state(run: TrainingRun, epoch: int, finished: bool, ranks: list[Any]) -> dict[str, Any]:
    """The resumable training state after ``epoch`` (without the weights), as :func:`_restore`
    reads it; ``ranks``: every rank's random and loader states."""
    return {
        "epoch": epoch,
        "step": run.step,
        "finished": finished,
        "seconds": run.elapsed(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "early_stopping": run.stopper.state_dict(),
        "history": [asdict(e) for e in run.history.epochs],
        "ranks": ranks,
    }


def _show_first_batch(watch: Observers, model: nn.Module, images: torch.Tensor) -> None:
    """``on_train_start`` without letting it change training: a graph trace runs the model,
    which would move BatchNorm's running statistics and draw from the global generator. Each
    module gets its own mode back (parents first): a transfer plan keeps frozen groups and
    frozen batch norm in eval mode, which a plain ``model.train()`` would undo."""
    buffers = [b.detach().clone() for b in model.buffers()]
    modes = {module: module.training for module in model.modules()}
    with torch.random.fork_rng(devices=[]):
        watch.on_train_start(model, images)
    with torch.no_grad():
        for saved, b in zip(buffers, model.buffers(), strict=True):
            b.copy_(saved)
    for module, training in modes.items():
        module.train(training)


def _no_sync(replica: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync`` (gradients accumulate locally, no all-reduce), else nothing."""
    if isinstance(replica, nn.parallel.DistributedDataParallel):
        return replica.no_sync()
    return contextlib.nullcontext()


def _restore(state: dict[str, Any], run: TrainingRun) -> dict[str, Any] | None:
    """Load a :func:`train_model` state into a freshly built run. Returns the global random
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
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        if state["ema"] is None:
            raise StageError("the checkpoint has no EMA weights but train.ema_decay is set")
        run.ema.load_state_dict(state["ema"])
    run.stopper.load_state_dict(state["early_stopping"])
    run.history.epochs = [EpochMetrics(**row) for row in state["history"]]
    run.history.best_epoch = run.stopper.best_epoch
    run.history.resumed_after_epoch = state["epoch"]
    run.step, run.seconds_before = state["step"], state["seconds"]
    restore_loader(run.loader, mine["loader"])
    if run.loader.num_workers > 0:
        return mine["rng"]
    restore_rng(mine["rng"])
    return None


def _fit_features(
    run: TrainingRun,
    train: Split,
    val: Split | None,
    callbacks: Observers | None,
    progress: bool,
    resume: dict[str, Any] | None,
) -> TrainHistory:
    """``train.transfer: features`` (:func:`fit_head_on_features`), observers closed after."""
    cfg = run.cfg
    if resume is not None or cfg.ema_decay > 0 or cfg.mixup_alpha or cfg.cutmix_alpha:
        log.info(
            "train.transfer: features fits a head in seconds on cached features: it does "
            "not resume, mix batches or keep an EMA"
        )
    try:
        history = fit_head_on_features(run, train, val, callbacks, progress)
    finally:
        if callbacks is not None:
            callbacks.close()
    if run.plan is not None:
        run.plan.release()
    return history


def fit_head_on_features(
    run: TrainingRun, train: Split, val: Split | None, callbacks: Observers | None, progress: bool
) -> TrainHistory:
    """``train.transfer: features``: the frozen backbone's features of the un-augmented train
    and val images, computed once, then only the classifier trained on them for every epoch.

    Batches come from the train loader's batch sampler, so the order (and any class-balanced
    sampling) is the loader's. The observers get the whole model (backbone and head), so the
    checkpoint is a normal one. Augmentation cannot apply to cached features."""
    cfg, device = run.cfg, run.device
    features, head = split_head(run.model)
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
    history, batches = TrainHistory(), run.loader.batch_sampler
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        t0, sums = time.perf_counter(), _EpochSums(device)
        # The bar counts steps and is never handed the sampler (see train_one_epoch on why).
        bar = tqdm(total=len(batches), desc=f"head {epoch}/{cfg.epochs}", disable=not progress)
        for batch in batches:
            if run.step >= run.total_steps:
                break
            # The loader's batch sampler may number its batches (augmentation seeds).
            rows = torch.as_tensor(getattr(batch, "indices", batch))
            x, y = train_x[rows].to(device), train_y[rows].to(device)
            run.optimizer.zero_grad(set_to_none=True)
            logits = head(x)
            loss = run.criterion(logits, y)
            check_finite(loss, epoch, run.step)
            loss.backward()
            sums.norms.append(grad_norm(list(head.parameters()), cfg.grad_clip_norm).detach())
            run.optimizer.step()
            run.scheduler.step()
            run.step += 1
            sums.add(loss, logits, y)
            bar.update()
        bar.close()
        scores = sums.summary(t0, cfg.grad_clip_norm)
        val_loss, val_acc = _head_scores(head, val_x, val, run)
        lr = run.optimizer.param_groups[0]["lr"]
        metrics = EpochMetrics(epoch, **scores, val_loss=val_loss, val_accuracy=val_acc, lr=lr)
        _record(history, metrics, run.model, callbacks)
        if callbacks is not None:  # the epoch's weights; seconds to redo, so not resumable
            finished = epoch == cfg.epochs or run.step >= run.total_steps
            callbacks.save_state(
                {"epoch": epoch, "step": run.step, "finished": finished, "resumable": False}
            )
        if run.step >= run.total_steps:
            break
    history.seconds = time.perf_counter() - started
    return history


@torch.inference_mode()
def _head_scores(
    head: nn.Module, val_x: torch.Tensor | None, val: Split | None, run: TrainingRun
) -> tuple[float | None, float | None]:
    """The head's validation loss and accuracy on the cached validation features, if any."""
    if val_x is None or val is None:
        return None, None
    head.eval()
    val_logits = head(val_x.to(run.device)).float().cpu()
    labels = torch.from_numpy(val.labels)
    val_loss = float(run.criterion(val_logits.to(run.device), labels.to(run.device)))
    return val_loss, float((val_logits.argmax(1) == labels).float().mean())


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

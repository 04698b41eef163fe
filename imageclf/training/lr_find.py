"""A learning-rate finder (fastai's ``learn.lr_find()``, Leslie Smith's LR range test).

From the run's real starting point (the model, weights and transfer setup ``prepare_run``
builds, the optimizer ``make_optimizer`` builds, the train loader with its batch size,
augmentation and sampler), train for a hundred or so optimizer steps while the learning rate
grows exponentially from ``start`` to ``end``, record the loss of every step and its smoothed
value (an exponential moving average, debiased: raw per-batch losses are too noisy to read), and
stop once the smoothed loss exceeds ``DIVERGE_FACTOR`` times the best one. The weights are
thrown away afterwards: nothing the train stage reads changes.

Three suggestions, all fastai's: ``minimum/10`` (the LR of the lowest smoothed loss divided by
10: at the minimum the loss is about to blow up), ``valley`` (the middle of the longest stretch
over which the loss keeps falling; fastai's default since 2021) and ``steepest`` (the steepest
descent against log LR). The one suggested is ``minimum/10``: on both of this project's tuned
configurations it lands within 1.3x-7x of the tuned ``train.lr`` where ``valley`` lands 10x-180x
below (docs/training.md, "Finding a learning rate"); the others are reported beside it.

The LR swept is ``train.lr``: the head's LR with discriminative LRs (lower layer groups keep
their ``train.layer_lr_decay`` ratios) and, with ``train.schedule: onecycle``, the peak of the
cycle, as fastai's ``fit_one_cycle(lr_max=...)`` takes the same suggestion.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from imageclf.config import TrainParams
from imageclf.data.loaders import LoaderSettings, loss_weights, make_loader
from imageclf.data.store import Split
from imageclf.errors import StageError
from imageclf.io import write_json, write_with
from imageclf.models.zoo import split_head
from imageclf.seeding import seed_everything
from imageclf.training.engine import (
    autocast_dtype,
    grad_norm,
    make_optimizer,
    mix_batch,
    select_device,
)
from imageclf.training.mixing import BatchMixer
from imageclf.training.spec import PreparedRun
from imageclf.training.transfer import TransferPlan, extract_features

# fastai's defaults (LRFinder, Recorder): 100 steps from 1e-7 to 10, stop when the smoothed
# loss is 4x the best; the suggestion ignores the first tenth (the loss has not moved yet) and
# the last 5 steps (already diverging). Smoothing: see smoothing_for.
DEFAULT_STEPS = 100
DEFAULT_START = 1e-7
DEFAULT_END = 10.0
SMOOTHING = 0.98  # fastai's, for its 100 steps
METHODS = ("minimum/10", "valley", "steepest")
DEFAULT_METHOD = "minimum/10"
DIVERGE_FACTOR = 4.0
SKIP_END = 5


@dataclass
class LRFindResult:
    """One sweep: the LR, raw loss and smoothed loss of every step, why it stopped, and the
    suggestions (None when too few steps were left to judge)."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    start: float
    end: float
    steps: int
    stopped: str  # "diverged", "non-finite loss" or "end of range"
    suggestions: dict[str, float | None] = field(default_factory=dict)
    method: str = DEFAULT_METHOD
    setup: dict[str, Any] = field(default_factory=dict)

    @property
    def suggestion(self) -> float | None:
        return self.suggestions.get(self.method)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["suggestion"] = self.suggestion
        out["set"] = config_line(self) if self.suggestion is not None else None
        columns = out.pop("lrs"), out.pop("losses"), out.pop("smoothed")
        out["curve"] = [
            {"lr": lr, "loss": loss, "smoothed": s} for lr, loss, s in zip(*columns, strict=True)
        ]
        return out


def lr_schedule(start: float, end: float, steps: int) -> np.ndarray:
    """``steps`` LRs growing exponentially from ``start`` to ``end`` (both included): equal
    steps on the log axis the curve is read on."""
    if not 0 < start < end:
        raise ValueError(f"the sweep needs 0 < start < end, got start {start}, end {end}")
    if steps < 2:
        raise ValueError(f"the sweep needs 2 steps or more, got {steps}")
    return start * (end / start) ** (np.arange(steps) / (steps - 1))


def smoothing_for(steps: int) -> float:
    """The moving average's factor for a sweep of ``steps``: fastai's 0.98 for its 100 steps,
    scaled so that any sweep lags the raw loss by the same share of the LR range. The lag is
    large (about half the sweep's steps) but the suggestion rules were calibrated on it: a
    less smoothed curve moves every suggestion lower (measured on both configurations in
    docs/training.md), further below the LRs those runs were tuned to."""
    return SMOOTHING ** (DEFAULT_STEPS / steps)


def sweep(
    step: Callable[[float], float],
    lrs: Sequence[float],
    beta: float | None = None,
    diverge: float = DIVERGE_FACTOR,
    progress: bool = False,
) -> tuple[list[float], list[float], list[float], str]:
    """Call ``step(lr)`` (one optimizer step at ``lr``, returning its loss) for each LR until
    the debiased moving average of the loss exceeds ``diverge`` times its best value or the
    loss is not finite. Returns the LRs run, raw losses, smoothed losses and why it stopped.
    ``beta``: the moving average's factor (default: :func:`smoothing_for` the sweep's length)."""
    beta = smoothing_for(len(lrs)) if beta is None else beta
    done, raw, smoothed = [], [], []
    average, best = 0.0, math.inf
    stopped = "end of range"
    for i, lr in enumerate(tqdm(lrs, desc="lr_find", disable=None if progress else True)):
        loss = step(float(lr))
        if not math.isfinite(loss):
            stopped = "non-finite loss"
            break
        average = beta * average + (1 - beta) * loss
        value = average / (1 - beta ** (i + 1))
        done.append(float(lr))
        raw.append(loss)
        smoothed.append(value)
        best = min(best, value)
        if value > diverge * best:
            stopped = "diverged"
            break
    return done, raw, smoothed, stopped


def valley(lrs: Sequence[float], losses: Sequence[float]) -> int:
    """fastai's ``valley``: the index halfway along the longest decreasing run of ``losses``
    (a longest decreasing subsequence, so noise does not cut it short); a robust pick that
    lies where the loss is still falling fast, away from both the flat start and the cliff."""
    n = len(losses)
    length = [1] * n
    end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and length[i] < length[j] + 1:
                length[i] = length[j] + 1
        if length[i] > length[end]:
            end = i
    begin = end - length[end]
    third = (end - begin) / 3
    return max(0, begin + int(third) + int(third / 2))


def steepest(lrs: Sequence[float], losses: Sequence[float]) -> int:
    """The index where the loss falls fastest per unit of log LR (fastai's ``steep``)."""
    slope = np.diff(np.asarray(losses)) / np.diff(np.log(np.asarray(lrs)))
    return int(np.argmin(slope))


def suggest(lrs: Sequence[float], smoothed: Sequence[float], steps: int) -> dict[str, float | None]:
    """The three suggestions on the smoothed curve without its first tenth of ``steps`` and
    last ``SKIP_END`` points, as fastai reads it; None for each when fewer than 3 points remain
    (the loss diverged almost at once: the sweep must start lower)."""
    kept = slice(steps // 10, len(lrs) - SKIP_END)
    x, y = list(lrs[kept]), list(smoothed[kept])
    if len(x) < 3:
        return dict.fromkeys(METHODS)
    return {
        "valley": x[valley(x, y)],
        "minimum/10": x[int(np.argmin(y))] / 10,
        "steepest": x[steepest(x, y)],
    }


def _forever(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches, epoch after epoch, as long as the sweep asks."""
    while True:
        yield from loader


def find_lr(
    prepared: PreparedRun,
    *,
    steps: int = DEFAULT_STEPS,
    start: float = DEFAULT_START,
    end: float = DEFAULT_END,
    epoch: int | None = None,
    loader: LoaderSettings | None = None,
    device: torch.device | None = None,
    method: str = DEFAULT_METHOD,
    progress: bool = False,
) -> LRFindResult:
    """Sweep the LR on ``prepared``'s model (changed in place: discard it afterwards) as the
    train stage would train it: same optimizer and parameter groups, loader, augmentation,
    batch mixing, loss, precision, clipping and accumulation.

    ``epoch`` (1-based, default ``train.epochs``): which layer groups learn, as in that epoch of
    the run. With ``train.freeze_epochs`` the default sweeps the fine-tuning of the whole model
    (most of the run) and ``epoch=1`` the head-only epochs. ``method``: one of ``METHODS``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cfg = prepared.params.train
    lrs = lr_schedule(start, end, steps)
    device = device or select_device()
    step, plan, run_epoch = _training_step(prepared, epoch or cfg.epochs, loader, device)
    done, raw, smoothed, stopped = sweep(step, lrs, progress=progress)
    if plan is not None:
        plan.release()
    setup = {
        "model": cfg.model,
        "pretrained": cfg.pretrained or cfg.init_from or "",
        "optimizer": cfg.optimizer,
        "batch_size": cfg.batch_size,
        "accumulate_steps": cfg.accumulate_steps,
        "schedule": cfg.schedule,
        "layer_lr_decay": cfg.layer_lr_decay,
        "epoch": run_epoch,
        "current_lr": cfg.lr,
        "device": device.type,
    }
    suggestions = suggest(done, smoothed, steps)
    return LRFindResult(done, raw, smoothed, start, end, steps, stopped, suggestions, method, setup)


@dataclass
class _Step:
    """One optimizer step of the train stage's loop (``train_model``) at a given LR: every
    parameter group at ``lr`` times its ratio to ``train.lr``, accumulation, mixing, autocast,
    the gradient scaler and clipping as the engine does them. Returns the mean loss, or inf."""

    cfg: TrainParams
    net: nn.Module
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    mixer: BatchMixer | None
    seed: int
    device: torch.device
    dtype: torch.dtype | None
    number: int = 0  # batches drawn (mixing's seed)
    ratios: list[float] = field(init=False)
    params: list[nn.Parameter] = field(init=False)
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        # Each group's LR relative to train.lr (discriminative LRs keep their ratios).
        self.ratios = [group["lr"] / self.cfg.lr for group in self.optimizer.param_groups]
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def __call__(self, lr: float) -> float:
        for group, ratio in zip(self.optimizer.param_groups, self.ratios, strict=True):
            group["lr"] = lr * ratio
        self.optimizer.zero_grad(set_to_none=True)
        micro, total = self.cfg.accumulate_steps, 0.0
        for _ in range(micro):
            images, labels = next(self.batches)
            fmt = torch.channels_last if images.ndim == 4 else torch.contiguous_format
            images = images.to(self.device, non_blocking=True, memory_format=fmt)
            targets = labels = labels.to(self.device, non_blocking=True)
            if self.mixer is not None:
                images, targets = mix_batch(self.mixer, images, labels, self.seed, self.number)
            self.number += 1
            autocast = (
                torch.autocast(self.device.type, dtype=self.dtype)
                if self.dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                loss = self.criterion(self.net(images), targets)
            if not torch.isfinite(loss):
                return math.inf
            self.scaler.scale(loss / micro).backward()
            total += loss.item()
        self.scaler.unscale_(self.optimizer)
        grad_norm(self.params, self.cfg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total / micro


def _training_step(
    prepared: PreparedRun, epoch: int, loader: LoaderSettings | None, device: torch.device
) -> tuple[_Step, TransferPlan | None, int]:
    """What ``train_model`` builds before its first step, set up as in ``epoch``: the step, the
    transfer plan (to release afterwards) and the epoch swept (0: a head on cached features)."""
    cfg, seed, model, train = (
        prepared.params.train, prepared.params.seed, prepared.model, prepared.train
    )  # fmt: skip
    seed_everything(seed)
    model.to(device=device, memory_format=torch.channels_last)
    pretrained = bool(cfg.pretrained or cfg.init_from)
    plan = None
    if TransferPlan.needed(cfg, pretrained):
        plan = TransferPlan.for_model(model, cfg, pretrained)
        plan.prepare()
    train_loader = make_loader(
        train,
        cfg.batch_size,
        shuffle=True,
        seed=seed,
        settings=loader,
        drop_last=len(train) > cfg.batch_size,
        augment=cfg.augment,
        balance=cfg.class_balance == "sampler",
    )
    optimizer = make_optimizer(model, cfg, plan)
    num_classes = split_head(model)[1].out_features
    criterion = nn.CrossEntropyLoss(
        weight=loss_weights(cfg, train.labels, num_classes, device),
        label_smoothing=cfg.label_smoothing,
    )
    mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
    mixer = BatchMixer.from_params(cfg, num_classes) if mixing else None
    if plan is not None and plan.features_only:  # a head on cached features: nothing to mix
        net, batches = _head_on_features(model, train, train_loader, cfg.batch_size, device)
        mixer, epoch = None, 0
    else:
        net, batches = model, _forever(train_loader)
        model.train()
        if plan is not None:
            plan.start_epoch(epoch, toggle_requires_grad=True)
    dtype = autocast_dtype(cfg.precision, device)
    step = _Step(cfg, net, batches, optimizer, criterion, mixer, seed, device, dtype)
    return step, plan, epoch


def _head_on_features(
    model: nn.Module,
    train: Split,
    loader: torch.utils.data.DataLoader,
    batch_size: int,
    device: torch.device,
) -> tuple[nn.Module, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """``train.transfer: features``: the head and batches of the frozen backbone's features of
    the un-augmented images (computed once), in the loader's batch order, as training does."""
    features, head = split_head(model)
    x = extract_features(features, train.images, batch_size, device)
    y = torch.from_numpy(train.labels)
    head.train()

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            for batch in loader.batch_sampler:
                rows = torch.as_tensor(getattr(batch, "indices", batch))
                yield x[rows], y[rows]

    return head, batches()


def config_line(result: LRFindResult) -> str:
    """What to set, with two significant digits (an LR is never known more precisely)."""
    value = result.suggestion
    if value is None:
        raise StageError(
            f"the loss diverged after {len(result.lrs)} of {result.steps} steps, too soon to "
            f"suggest a learning rate: sweep from a lower --start than {result.start:g}."
        )
    return f"train.lr: {float(f'{value:.2g}'):g}"


def summary(result: LRFindResult) -> str:
    """One line: the suggestion, its method, the other two methods and what to set."""
    setting = config_line(result)  # a StageError when there is no suggestion
    s = result.suggestions
    others = ", ".join(f"{m} {s[m]:.2g}" for m in METHODS if m != result.method)
    schedule = result.setup.get("schedule")
    peak = " (train.schedule onecycle: the peak LR of the cycle)" if schedule == "onecycle" else ""
    return (
        f"suggested LR {result.suggestion:.2g} (fastai's {result.method} rule; {others}); "
        f"set `{setting}`{peak}"
    )


def plot_lr_find(result: LRFindResult, path: Path) -> Path:
    """Smoothed loss (and the faint raw loss) against LR on a log axis, the suggestions
    marked, and params.yaml's current train.lr as a dotted line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lrs, smoothed = np.asarray(result.lrs), np.asarray(result.smoothed)
    ax.plot(lrs, result.losses, color="0.75", lw=0.8, label="loss per step")
    ax.plot(lrs, smoothed, color="C0", lw=2, label="smoothed loss")
    ax.set_xscale("log")
    # Readable range: from just below the lowest loss (raw: it shows how far the smoothed
    # curve lags) to a little above the starting loss (the diverging tail would otherwise
    # flatten everything else).
    if len(smoothed):
        low = min(float(smoothed.min()), float(np.min(result.losses)))
        first = float(smoothed[: max(1, len(smoothed) // 10)].max())
        span = max(first - low, 1e-3)
        ax.set_ylim(low - 0.1 * span, first + 0.5 * span)
    styles = {"valley": ("C3", "o"), "minimum/10": ("C2", "v"), "steepest": ("C1", "s")}
    for method, value in result.suggestions.items():
        if value is None:
            continue
        color, marker = styles[method]
        y = float(np.interp(np.log(value), np.log(lrs), smoothed))
        size = 10 if method == result.method else 7
        label = f"{method}: {value:.2g}" + (" (suggested)" if method == result.method else "")
        ax.plot([value], [y], marker=marker, color=color, ms=size, ls="", label=label)
    current = result.setup.get("current_lr")
    if current:
        ax.axvline(current, color="0.4", ls=":", label=f"train.lr now: {current:g}")
    ax.set_xlabel("learning rate (train.lr)")
    ax.set_ylabel("training loss")
    setup = result.setup
    ax.set_title(
        f"LR finder: {setup.get('model')}, {setup.get('optimizer')}, batch "
        f"{setup.get('batch_size')}; {len(result.lrs)} steps, {result.stopped}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), suffix=".png")


def write_lr_find(result: LRFindResult, json_path: Path, png_path: Path) -> None:
    """The curve and suggestions as JSON, and the plot, each written atomically."""
    write_json(json_path, result.as_dict())
    plot_lr_find(result, png_path)

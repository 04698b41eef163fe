"""Debugging a network that trains badly (course module 6), as tools the loop runs for you.

- :class:`GradientFlow`: per-layer gradient norms every few steps and the classic gradient-flow
  plot; layers whose gradient is zero or vanishing (or exploding) are named.
- :class:`ActivationStats`: forward hooks on the activation modules: mean, std, share of zeros,
  dead ReLU units (a channel that is 0 for a whole batch), saturation of bounded activations.
- :func:`check_model_accepts` / :func:`explain_forward`: when the model and the input disagree
  on a shape, an error that names the layer, what it expects, what it got and what to change.
- :func:`shuffled_label_run`: train briefly on random labels; validation accuracy must stay at
  chance, or the labels reach the model some other way than the label array.

The observers only read tensors (no in-place change, no random numbers), so the weights after
a run are the same with and without them, and their hooks return at once on steps they skip.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from imageclf.config import AugmentStep, DataloaderCheckParams
from imageclf.data.loaders import make_loader
from imageclf.data.store import Split
from imageclf.errors import InvalidInput, StageError
from imageclf.io import write_json, write_with
from imageclf.models.zoo import Normalize
from imageclf.seeding import seed_everything
from imageclf.training.engine import predict_logits
from imageclf.training.observers import TrainingObserver

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

# What "zero", "vanishing" and "exploding" mean for a layer's gradient. A gradient that is 0 to
# float precision at every sampled step means the layer never learns (its units are dead, or
# it is cut off from the loss); vanishing/exploding are relative to the median layer, because
# the absolute scale depends on the loss and the learning rate.
ZERO_GRADIENT = 1e-12
VANISHING_RATIO = 1e-3
EXPLODING_RATIO = 1e3
# A bounded activation counts as saturated within this share of its range from either bound
# (sigmoid below 0.01 or above 0.99, tanh beyond +-0.98): there its gradient is almost 0.
SATURATION_MARGIN = 0.01
# Activation modules the hooks watch. Activations called as functions (F.relu, or vit_tiny's
# layers.gelu) have no module to hook and are not seen.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
)
# Activations whose output is exactly 0 for every negative input: a unit that is 0 on a whole
# batch gets no gradient and may never recover (a "dead ReLU").
ZERO_FLOORED: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


def is_sampled(step: int, every: int, first: bool) -> bool:
    """The first step of a run and every ``every``-th after: the steps the tools look at."""
    return first or step % every == 0


def parameter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules owning trainable parameters themselves (conv, linear, norm, ...), by name."""
    return [
        (name or type(model).__name__, module)
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    ]


class GradientFlow(TrainingObserver):
    """Per-layer gradient statistics (mean and max |grad|, L2 norm) every ``every`` steps.

    Kept in memory, sent to TensorBoard when a writer is given (``grad_norm/<layer>``), and on
    close written as the gradient-flow plot (layers in forward order, log scale) and its JSON.
    """

    def __init__(
        self,
        every: int,
        plot_path: Path,
        report_path: Path,
        writer: SummaryWriter | None = None,
    ) -> None:
        self.every = every
        self.plot_path, self.report_path = plot_path, report_path
        self.writer = writer
        self.samples: list[dict[str, Any]] = []
        self._order: list[str] = []
        self._order_hooks: list[Any] = []
        self._types: dict[str, str] = {}
        self._closed = False

    def on_train_start(self, model: nn.Module, images: torch.Tensor) -> None:
        layers = parameter_layers(model)
        self._types = {name: type(module).__name__ for name, module in layers}
        # The first training forward tells the order; the hooks go at the first backward.
        for name, module in layers:

            def record(_module: nn.Module, _inputs: Any, name: str = name) -> None:
                if name not in self._order:
                    self._order.append(name)

            self._order_hooks.append(module.register_forward_pre_hook(record))

    def _remove_order_hooks(self) -> None:
        for handle in self._order_hooks:
            handle.remove()
        self._order_hooks = []

    def after_backward(self, step: int, model: nn.Module) -> None:
        first = not self.samples
        self._remove_order_hooks()
        if not is_sampled(step, self.every, first):
            return
        names, stats = [], []
        for name, module in parameter_layers(model):
            grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
            names.append(name)
            if not grads:  # unused in this forward: no gradient reached it
                stats.append(torch.zeros(3))
                continue
            flat = torch.cat([g.detach().float().abs().flatten() for g in grads])
            stats.append(torch.stack([flat.mean(), flat.max(), flat.norm()]).cpu())
        values = torch.stack(stats).tolist() if stats else []
        layers = {
            n: {"mean_abs_grad": v[0], "max_abs_grad": v[1], "grad_norm": v[2]}
            for n, v in zip(names, values, strict=True)
        }
        self.samples.append({"step": step, "layers": layers})
        if self.writer is not None:
            for name, row in layers.items():
                self.writer.add_scalar(f"grad_norm/{name}", row["grad_norm"], step)

    def layer_order(self) -> list[str]:
        """Forward order, then any layer the forward never called (definition order)."""
        seen = set(self._order)
        rest = [n for s in self.samples for n in s["layers"] if n not in seen]
        return self._order + list(dict.fromkeys(rest))

    def summary(self) -> list[dict[str, Any]]:
        """One row per layer over the sampled steps, flagged ok/zero/vanishing/exploding."""
        rows = []
        for name in self.layer_order():
            series = [s["layers"][name] for s in self.samples if name in s["layers"]]
            if not series:
                continue
            rows.append(
                {
                    "layer": name,
                    "type": self._types.get(name, ""),
                    "mean_abs_grad": float(np.mean([r["mean_abs_grad"] for r in series])),
                    "max_abs_grad": float(np.max([r["max_abs_grad"] for r in series])),
                    "grad_norm": float(np.mean([r["grad_norm"] for r in series])),
                }
            )
        finite = [r["mean_abs_grad"] for r in rows if math.isfinite(r["mean_abs_grad"])]
        median = float(np.median(finite)) if finite else 0.0
        for row in rows:
            row["status"] = gradient_status(row, median)
        return rows

    def close(self) -> None:
        self._remove_order_hooks()
        if self._closed or not self.samples:
            self._closed = True
            return
        self._closed = True
        rows = self.summary()
        flagged = {r["layer"]: r["status"] for r in rows if r["status"] != "ok"}
        if flagged:
            log.warning("gradient flow: %s", ", ".join(f"{k} {v}" for k, v in flagged.items()))
        write_json(
            self.report_path,
            {
                "steps": [s["step"] for s in self.samples],
                "every": self.every,
                "thresholds": {
                    "zero": ZERO_GRADIENT,
                    "vanishing_ratio_to_median": VANISHING_RATIO,
                    "exploding_ratio_to_median": EXPLODING_RATIO,
                },
                "flagged": flagged,
                "layers": rows,
                "per_step": self.samples,
            },
        )
        plot_gradient_flow(rows, self.plot_path)


def gradient_status(row: Mapping[str, Any], median: float) -> str:
    mean, largest = row["mean_abs_grad"], row["max_abs_grad"]
    if not (math.isfinite(mean) and math.isfinite(largest)):
        return "non_finite"
    if largest <= ZERO_GRADIENT:
        return "zero"
    if median > 0 and mean < VANISHING_RATIO * median:
        return "vanishing"
    if median > 0 and mean > EXPLODING_RATIO * median:
        return "exploding"
    return "ok"


def plot_gradient_flow(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Bars of max and mean |grad| per layer (forward order, log scale); flagged layers red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.35 * len(rows) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    floor = ZERO_GRADIENT  # log scale: a zero gradient is drawn at the floor, and flagged
    ax.bar(x, [max(r["max_abs_grad"], floor) for r in rows], color="c", alpha=0.4, label="max")
    ax.bar(x, [max(r["mean_abs_grad"], floor) for r in rows], color="b", alpha=0.8, label="mean")
    ax.set_yscale("log")
    ax.set_xticks(x, [r["layer"] for r in rows], rotation=90, fontsize=7)
    for tick, row in zip(ax.get_xticklabels(), rows, strict=True):
        if row["status"] != "ok":
            tick.set_color("red")
    ax.set_ylabel("|gradient| (mean over sampled steps)")
    ax.set_title("Gradient flow, input → output (red: zero, vanishing or exploding)")
    ax.legend()
    fig.tight_layout()
    return write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), suffix=".png")


def _bounds(module: nn.Module) -> tuple[float, float] | None:
    """The output range of a bounded activation (saturation is measured near its ends)."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 included
        return float(module.min_val), float(module.max_val)
    if isinstance(module, nn.Sigmoid | nn.Hardsigmoid):
        return 0.0, 1.0
    if isinstance(module, nn.Tanh):
        return -1.0, 1.0
    return None


def _unit_dim(x: torch.Tensor) -> int:
    """Channels of a conv map (N, C, H, W), features of (N, F) or tokens (N, T, F)."""
    return 1 if x.dim() == 4 else x.dim() - 1


class ActivationStats(TrainingObserver):
    """Forward hooks on every activation module, read on sampled steps only (train mode, the
    first forward of the step): the input (the output of the layer feeding it) and the output.

    The hooks compute statistics of detached tensors and keep no reference to them; on the other
    steps they return at once. An in-place ReLU overwrites its input, so the input is read in a
    forward *pre*-hook, before the activation runs.
    """

    def __init__(self, every: int, report_path: Path, writer: SummaryWriter | None = None) -> None:
        self.every, self.report_path, self.writer = every, report_path, writer
        self.samples: list[dict[str, Any]] = []
        self.handles: list[Any] = []
        self.watched: list[str] = []
        self._armed = False
        self._last_step = -1
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._closed = False

    def on_train_start(self, model: nn.Module, images: torch.Tensor) -> None:
        for name, module in model.named_modules():
            if not isinstance(module, ACTIVATIONS):
                continue
            self.watched.append(name)
            self.handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self.handles.append(module.register_forward_hook(self._hook(name, module)))
        if not self.watched:
            log.warning(
                "activation statistics: %s has no activation modules to hook (activations "
                "called as functions are not seen)",
                type(model).__name__,
            )
        self._armed = True  # the first step is always sampled

    def _pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if not self._armed or not module.training or f"{name}:in" in self._pending:
                return
            if inputs and isinstance(inputs[0], torch.Tensor):
                with torch.no_grad():
                    x = inputs[0].detach().float()
                    self._pending[f"{name}:in"] = {"mean": x.mean(), "std": x.std()}

        return hook

    def _hook(self, name: str, owner: nn.Module) -> Any:
        bounds = _bounds(owner)
        zero_floored = isinstance(owner, ZERO_FLOORED)

        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if not self._armed or not module.training or name in self._pending:
                return
            if not isinstance(output, torch.Tensor):
                return
            with torch.no_grad():
                x = output.detach().float()
                stats = {"mean": x.mean(), "std": x.std(), "zeros": (x == 0).float().mean()}
                if zero_floored and x.dim() >= 2:
                    dim = _unit_dim(x)
                    alive = (x != 0).transpose(0, dim).reshape(x.shape[dim], -1).any(dim=1)
                    stats["dead_units"] = 1.0 - alive.float().mean()
                if bounds is not None:
                    lo, hi = bounds
                    margin = SATURATION_MARGIN * (hi - lo)
                    stats["saturated"] = ((x <= lo + margin) | (x >= hi - margin)).float().mean()
                self._pending[name] = stats

        return hook

    def after_backward(self, step: int, model: nn.Module) -> None:
        self._last_step = step
        if not self._armed:
            return
        self._armed = False
        if not self._pending:
            return
        layers: dict[str, dict[str, float]] = {}
        for name in self.watched:
            row = {k: float(v) for k, v in self._pending.get(name, {}).items()}
            inputs = self._pending.get(f"{name}:in", {})
            row.update({f"input_{k}": float(v) for k, v in inputs.items()})
            if row:
                layers[name] = row
        self._pending = {}
        self.samples.append({"step": step, "layers": layers})
        if self.writer is not None:
            for name, row in layers.items():
                for key, value in row.items():
                    self.writer.add_scalar(f"activations/{name}/{key}", value, step)

    def on_step_end(self, step: int, scalars: Mapping[str, float]) -> None:
        # Armed for the next step's forward when after_backward will number it sampled (counted
        # from after_backward's own numbering, whatever number on_step_end is given).
        self._armed = (self._last_step + 1) % self.every == 0

    def summary(self) -> list[dict[str, Any]]:
        """Per activation, the mean of each statistic over the sampled steps; the dead-unit
        share is the *last* sample's (units that died during training are what matters)."""
        rows = []
        for name in self.watched:
            series = [s["layers"][name] for s in self.samples if name in s["layers"]]
            if not series:
                continue
            row: dict[str, Any] = {"layer": name}
            for key in series[-1]:
                row[key] = float(np.mean([r[key] for r in series if key in r]))
            if "dead_units" in series[-1]:
                row["dead_units"] = series[-1]["dead_units"]
            rows.append(row)
        return rows

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def close(self) -> None:
        self.remove_hooks()
        if self._closed or not self.samples:
            self._closed = True
            return
        self._closed = True
        rows = self.summary()
        dead = {r["layer"]: r["dead_units"] for r in rows if r.get("dead_units", 0) > 0}
        if dead:
            log.warning(
                "dead units (0 for a whole batch): %s",
                ", ".join(f"{k} {v:.0%}" for k, v in dead.items()),
            )
        write_json(
            self.report_path,
            {
                "steps": [s["step"] for s in self.samples],
                "every": self.every,
                "saturation_margin": SATURATION_MARGIN,
                "dead_units": dead,
                "layers": rows,
                "per_step": self.samples,
            },
        )


# ------------------------------------------------------------------ shapes: model vs input
class ShapeMismatch(InvalidInput):
    """The model and its input disagree on a shape; the message says where and what to change."""


def _shapes(inputs: Any) -> list[list[int]]:
    items = inputs if isinstance(inputs, tuple | list) else (inputs,)
    return [list(t.shape) for t in items if isinstance(t, torch.Tensor)]


def _what_to_change(name: str, module: nn.Module, got: list[list[int]], first: bool) -> str:
    """What the layer expects, against what it got, and the setting that fixes it."""
    shape = got[0] if got else []
    label = f"layer {name!r} ({type(module).__name__})"
    if isinstance(module, nn.modules.conv._ConvNd):
        channels = shape[1] if len(shape) > 1 else "?"
        fix = (
            "set data.channels to match the model (or rebuild the model for the data's channels)"
            if first
            else "the layers before it produce another channel count: the model is inconsistent"
        )
        return (
            f"{label} expects in_channels={module.in_channels}, got input of shape {shape} "
            f"({channels} channels): {fix}."
        )
    if isinstance(module, nn.Linear):
        got_features = shape[-1] if shape else "?"
        return (
            f"{label} expects in_features={module.in_features}, got input of shape {shape} "
            f"({got_features} features): the features reaching it follow from the image size, "
            "so set data.image_size to the size the model was built for (build_model's "
            "image_size), or rebuild the model for this data."
        )
    if isinstance(module, nn.LayerNorm):
        return (
            f"{label} expects normalized_shape={list(module.normalized_shape)} as the last "
            f"dimension(s), got input of shape {shape}: the model was built for another width "
            "or image size (data.image_size, train.width)."
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (
            f"{label} expects num_features={module.num_features} channels, got input of shape "
            f"{shape}: the layers before it disagree with the model's width."
        )
    return (
        f"{label} failed on input of shape {shape}: the model was built for another input; "
        "check data.channels and data.image_size against the model."
    )


def explain_forward(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """``model(example)``; a shape error comes back as :class:`ShapeMismatch` naming the
    innermost module that raised it (qualified name, type), what it expects and what it got."""
    stack: list[tuple[str, nn.Module, list[list[int]]]] = []
    handles = []
    first_weighted: list[str] = []

    def enter(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any) -> None:
            if not first_weighted and isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
                first_weighted.append(name)
            stack.append((name, module, _shapes(inputs)))

        return hook

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name or "<model>")))
        handles.append(module.register_forward_hook(leave))
    try:
        return model(example)
    except RuntimeError as exc:
        if not stack:
            raise
        name, module, got = stack[-1]
        first = bool(first_weighted) and first_weighted[0] == name
        raise ShapeMismatch(
            f"{_what_to_change(name, module, got, first)} (model input {list(example.shape)}; "
            f"torch said: {str(exc).splitlines()[0]})"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()


def check_model_accepts(model: nn.Module, input_shape: Sequence[int]) -> Any:
    """Run one forward on zeros of ``(2, *input_shape)`` (C, H, W) in eval mode, without
    gradients or random numbers and with the modes restored; return the output's shape (a
    tuple of shapes for a model returning several tensors) or raise :class:`ShapeMismatch`.
    Call it before training: a mismatch then costs a second, not a failed epoch."""
    shape = tuple(int(s) for s in input_shape)
    first = next(iter(model.modules()))
    if isinstance(first, nn.Sequential) and len(first) and isinstance(first[0], Normalize):
        # Broadcasting would silently turn a 1-channel input into 3 (or fail confusingly).
        expected = first[0].mean.shape[1]
        if shape and shape[0] != expected:
            raise ShapeMismatch(
                f"layer '0' (Normalize) expects {expected} channel(s), got input of shape "
                f"{[2, *shape]} ({shape[0]} channels): set data.channels: {expected}, or "
                "rebuild the model for the data's channels."
            )
    modes = {m: m.training for m in model.modules()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        with torch.no_grad():
            out = explain_forward(model, torch.zeros((2, *shape), device=device))
    finally:
        for module, mode in modes.items():
            module.train(mode)
    if isinstance(out, tuple | list):
        return tuple(tuple(o.shape) for o in out)
    return tuple(out.shape)


# ------------------------------------------------------------- sanity run on shuffled labels
class LabelLeak(StageError):
    """A model trained on random labels predicts the true ones: labels leak into training."""


# Class namings drawn at random when there are too many to try all (more than 8! = 40320):
# this many per unit of significance level, so the p-value's own noise is small beside it.
NAMINGS_PER_ALPHA = 100
EXACT_NAMINGS_UP_TO = 8


def shuffled_labels(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Random labels with the true class carrying no information: within each true class every
    label is used equally often (up to one), in a seeded random order (a plain permutation would
    leave each class a chance preference for some label)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    out = np.empty_like(labels)
    for cls in np.unique(labels):
        where = np.flatnonzero(labels == cls)
        cycle = np.resize(rng.permutation(num_classes), len(where))
        out[where] = rng.permutation(cycle)
    return out


def naming_p_value(confusion: np.ndarray, alpha: float, seed: int) -> float:
    """The share of the ways to name the classes (permutations of the predicted classes) under
    which the model scores at least as well as under the true naming, the true one included.

    A model that learned nothing about the classes treats every naming alike (its random labels
    were symmetric in the class names), so the true naming's rank among them is uniform: this
    is an exact permutation test, whatever the data's clusters make its predictions share."""
    c = len(confusion)
    true = np.trace(confusion)
    rows = np.arange(c)
    if c <= EXACT_NAMINGS_UP_TO:
        namings = np.array(list(itertools.permutations(range(c))))
        scores = confusion[rows, namings].sum(axis=1)
        return float(np.mean(scores >= true))
    rng = np.random.default_rng(seed)
    draws = math.ceil(NAMINGS_PER_ALPHA / alpha)
    namings = np.argsort(rng.random((draws, c)), axis=1)
    scores = confusion[rows, namings].sum(axis=1)
    return float((np.sum(scores >= true) + 1) / (draws + 1))


def _predictions(model: nn.Module, split: Split, batch_size: int) -> np.ndarray:
    return predict_logits(model, split.images, batch_size).argmax(1).numpy()


def _draw_subsets(
    train: Split, val: Split, num_classes: int, cfg: DataloaderCheckParams, seed: int
) -> tuple[Split, np.ndarray, Split]:
    """The training images, their random labels and the validation images the check uses."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(train), min(cfg.shuffled_train_images, len(train)), False))
    part = train.subset(pick)
    random_labels = shuffled_labels(part.labels, num_classes, seed)
    held = val.subset(np.sort(rng.choice(len(val), min(cfg.shuffled_val_images, len(val)), False)))
    return part, random_labels, held


def _train_on_random_labels(
    model: nn.Module,
    split: Split,
    cfg: DataloaderCheckParams,
    seed: int,
    augment: Sequence[AugmentStep],
) -> list[float]:
    """Train through the real loader for ``cfg.shuffled_steps`` steps; each step's loss."""
    seed_everything(seed)
    loader = make_loader(split, cfg.shuffled_batch_size, shuffle=True, seed=seed, augment=augment)
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.overfit_lr)
    criterion = nn.CrossEntropyLoss()
    model.train()
    losses: list[float] = []
    while len(losses) < cfg.shuffled_steps:
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == cfg.shuffled_steps:
                break
    return losses


@dataclass(frozen=True)
class _NamingTest:
    """How well the true class names fit the predictions on held-out images, and the verdict."""

    val_accuracy: float
    p_value: float
    testable: bool
    leaked: bool


def _naming_test(
    model: nn.Module, held: Split, num_classes: int, cfg: DataloaderCheckParams, seed: int
) -> _NamingTest:
    """Score the true labels and test them against every other naming of the classes."""
    predicted = _predictions(model, held, cfg.shuffled_batch_size)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (held.labels, predicted), 1)
    val_accuracy = float(np.trace(confusion) / len(held))
    testable = math.factorial(num_classes) * cfg.shuffled_max_p >= 1
    p_value = naming_p_value(confusion, cfg.shuffled_max_p, seed)
    leaked = testable and p_value <= cfg.shuffled_max_p
    return _NamingTest(val_accuracy, p_value, testable, leaked)


def _warn_or_raise(test: _NamingTest, num_classes: int, cfg: DataloaderCheckParams) -> None:
    """Say when the check cannot decide, and stop the run on a leak."""
    if not test.testable:
        log.warning(
            "shuffled-label check: %d classes have only %d namings, too few for p <= %g in one "
            "run; it cannot tell a leak here.",
            num_classes,
            math.factorial(num_classes),
            cfg.shuffled_max_p,
        )
    if test.leaked:
        raise LabelLeak(
            f"A model trained on shuffled labels scored {test.val_accuracy:.1%} on the "
            f"validation images' true labels (chance {1 / num_classes:.1%}), better than all but "
            f"{test.p_value:.2g} of the ways to name the {num_classes} classes (limit "
            f"{cfg.shuffled_max_p:g}): it knows the classes although its labels were random, so "
            "the labels reach the model another way than the label array (labels derived from "
            "the image order or file names, or written into the input by preprocessing). Find "
            "and fix the leak before training."
        )


def shuffled_label_run(
    model: nn.Module,
    train: Split,
    val: Split,
    num_classes: int,
    cfg: DataloaderCheckParams,
    seed: int,
    augment: Sequence[AugmentStep] = (),
) -> dict[str, Any]:
    """Train ``model`` briefly on ``cfg.shuffled_train_images`` training images with random
    labels, then score the true labels of ``cfg.shuffled_val_images`` validation images.

    Training accuracy (on the random labels) may rise: a network can memorise anything. Val
    accuracy must stay at chance, 1/classes, *on average*: one run's predictions are shared by
    whole clusters of similar images, so a leak-free run can land well above 1/classes (seen:
    17.9% for 10 classes of Fashion-MNIST, where a binomial 5-sigma bound was 14.7%). The test
    is therefore whether the true class names fit the predictions better than nearly every
    other naming of the classes (:func:`naming_p_value` at most ``cfg.shuffled_max_p``): then
    the model knows the classes although its labels were random, and the labels reached it
    another way (labels derived from the image order or the file names instead of the label
    array, the label written into the input by preprocessing): raise :class:`LabelLeak`.

    Not visible here: duplicates between train and val (a duplicate carries its random label,
    right 1/classes of the time; validate finds those). With classes! <= 1/shuffled_max_p
    (6 classes or fewer at 0.001) no single run can reach the significance level: the result
    says so and passes.
    """
    if len(val) == 0:
        raise InvalidInput("the shuffled-label check needs validation images (none given).")
    part, random_labels, held = _draw_subsets(train, val, num_classes, cfg, seed)
    losses = _train_on_random_labels(model, Split(part.images, random_labels), cfg, seed, augment)
    test = _naming_test(model, held, num_classes, cfg, seed)
    train_predicted = _predictions(model, part, cfg.shuffled_batch_size)
    result = {
        "steps": cfg.shuffled_steps,
        "batch_size": cfg.shuffled_batch_size,
        "train_images": len(part),
        "val_images": len(held),
        "initial_loss": losses[0],
        "final_loss": losses[-1],
        "train_accuracy_on_random_labels": float(np.mean(train_predicted == random_labels)),
        "val_accuracy_on_true_labels": test.val_accuracy,
        "chance": 1.0 / num_classes,
        "val_majority_share": float(np.bincount(held.labels).max() / len(held)),
        "p_value": test.p_value,
        "max_p": cfg.shuffled_max_p,
        "testable": test.testable,
        "passed": not test.leaked,
    }
    _warn_or_raise(test, num_classes, cfg)
    return result

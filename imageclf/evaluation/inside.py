"""Seeing inside the model: feature maps, first-layer filters and attention rollout.

Accuracy says how often a model is right; these pictures say what it looks at. The first
layer's filters show whether training learned edges and blobs or noise; feature maps show which
parts of an image a layer responds to; attention rollout (Abnar & Zuidema, 2020) shows which
patches a vision transformer's prediction draws on. The evaluate stage writes each as one PNG
for a few test images chosen the same way on every run.

Everything is read through forward hooks, so no model needs code for it. ``vit_tiny``'s
attention module returns only its output, so its attention probabilities are recomputed in a
hook from the module's input and its own Q/K projection, and checked there against what the
module computed (its output must equal ``proj(probs @ V)``), so a changed attention layer stops
the stage instead of drawing a wrong map.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from imageclf.data.transforms import to_model_input
from imageclf.evaluation.error_analysis import message_figure, shorten, show_image
from imageclf.io import write_with
from imageclf.models.layers import MultiHeadSelfAttention

log = logging.getLogger(__name__)

# Convolutional layers whose feature maps are drawn: the first, the last and evenly spaced
# between them, in the order the forward pass runs them.
FEATURE_LAYERS = 3
# Channels drawn per layer and image: those with the largest mean |activation| for the image
# (a 1280-channel layer cannot be shown whole, and the strongest channels say the most).
MAPS_PER_LAYER = 8
# First-layer filters drawn at most (ResNet-50 has 64, EfficientNet 32, our CNNs 8-64).
MAX_FILTERS = 64
# Opacity of the attention heat map over the image.
OVERLAY_ALPHA = 0.55
# Inches per panel, above each panel for its title, and left of the feature-map rows for the
# layer names; the resolution the PNGs are saved at (as the other evaluate plots).
PANEL_INCHES = 1.15
TITLE_INCHES = 0.32
LABEL_INCHES = 1.0
DPI = 110
# Tolerance of the check that the recomputed attention reproduces the module's output.
ATTENTION_RTOL = 1e-4
ATTENTION_ATOL = 1e-5
# PNG text key holding the number of image panels drawn (read back by tests and tools).
PANELS_KEY = "panels"


@dataclass(frozen=True)
class ChosenImage:
    """One test image shown: where it is, what it is, what the model said."""

    index: int
    true_label: int
    predicted_label: int
    probability: float  # of the predicted class

    @property
    def correct(self) -> bool:
        return self.true_label == self.predicted_label


def choose_images(labels: np.ndarray, probabilities: np.ndarray, count: int) -> list[ChosenImage]:
    """Class by class in label order, the first correctly and the first wrongly classified
    test image (by test index), until ``count``: the same images on every run, a right and a
    wrong one side by side, and as many classes as ``count`` allows."""
    if probabilities.ndim != 2 or len(probabilities) != len(labels):
        raise ValueError(
            f"probabilities {probabilities.shape} and labels {labels.shape} do not match: "
            "expected (N, num_classes) and (N,)"
        )
    predicted = probabilities.argmax(1)
    chosen: list[ChosenImage] = []
    for cls in range(probabilities.shape[1]):
        of_class = labels == cls
        for hit in (predicted == labels, predicted != labels):
            found = np.flatnonzero(of_class & hit)
            if len(found) and len(chosen) < count:
                i = int(found[0])
                chosen.append(
                    ChosenImage(i, int(labels[i]), int(predicted[i]), float(probabilities[i].max()))
                )
    return chosen


def spread(items: list[Any], k: int) -> list[Any]:
    """``k`` items: the first, the last and evenly spaced between (all when there are fewer)."""
    if len(items) <= k:
        return list(items)
    picks = np.unique(np.round(np.linspace(0, len(items) - 1, k)).astype(int))
    return [items[i] for i in picks]


def modules_in_forward_order(
    model: nn.Module, x: torch.Tensor, kinds: tuple[type[nn.Module], ...]
) -> list[tuple[str, nn.Module]]:
    """The modules of ``kinds`` in the order a forward pass calls them (definition order can
    differ: a shortcut conv is often defined after the block it bypasses)."""
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    # Named from the body of a zoo model (Normalize, body): "stem.conv", not "1.stem.conv".
    body = list(model._modules)[-1] if isinstance(model, nn.Sequential) and len(model) else None

    def hook(name: str):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if id(module) not in seen:
                seen.add(id(module))
                order.append((name, module))

        return record

    handles = [
        m.register_forward_hook(hook(name.removeprefix(f"{body}.") if body else name))
        for name, m in model.named_modules()
        if isinstance(m, kinds)
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return order


@contextmanager
def captured_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, each named module's latest output is kept (detached, on the CPU)."""
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def keep(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            outputs[name] = output.detach().float().cpu()

        return keep

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def attention_probabilities(
    module: MultiHeadSelfAttention, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d)) per head, (B, H, N, N), and V, (B, H, N, d), recomputed from
    the module's input with its own weights (the module returns only its output)."""
    b, n, c = x.shape
    d = c // module.heads
    q, k, v = module.qkv(x).reshape(b, n, 3, module.heads, d).permute(2, 0, 3, 1, 4)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1), v


def output_from_probabilities(
    module: MultiHeadSelfAttention, probs: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """What the module outputs given attention ``probs``: heads mixed by V, concatenated and
    projected, which is how the recomputation is checked."""
    b, _, n, _ = probs.shape
    return module.proj((probs @ v).transpose(1, 2).reshape(b, n, -1))


class AttentionRecorder:
    """Forward hooks that keep each self-attention layer's probabilities, in call order, and
    check each recomputation against the module's own output."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, MultiHeadSelfAttention)]
        self.probabilities: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: Any) -> None:
        with torch.no_grad():  # a picture, not a graph to differentiate
            probs, v = attention_probabilities(module, args[0])
            again = output_from_probabilities(module, probs, v)
            output = output.detach()
        if not torch.allclose(again, output, rtol=ATTENTION_RTOL, atol=ATTENTION_ATOL):
            raise RuntimeError(
                f"{type(module).__name__} no longer computes proj(softmax(QK^T/sqrt(d)) V) "
                f"(largest difference {float((again - output).abs().max()):.3g}): update "
                "attention_probabilities in imageclf/evaluation/inside.py to match it."
            )
        self.probabilities.append(probs.detach().float().cpu())

    def __enter__(self) -> AttentionRecorder:
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def attention_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): average the heads, add the identity for the
    residual connection, renormalise the rows, and multiply through the layers bottom-up.

    ``attentions``: one (B, H, N, N) tensor of row-stochastic probabilities per layer, in
    forward order. Returns (B, N, N): row i says how much output token i draws on each input
    patch, and each row sums to 1."""
    if not attentions:
        raise ValueError("attention rollout needs at least one layer's attention")
    first = attentions[0]
    if first.ndim != 4 or first.shape[-1] != first.shape[-2]:
        raise ValueError(f"expected (B, heads, N, N) attention, got {tuple(first.shape)}")
    eye = torch.eye(first.shape[-1], dtype=first.dtype)
    rollout = eye.expand(first.shape[0], -1, -1)
    for probs in attentions:
        mixed = probs.mean(1) + eye
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed @ rollout
    return rollout


def pooled_rollout(rollout: torch.Tensor) -> torch.Tensor:
    """(B, N) attribution of the image embedding to the input patches. ``vit_tiny`` has no CLS
    token: its classifier sees the mean of the output tokens, so the rollout's rows are
    averaged (a model with a CLS token would take that token's row instead). Sums to 1."""
    return rollout.mean(1)


# ----------------------------------------------------------------------------- drawing
def image_caption(item: ChosenImage, classes: list[str]) -> str:
    mark = "right" if item.correct else "WRONG"
    return (
        f"#{item.index} true: {shorten(classes[item.true_label], 16)}\n"
        f"pred: {shorten(classes[item.predicted_label], 16)} {item.probability:.0%} ({mark})"
    )


def save_panels(fig: Any, path: Path) -> int:
    """Save atomically with the number of image panels in the PNG's text, return that number."""
    panels = sum(1 for ax in fig.axes if ax.images)
    write_with(
        path,
        lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata={PANELS_KEY: str(panels)}),
        suffix=".png",
    )
    plt.close(fig)
    return panels


def save_message(path: Path, text: str, title: str) -> int:
    """DVC expects every declared plot: one that cannot be drawn says why instead."""
    return save_panels(message_figure(text, title), path)


def plot_feature_maps(
    images: np.ndarray,
    chosen: list[ChosenImage],
    classes: list[str],
    maps: dict[str, torch.Tensor],
    path: Path,
    title: str,
) -> int:
    """One row per (image, layer): the image, then that layer's strongest channels for it,
    each scaled to its own range (viridis: bright is high)."""
    rows = len(chosen) * len(maps)
    cols = 1 + min(MAPS_PER_LAYER, max(t.shape[1] for t in maps.values()))
    width = LABEL_INCHES + PANEL_INCHES * cols * 1.1
    head = 0.45 + TITLE_INCHES  # the two-line suptitle, then the first row's titles
    height = head + (PANEL_INCHES + TITLE_INCHES) * rows
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    # Fixed margins, not tight_layout: with ~100 panels it takes longer than the drawing.
    fig.subplots_adjust(
        left=LABEL_INCHES / width,
        right=0.995,
        bottom=0.2 / height,
        top=1 - head / height,
        wspace=0.1,
        hspace=TITLE_INCHES / PANEL_INCHES,
    )
    for ax in axes.flat:
        ax.axis("off")
    row = 0
    for i, item in enumerate(chosen):
        for layer, activations in maps.items():
            act = activations[i]
            strength = act.abs().mean((1, 2))
            top = torch.argsort(-strength, stable=True)[: cols - 1]
            ax = axes[row, 0]
            show_image(ax, images[item.index])
            ax.set_title(
                image_caption(item, classes) if layer == next(iter(maps)) else "", fontsize=6
            )
            ax.text(
                -0.08,
                0.5,
                f"{shorten(layer, 18)}\n{act.shape[0]}ch {act.shape[1]}×{act.shape[2]}",
                transform=ax.transAxes,
                ha="right",
                va="center",
                fontsize=6,
            )
            for col, channel in enumerate(top.tolist(), start=1):
                axes[row, col].imshow(act[channel].numpy(), cmap="viridis", interpolation="nearest")
                axes[row, col].set_title(f"ch {channel}", fontsize=6)
            row += 1
    fig.suptitle(
        f"{title}\n(strongest channels per layer, each scaled to its own range)",
        fontsize=9,
        y=1 - 0.05 / height,
        va="top",
    )
    return save_panels(fig, path)


def filter_images(weight: torch.Tensor) -> tuple[np.ndarray, bool]:
    """(F, k, k, 3) colour or (F, k, k) grey filters, each scaled to [0, 1] on its own; colour
    only for 3 input channels (RGB), otherwise the mean over input channels."""
    w = weight.detach().float().cpu()[:MAX_FILTERS]
    rgb = w.shape[1] == 3
    w = w.permute(0, 2, 3, 1) if rgb else w.mean(1)
    flat = w.reshape(len(w), -1)
    lo = flat.min(1).values.reshape(-1, *([1] * (w.ndim - 1)))
    hi = flat.max(1).values.reshape(-1, *([1] * (w.ndim - 1)))
    return ((w - lo) / (hi - lo).clamp_min(1e-12)).numpy(), rgb


def plot_filters(weight: torch.Tensor, layer: str, path: Path, title: str) -> int:
    """The first layer's filters as a square-ish grid, colour for RGB models, grey otherwise."""
    shown, rgb = filter_images(weight)
    n = len(shown)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    side = max(0.55, min(PANEL_INCHES, 9.0 / cols))
    width = max(5.0, side * cols + 0.4)  # room for the two-line title
    height = side * rows + 0.9
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    pad = (width - side * cols) / 2 / width
    fig.subplots_adjust(
        left=pad, right=1 - pad, bottom=0.1 / height, top=1 - 0.75 / height, wspace=0.1, hspace=0.1
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, filt in zip(axes.flat, shown, strict=False):
        ax.imshow(filt, cmap=None if rgb else "gray", vmin=0, vmax=1, interpolation="nearest")
    total = weight.shape[0]
    what = f"{n} of {total}" if n < total else f"{total}"
    kernel = "×".join(str(s) for s in weight.shape[2:])
    fig.suptitle(
        f"{title}\n{layer}: {what} filters, {kernel}, "
        f"{'RGB' if rgb else 'grey'} (each scaled to its own range)",
        fontsize=9,
        y=1 - 0.05 / height,
        va="top",
    )
    return save_panels(fig, path)


def plot_rollout(
    images: np.ndarray,
    chosen: list[ChosenImage],
    classes: list[str],
    heat: torch.Tensor,
    path: Path,
    title: str,
) -> int:
    """Per image: the image, and the image under its rollout heat map (inferno: bright is
    where the prediction draws from)."""
    fig, axes = plt.subplots(
        len(chosen),
        2,
        figsize=(PANEL_INCHES * 2.6, PANEL_INCHES * 1.3 * len(chosen) + 0.6),
        squeeze=False,
    )
    for (left, right), item, grid in zip(axes, chosen, heat, strict=True):
        image = images[item.index]
        h, w = image.shape[:2]
        for ax in (left, right):
            ax.axis("off")
            show_image(ax, image)
        right.imshow(
            grid.numpy(),
            cmap="inferno",
            alpha=OVERLAY_ALPHA,
            extent=(-0.5, w - 0.5, h - 0.5, -0.5),
            interpolation="nearest",  # one block per patch: the rollout's own resolution
        )
        left.set_title(image_caption(item, classes), fontsize=6)
        right.set_title(f"rollout, peak {float(grid.max()):.0%}", fontsize=6)
    fig.suptitle(f"{title}\nattention rollout (mean-pooled tokens)", fontsize=9)
    fig.tight_layout()
    return save_panels(fig, path)


# ----------------------------------------------------------------------------- the views
@dataclass
class _Views:
    """The report's entries, one per PNG in the order written, and the PNGs' shared title."""

    title: str
    root: Path | None
    entries: list[dict[str, Any]] = field(default_factory=list)

    def done(self, view: str, png: Path, panels: int, **shows: Any) -> None:
        """Record a written PNG: its file (relative to ``root``), its panels and what it shows."""
        file = str(png.relative_to(self.root) if self.root else png)
        self.entries.append({"view": view, "file": file, "panels": panels, **shows})

    def skip(self, view: str, png: Path, reason: str) -> None:
        """DVC expects every PNG: one the model cannot have says why, in the PNG and the log."""
        log.info("%s skipped: %s", view, reason)
        title = f"{self.title}: {view.replace('_', ' ')}"
        self.done(view, png, save_message(png, reason, title))
        self.entries[-1]["skipped"] = reason


def _write_first_layer(
    views: _Views,
    weighted: list[tuple[str, nn.Module]],
    input_shape: tuple[int, ...],
    png: Path,
) -> None:
    """First layer: a conv's filters, or an MLP's first Linear rows as images (its templates)."""
    name, first = weighted[0] if weighted else ("", None)
    c, h, w = input_shape
    if isinstance(first, nn.Conv2d):
        panels = plot_filters(first.weight, name, png, views.title)
        views.done("first_layer_filters", png, panels, layer=name)
    elif isinstance(first, nn.Linear) and first.in_features == c * h * w:
        templates = first.weight.reshape(-1, c, h, w)
        panels = plot_filters(templates, name, png, views.title)
        views.done("first_layer_filters", png, panels, layer=name)
    else:
        views.skip("first_layer_filters", png, "the model's first layer has no image filters")


def _write_feature_maps(
    views: _Views,
    images: np.ndarray,
    chosen: list[ChosenImage],
    classes: list[str],
    maps: dict[str, torch.Tensor],
    png: Path,
) -> None:
    """The chosen images' feature maps of the layers captured, or why there are none."""
    if maps:
        panels = plot_feature_maps(images, chosen, classes, maps, png, views.title)
        views.done("feature_maps", png, panels, layers=list(maps))
    else:
        views.skip("feature_maps", png, "the model has no convolutional layers")


def _write_rollout(
    views: _Views,
    images: np.ndarray,
    chosen: list[ChosenImage],
    classes: list[str],
    attentions: list[torch.Tensor],
    png: Path,
) -> None:
    """The chosen images under their attention rollout, or why the model cannot have one."""
    if not attentions:
        views.skip("attention_rollout", png, "the model has no self-attention layers")
        return
    rollout = pooled_rollout(attention_rollout(attentions))
    side = math.isqrt(rollout.shape[1])
    if side * side != rollout.shape[1]:
        reason = f"its {rollout.shape[1]} tokens do not form a square patch grid"
        views.skip("attention_rollout", png, reason)
        return
    heat = rollout.reshape(len(chosen), side, side)
    panels = plot_rollout(images, chosen, classes, heat, png, views.title)
    views.done("attention_rollout", png, panels, layers=len(attentions), grid=[side, side])


def _shown_images(chosen: list[ChosenImage], classes: list[str]) -> list[dict[str, Any]]:
    """The chosen images as the report lists them, with class names instead of indices."""
    return [
        {
            "index": item.index,
            "true": classes[item.true_label],
            "predicted": classes[item.predicted_label],
            "probability": item.probability,
            "correct": item.correct,
        }
        for item in chosen
    ]


def write_inside_views(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    count: int,
    feature_maps_png: Path,
    filters_png: Path,
    rollout_png: Path,
    title: str,
    root: Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Write the three PNGs for ``count`` test images chosen by :func:`choose_images`.

    Returns, for the evaluate report, ``inside_images`` (the images shown) and ``inside`` (one
    entry per PNG: its file relative to ``root``, its panels and what it shows). Both are
    lists, which ``dvc metrics show`` leaves out of its table. A view a model cannot have
    (feature maps without convolutions, rollout without attention) is a PNG saying why, and
    the reason is its entry's ``skipped`` and in the log."""
    model.eval()
    chosen = choose_images(labels, probabilities, count)
    probe = to_model_input(images[:1])
    weighted = modules_in_forward_order(model, probe, (nn.Conv2d, nn.Linear))
    convs = [(name, m) for name, m in weighted if isinstance(m, nn.Conv2d)]
    attention = AttentionRecorder(model)
    views = _Views(title, root)
    _write_first_layer(views, weighted, tuple(probe.shape[1:]), filters_png)
    if not chosen:
        reason = "no test images chosen (evaluate.inside_images is 0)"
        views.skip("feature_maps", feature_maps_png, reason)
        views.skip("attention_rollout", rollout_png, reason)
    else:
        # One forward pass of the chosen images gives both the feature maps and the attention.
        x = to_model_input(images[[item.index for item in chosen]])
        layers = dict(spread(convs, FEATURE_LAYERS))
        with captured_outputs(layers) as outputs, attention, torch.inference_mode():
            model(x)
        maps = {n: outputs[n] for n in layers}
        _write_feature_maps(views, images, chosen, classes, maps, feature_maps_png)
        _write_rollout(views, images, chosen, classes, attention.probabilities, rollout_png)
    return {"inside_images": _shown_images(chosen, classes), "inside": views.entries}

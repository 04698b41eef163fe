"""Looking at the errors: the most confidently wrong test images and the most confused classes.

Numbers say how often a model is wrong; these pictures say how. A gallery of confident mistakes
finds mislabelled test images, classes that look alike and preprocessing bugs (fastai's
``plot_top_losses``), and the most-confused pairs say which classes need more or better data
(fastai's ``most_confused``). The evaluate stage writes both as PNG and as one self-contained
HTML page (images inline, base64) that a person can open anywhere or download from MLflow.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from imageclf.io import write_text, write_with

# Images smaller than this (shorter side, pixels) are enlarged by a whole factor, nearest
# neighbour, so that a 28×28 digit is seen as its pixels rather than a speck or a blur.
DISPLAY_SIDE = 128
# Confused (true, predicted) pairs shown in the chart and the table.
CONFUSED_PAIRS_SHOWN = 15
# Gallery columns in the PNG.
GALLERY_COLUMNS = 6


@dataclass(frozen=True)
class TopLoss:
    """One wrong test prediction: which image, what it is, what the model said, how sure."""

    index: int
    true_label: int
    predicted_label: int
    probability: float  # of the predicted (wrong) class
    true_probability: float  # -log of it is the image's loss


@dataclass(frozen=True)
class ConfusedPair:
    """Test images of class ``true_label`` predicted as ``predicted_label``."""

    true_label: int
    predicted_label: int
    count: int
    share_of_true: float  # of the true class's test images


def top_losses(probabilities: np.ndarray, labels: np.ndarray, k: int) -> list[TopLoss]:
    """The ``k`` wrong predictions made with the highest probability, most confident first.

    Ties (frequent once probabilities saturate at 1.0) go to the lower probability of the true
    class, then to the lower test index, so the gallery is the same on every run."""
    if probabilities.ndim != 2 or len(probabilities) != len(labels):
        raise ValueError(
            f"probabilities {probabilities.shape} and labels {labels.shape} do not match: "
            "expected (N, num_classes) and (N,)"
        )
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    rows = np.arange(len(labels))
    confidence = probabilities[rows, predicted]
    true_probability = probabilities[rows, labels]
    # np.lexsort sorts by the last key first.
    order = wrong[np.lexsort((wrong, true_probability[wrong], -confidence[wrong]))]
    return [
        TopLoss(
            index=int(i),
            true_label=int(labels[i]),
            predicted_label=int(predicted[i]),
            probability=float(confidence[i]),
            true_probability=float(true_probability[i]),
        )
        for i in order[: max(k, 0)]
    ]


def most_confused(cm: np.ndarray, k: int = CONFUSED_PAIRS_SHOWN) -> list[ConfusedPair]:
    """The ``k`` largest off-diagonal cells of a confusion matrix (rows true, columns
    predicted), largest count first; ties go to the larger share of the true class."""
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {cm.shape}")
    support = cm.sum(1)
    pairs = [
        ConfusedPair(int(t), int(p), int(cm[t, p]), float(cm[t, p] / support[t]))
        for t, p in zip(*np.nonzero(cm), strict=True)
        if t != p
    ]
    pairs.sort(key=lambda x: (-x.count, -x.share_of_true, x.true_label, x.predicted_label))
    return pairs[: max(k, 0)]


def display_image(image: np.ndarray) -> Image.Image:
    """A uint8 HxWxC (C = 1 or 3) image as PIL, enlarged by a whole factor (nearest
    neighbour) until its shorter side reaches DISPLAY_SIDE."""
    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 HxWx1 or HxWx3 image, got {image.dtype} {tuple(image.shape)}"
        )
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    factor = max(1, math.ceil(DISPLAY_SIDE / min(pil.size)))
    if factor > 1:
        pil = pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST)
    return pil


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def image_data_uri(image: np.ndarray) -> str:
    """The image as shown, inline. Enlarged or grey images as PNG (exact pixels, and their
    repeated blocks compress well); colour photos shown at their own size as JPEG, about 6x
    smaller than PNG at 224², which matters in a page committed beside the metrics."""
    shown = display_image(image)
    buffer = io.BytesIO()
    if shown.mode == "RGB" and shown.size == (image.shape[1], image.shape[0]):
        shown.save(buffer, format="JPEG", quality=90)
        return data_uri(buffer.getvalue(), "image/jpeg")
    shown.save(buffer, format="PNG")
    return data_uri(buffer.getvalue())


def shorten(text: str, width: int = 22) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def save_figure(fig: Any, path: Path) -> Path:
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), suffix=".png")
    plt.close(fig)
    return path


def message_figure(text: str, title: str) -> Any:
    """A small figure that says why there is nothing to draw (DVC expects the file anyway)."""
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


def show_image(ax: Any, image: np.ndarray) -> None:
    """A uint8 HWC image on its true 0-255 scale (grayscale without a colour map), its pixels
    kept sharp: enlarged by nearest neighbour, so a 28x28 image shows what the model saw."""
    gray = image.shape[2] == 1
    ax.imshow(
        image[..., 0] if gray else image,
        cmap="gray" if gray else None,
        vmin=0,
        vmax=255,
        interpolation="nearest",
    )


def plot_top_losses(
    images: np.ndarray, losses: list[TopLoss], classes: list[str], path: Path, title: str
) -> Path:
    """A grid of the gallery's images, each titled with its true and predicted class."""
    if not losses:
        return save_figure(message_figure("no misclassified test images to show", title), path)
    cols = min(GALLERY_COLUMNS, len(losses))
    rows = math.ceil(len(losses) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.75 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, losses, strict=False):
        show_image(ax, images[item.index])
        ax.set_title(
            f"true: {shorten(classes[item.true_label])}\n"
            f"pred: {shorten(classes[item.predicted_label])} {item.probability:.1%}",
            fontsize=8,
        )
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def pair_label(pair: ConfusedPair, classes: list[str]) -> str:
    return f"{shorten(classes[pair.true_label])} → {shorten(classes[pair.predicted_label])}"


def plot_confused_pairs(
    pairs: list[ConfusedPair], classes: list[str], path: Path, title: str
) -> Path:
    """Horizontal bars: how many test images of each true class went to each wrong class."""
    if not pairs:
        return save_figure(message_figure("no class was confused with another", title), path)
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(pairs) + 1.4))
    y = np.arange(len(pairs))
    bars = ax.barh(y, [p.count for p in pairs], color="tab:red")
    ax.bar_label(
        bars, [f"{p.count} ({p.share_of_true:.1%} of true)" for p in pairs], fontsize=8, padding=3
    )
    ax.set_yticks(y, [pair_label(p, classes) for p in pairs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test images (true → predicted)")
    ax.set_xlim(0, max(p.count for p in pairs) * 1.35)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}
td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
td:first-child,th:first-child{text-align:left}
.gallery{display:flex;flex-wrap:wrap;gap:.8rem}
figure{margin:0;padding:.4rem;border:1px solid #ddd;border-radius:4px;width:min-content}
figure img{display:block;min-width:128px;image-rendering:pixelated}
figcaption{font-size:.85rem;white-space:nowrap}
.wrong{color:#b00}.rare{background:#fff3cd}.worst{font-weight:bold}
"""


def error_report_html(
    images: np.ndarray,
    losses: list[TopLoss],
    pairs: list[ConfusedPair],
    classes: list[str],
    report: dict[str, Any],
    title: str,
    chart_png: bytes | None = None,
) -> str:
    """One self-contained page: headline numbers, per-class table, gallery, confused pairs."""
    e = html.escape
    rare = set(report.get("rare_classes", {}))
    train_counts = report.get("train_images_per_class", {})
    worst = report.get("worst_recall_class")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{e(title)}</h1>",
        "<p>"
        + ", ".join(
            f"{label}: <b>{report[key]:.4f}</b>"
            for key, label in (
                ("test_accuracy", "test accuracy"),
                ("balanced_accuracy", "balanced accuracy"),
                ("macro_f1", "macro F1"),
            )
            if isinstance(report.get(key), (int, float))
        )
        + "</p>",
        "<h2>Per class</h2><table><tr><th>class</th><th>train images</th><th>test images</th>"
        "<th>precision</th><th>recall</th><th>F1</th></tr>",
    ]
    for name, stats in report.get("per_class", {}).items():
        css = " ".join(c for c, on in (("rare", name in rare), ("worst", name == worst)) if on)
        note = " (rare)" if name in rare else ""
        parts.append(
            f"<tr class='{css}'><td>{e(name)}{note}</td><td>{train_counts.get(name, '')}</td>"
            f"<td>{stats['support']}</td><td>{stats['precision']:.3f}</td>"
            f"<td>{stats['recall']:.3f}</td><td>{stats['f1']:.3f}</td></tr>"
        )
    parts.append("</table>")

    parts.append(f"<h2>Most confidently wrong test images ({len(losses)})</h2>")
    if losses:
        parts.append("<div class='gallery'>")
        for rank, item in enumerate(losses, 1):
            true_name, predicted = classes[item.true_label], classes[item.predicted_label]
            parts.append(
                f"<figure><img src='{image_data_uri(images[item.index])}' "
                f"alt='test image {item.index}: {e(true_name)} predicted as {e(predicted)}'>"
                f"<figcaption>#{rank} · test image {item.index}<br>true: <b>{e(true_name)}</b>"
                f"<br><span class='wrong'>predicted: <b>{e(predicted)}</b> "
                f"{item.probability:.1%}</span><br>p(true) {item.true_probability:.1%}"
                "</figcaption></figure>"
            )
        parts.append("</div>")
    else:
        parts.append("<p>No misclassified test images (or evaluate.top_losses is 0).</p>")

    parts.append("<h2>Most confused classes</h2>")
    if pairs:
        parts.append(
            "<table><tr><th>true class</th><th>predicted as</th><th>test images</th>"
            "<th>share of the true class</th></tr>"
        )
        for pair in pairs:
            parts.append(
                f"<tr><td>{e(classes[pair.true_label])}</td>"
                f"<td>{e(classes[pair.predicted_label])}</td><td>{pair.count}</td>"
                f"<td>{pair.share_of_true:.1%}</td></tr>"
            )
        parts.append("</table>")
        if chart_png:
            parts.append(f"<img src='{data_uri(chart_png)}' alt='most confused pairs'>")
    else:
        parts.append("<p>No class was confused with another.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_error_analysis(
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    report: dict[str, Any],
    top_k: int,
    gallery_png: Path,
    pairs_png: Path,
    html_path: Path,
    title: str,
) -> dict[str, Any]:
    """Write the gallery PNG, the confused-pairs PNG and the HTML page; return what they show
    (class names, not indices) for the evaluate report."""
    from imageclf.evaluation.metrics import confusion_matrix

    losses = top_losses(probabilities, labels, top_k)
    pairs = most_confused(confusion_matrix(labels, probabilities.argmax(1), len(classes)))
    plot_top_losses(images, losses, classes, gallery_png, f"{title}: most confidently wrong")
    plot_confused_pairs(pairs, classes, pairs_png, f"{title}: most confused classes")
    page = error_report_html(
        images, losses, pairs, classes, report, f"{title}: errors", pairs_png.read_bytes()
    )
    write_text(html_path, page)
    return {
        "top_losses": [
            {
                "index": item.index,
                "true": classes[item.true_label],
                "predicted": classes[item.predicted_label],
                "probability": item.probability,
                "true_probability": item.true_probability,
            }
            for item in losses
        ],
        "most_confused": [
            {
                **{k: v for k, v in asdict(p).items() if not k.endswith("_label")},
                "true": classes[p.true_label],
                "predicted": classes[p.predicted_label],
            }
            for p in pairs
        ],
    }

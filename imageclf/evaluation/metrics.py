"""Classification metrics and the plots a person looks at instead of reading numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from imageclf.io import write_with
from imageclf.metric_names import BALANCED_ACCURACY, MACRO_F1, TEST_ACCURACY, WORST_RECALL


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    return np.bincount(
        labels * num_classes + predictions, minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)


def classification_report(
    labels: np.ndarray, predictions: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, the worst-recall class and per-class
    precision/recall/F1/support (all fractions in [0, 1]).

    Balanced accuracy is the mean recall over the classes the test split holds (scikit-learn's
    definition): a model that never predicts a 2% class loses 2 points of accuracy but a whole
    class's share of balanced accuracy."""
    cm = confusion_matrix(labels, predictions, len(classes))
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(0).astype(float)
    actual = cm.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(actual[i]),
        }
        for i, name in enumerate(classes)
    }
    present = actual > 0
    worst = int(np.flatnonzero(present)[np.argmin(recall[present])]) if present.any() else None
    return {
        TEST_ACCURACY: float(tp.sum() / max(cm.sum(), 1)),
        BALANCED_ACCURACY: float(recall[present].mean()) if present.any() else 0.0,
        MACRO_F1: float(f1.mean()),
        WORST_RECALL: float(recall[worst]) if worst is not None else 0.0,
        "worst_recall_class": classes[worst] if worst is not None else None,
        "num_test_images": int(cm.sum()),
        "per_class": per_class,
    }


def train_class_shares(
    labels: np.ndarray, classes: list[str], rare_class_share: float
) -> dict[str, Any]:
    """Training images per class and the rare classes among them, in plain numbers.

    A class is rare when its share of the training split is below ``rare_class_share`` times
    the uniform share 1/num_classes: the classes imbalance handling is for. Keyed by class name
    (not lists), so that `dvc metrics show` gives each number its own column."""
    counts = np.bincount(labels, minlength=len(classes))[: len(classes)]
    total = max(int(counts.sum()), 1)
    uniform = 1.0 / max(len(classes), 1)
    rare = sorted(
        (i for i in range(len(classes)) if counts[i] / total < rare_class_share * uniform),
        key=lambda i: (counts[i], classes[i]),
    )
    return {
        "train_images_per_class": {name: int(counts[i]) for i, name in enumerate(classes)},
        "uniform_train_share": uniform,
        "rare_classes": {
            classes[i]: {"train_images": int(counts[i]), "train_share": float(counts[i] / total)}
            for i in rare
        },
    }


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Row-normalised heat map with counts, so small classes' errors are visible too."""
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(6.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), suffix=".png")
    plt.close(fig)
    return path


def plot_bars(
    labels: list[str],
    series: dict[str, list[float]],
    path: Path,
    title: str,
    ylabel: str,
    log: bool = False,
) -> Path:
    """Grouped bar chart (used for benchmark latencies and throughputs)."""
    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels)), 4))
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(x, labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), suffix=".png")
    plt.close(fig)
    return path

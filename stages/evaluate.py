"""Stage evaluate: test accuracy, per-class precision/recall/F1 and a confusion matrix."""

from __future__ import annotations

from typing import Any

from imageclf.checkpoint import load_checkpoint
from imageclf.config import Params
from imageclf.data.store import load_dataset
from imageclf.engine import predict_logits, set_threads
from imageclf.io import read_json, write_json
from imageclf.metrics import classification_report, confusion_matrix, plot_confusion_matrix
from imageclf.paths import ProjectPaths
from imageclf.stage import main
from imageclf.tracking import log_to_run


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Evaluate models/model.pt on the whole test split (with flip TTA when configured)."""
    set_threads(params.train.threads)
    dataset = load_dataset(paths.dataset)
    model, spec, _ = load_checkpoint(paths.checkpoint)
    cfg = params.evaluate
    logits = predict_logits(model, dataset.test.images, cfg.batch_size, tta_flip=cfg.tta_flip)
    predictions = logits.argmax(1).numpy()
    labels = dataset.test.labels
    report = classification_report(labels, predictions, dataset.classes)
    if cfg.tta_flip:
        plain = predict_logits(model, dataset.test.images, cfg.batch_size, tta_flip=False)
        report["test_accuracy_no_tta"] = float((plain.argmax(1).numpy() == labels).mean())
    report["tta_flip"] = cfg.tta_flip
    cm = confusion_matrix(labels, predictions, dataset.num_classes)
    plot_path = plot_confusion_matrix(
        cm,
        dataset.classes,
        paths.confusion_matrix_plot,
        f"{spec.name}: test accuracy {report['test_accuracy']:.4f}",
    )
    write_json(paths.evaluate_report, report)
    train_info = read_json(paths.train_report) if paths.train_report.is_file() else {}
    flat = {"test_accuracy": report["test_accuracy"], "macro_f1": report["macro_f1"]}
    flat.update({f"f1.{name}": v["f1"] for name, v in report["per_class"].items()})
    log_to_run(paths, train_info.get("mlflow_run_id"), flat, [plot_path])
    return report


if __name__ == "__main__":
    main(run)

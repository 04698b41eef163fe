"""Stage evaluate: how accurate, on which classes, and how the model is wrong.

Test accuracy, balanced accuracy and per-class precision/recall/F1, the confusion matrix, and the
error analysis a person looks at: the most confidently wrong test images and the most confused
class pairs (PNG, and one self-contained HTML page), and what the model looks at for a few test
images (feature maps, first-layer filters, attention rollout), all logged to the training run in
MLflow.
"""

from __future__ import annotations

from typing import Any

from imageclf.config import Params
from imageclf.data.store import load_dataset
from imageclf.evaluation.error_analysis import write_error_analysis
from imageclf.evaluation.inside import write_inside_views
from imageclf.evaluation.metrics import (
    classification_report,
    confusion_matrix,
    plot_confusion_matrix,
    train_class_shares,
)
from imageclf.io import read_json, write_json
from imageclf.metric_names import (
    BALANCED_ACCURACY,
    MACRO_F1,
    PER_CLASS_STATS,
    TEST_ACCURACY,
    TEST_ACCURACY_NO_TTA,
    WORST_RECALL,
    per_class_metric,
)
from imageclf.models.checkpoint import load_checkpoint
from imageclf.paths import ProjectPaths
from imageclf.stage import main
from imageclf.tracking import log_to_run
from imageclf.training.engine import predict_logits, set_threads


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Evaluate models/model.pt on the whole test split (test-time augmentation only when
    training flipped: ``Params.tta_views``)."""
    set_threads(params.train.threads)
    dataset = load_dataset(paths.dataset)
    model, spec, _ = load_checkpoint(paths.checkpoint)
    cfg = params.evaluate
    tta, views = params.tta_flip, params.tta_views
    images, labels = dataset.test.images, dataset.test.labels
    probabilities = predict_logits(model, images, cfg.batch_size, views=views).softmax(1).numpy()
    predictions = probabilities.argmax(1)
    report = classification_report(labels, predictions, dataset.classes)
    if tta:
        plain = predict_logits(model, images, cfg.batch_size)
        report[TEST_ACCURACY_NO_TTA] = float((plain.argmax(1).numpy() == labels).mean())
    report["tta_flip"] = tta
    report["tta_views"] = views
    if cfg.tta_flip and not tta:
        report["tta_flip_off_because"] = "train.augment has no hflip"
    train_info = read_json(paths.train_report) if paths.train_report.is_file() else {}
    report["class_balance"] = train_info.get("class_balance", params.train.class_balance)
    report.update(train_class_shares(dataset.train.labels, dataset.classes, cfg.rare_class_share))
    for name, rare in report["rare_classes"].items():
        rare["test_recall"] = report["per_class"][name]["recall"]

    cm = confusion_matrix(labels, predictions, dataset.num_classes)
    title = f"{spec.name}: test accuracy {report[TEST_ACCURACY]:.4f}"
    plot_path = plot_confusion_matrix(cm, dataset.classes, paths.confusion_matrix_plot, title)
    errors = write_error_analysis(
        images,
        labels,
        probabilities,
        dataset.classes,
        report,
        cfg.top_losses,
        paths.top_losses_plot,
        paths.confused_pairs_plot,
        paths.error_analysis_html,
        spec.name,
    )
    write_json(paths.error_analysis_report, errors)
    inside = write_inside_views(
        model,
        images,
        labels,
        probabilities,
        dataset.classes,
        cfg.inside_images,
        paths.feature_maps_plot,
        paths.first_layer_filters_plot,
        paths.attention_rollout_plot,
        spec.name,
        paths.root,
    )
    report.update(inside)  # lists: files and images for a person, not metrics for DVC
    write_json(paths.evaluate_report, report)

    flat = {key: report[key] for key in (TEST_ACCURACY, BALANCED_ACCURACY, MACRO_F1, WORST_RECALL)}
    if TEST_ACCURACY_NO_TTA in report:
        flat[TEST_ACCURACY_NO_TTA] = report[TEST_ACCURACY_NO_TTA]
    for name, stats in report["per_class"].items():
        flat.update({per_class_metric(stat, name): stats[stat] for stat in PER_CLASS_STATS})
    artifacts = [
        plot_path,
        paths.top_losses_plot,
        paths.confused_pairs_plot,
        paths.error_analysis_html,
        paths.error_analysis_report,
        paths.feature_maps_plot,
        paths.first_layer_filters_plot,
        paths.attention_rollout_plot,
    ]
    log_to_run(paths, train_info.get("mlflow_run_id"), flat, artifacts)
    return report


if __name__ == "__main__":
    main(run)

"""Evaluation beyond accuracy: balanced accuracy, the top-losses gallery, the confused pairs."""

from __future__ import annotations

import base64
import io
import re

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from imageclf.data.store import Split, write_dataset
from imageclf.evaluation.error_analysis import (
    DISPLAY_SIDE,
    display_image,
    error_report_html,
    image_data_uri,
    most_confused,
    top_losses,
)
from imageclf.evaluation.metrics import classification_report, train_class_shares
from imageclf.io import read_json, write_json
from imageclf.metric_names import per_class_metric
from imageclf.models.checkpoint import ModelSpec, save_checkpoint
from stages import evaluate
from tests.conftest import synthetic_split, tiny_params


def test_balanced_accuracy_and_recall_see_the_class_accuracy_hides():
    # 8 of class a, 2 of class b; the model says "a" for all but one b.
    labels = np.array([0] * 8 + [1] * 2)
    predictions = np.array([0] * 8 + [0, 1])
    report = classification_report(labels, predictions, ["a", "b", "c"])
    assert report["test_accuracy"] == pytest.approx(0.9)
    # Recall a = 1, b = 0.5; c has no test images and does not count.
    assert report["balanced_accuracy"] == pytest.approx(0.75)
    assert report["per_class"]["b"]["recall"] == pytest.approx(0.5)
    assert report["per_class"]["a"]["precision"] == pytest.approx(8 / 9)
    assert report["per_class"]["b"]["precision"] == pytest.approx(1.0)
    assert (report["worst_recall_class"], report["worst_recall"]) == ("b", 0.5)


def test_rare_classes_are_those_far_below_the_uniform_share():
    labels = np.array([0] * 45 + [1] * 45 + [2] * 8 + [3] * 2)
    shares = train_class_shares(labels, ["a", "b", "seven", "d"], rare_class_share=0.5)
    assert shares["train_images_per_class"] == {"a": 45, "b": 45, "seven": 8, "d": 2}
    assert shares["uniform_train_share"] == pytest.approx(0.25)
    # 8% and 2% are below half of 25%; the rarest comes first.
    assert list(shares["rare_classes"]) == ["d", "seven"]
    assert shares["rare_classes"]["seven"] == {"train_images": 8, "train_share": 0.08}
    assert train_class_shares(np.repeat(np.arange(4), 5), list("abcd"), 0.5)["rare_classes"] == {}


def test_metric_names_of_any_class_folder_are_accepted_by_mlflow():
    from mlflow.utils.validation import _validate_metric_name

    for name in ("T-shirt/top", "cat (domestic)", "a//b/", "..", "ünïcode ok", "a:b"):
        _validate_metric_name(per_class_metric("recall", name))
    assert per_class_metric("recall", "T-shirt/top") == "recall.T-shirt/top"  # as logged so far


PROBABILITIES = np.array(
    [
        [0.90, 0.05, 0.05],  # 0: right
        [0.10, 0.80, 0.10],  # 1: wrong, 80% sure
        [0.05, 0.05, 0.90],  # 2: wrong, 90% sure, p(true) 5%
        [0.38, 0.60, 0.02],  # 3: wrong, 60% sure, p(true) 2%: a larger loss than 1 and 2
        [0.10, 0.20, 0.70],  # 4: right
        [0.90, 0.00, 0.10],  # 5: wrong, 90% sure, p(true) 0%
    ]
)
LABELS = np.array([0, 0, 1, 2, 2, 1])


def test_top_losses_are_the_most_confident_wrong_predictions_in_order():
    found = top_losses(PROBABILITIES, LABELS, 3)
    # Ordered by how sure the wrong answer was, not by loss (which would put 3 second).
    # Equal confidence (2 and 5): the one that gave the true class less comes first.
    assert [t.index for t in found] == [5, 2, 1]
    assert [(t.true_label, t.predicted_label) for t in found] == [(1, 0), (1, 2), (0, 1)]
    assert [t.probability for t in found] == pytest.approx([0.9, 0.9, 0.8])
    assert [t.true_probability for t in found] == pytest.approx([0.0, 0.05, 0.1])
    assert [t.index for t in top_losses(PROBABILITIES, LABELS, 10)] == [5, 2, 1, 3]
    assert top_losses(PROBABILITIES, LABELS, 0) == []
    with pytest.raises(ValueError, match="do not match"):
        top_losses(PROBABILITIES, LABELS[:3], 3)


def test_most_confused_pairs_from_a_constructed_confusion_matrix():
    cm = np.array([[50, 3, 7], [0, 40, 1], [7, 2, 30]])
    pairs = most_confused(cm)
    # (2 -> 0) and (0 -> 2) both count 7: 7 of 39 is the larger share of its class than 7 of 60.
    assert [(p.true_label, p.predicted_label, p.count) for p in pairs] == [
        (2, 0, 7),
        (0, 2, 7),
        (0, 1, 3),
        (2, 1, 2),
        (1, 2, 1),
    ]
    assert pairs[0].share_of_true == pytest.approx(7 / 39)
    assert len(most_confused(cm, 2)) == 2
    assert most_confused(np.diag([5, 5])) == []


def decoded_images(page: str) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(data)))
        for data in re.findall(r"src='data:image/(?:png|jpeg);base64,([^']+)'", page)
    ]


def test_gallery_page_shows_each_error_with_its_labels_in_order():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28, 1), dtype=np.uint8)
    classes = ["cat", "dog", "<b>fox</b>"]
    report = classification_report(LABELS, PROBABILITIES.argmax(1), classes)
    page = error_report_html(
        images, top_losses(PROBABILITIES, LABELS, 3), [], classes, report, "demo"
    )
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert len(captions) == 3
    assert "test image 5" in captions[0] and "true: <b>dog</b>" in captions[0]
    assert "predicted: <b>cat</b> 90.0%" in captions[0]
    assert (
        "test image 2" in captions[1] and "predicted: <b>&lt;b&gt;fox&lt;/b&gt;</b>" in captions[1]
    )
    assert "test image 1" in captions[2] and "predicted: <b>dog</b> 80.0%" in captions[2]
    assert "<b>fox</b>" not in page  # a class name is text, never markup
    # Self-contained: every image is inline, none is fetched.
    assert not re.search(r"src=['\"](?!data:)", page)
    shown = decoded_images(page)
    assert len(shown) == 3
    # The 28x28 image of #1 (test image 5), enlarged 5x by nearest neighbour: its pixels, exactly.
    assert shown[0].size == (140, 140)
    assert np.array_equal(np.asarray(shown[0])[::5, ::5], images[5, ..., 0])


@pytest.mark.parametrize(
    ("shape", "size"), [((28, 28, 1), 140), ((96, 96, 3), 192), ((224, 224, 3), 224)]
)
def test_images_are_shown_large_enough_and_unblurred(shape, size):
    image = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    shown = display_image(image)
    assert shown.size == (size, size) and min(shown.size) >= DISPLAY_SIDE
    assert shown.mode == ("L" if shape[2] == 1 else "RGB")
    factor = size // shape[0]
    pixels = np.asarray(shown).reshape(size, size, -1)
    assert np.array_equal(pixels[::factor, ::factor], image)
    # Inline: exact pixels (PNG) where enlarged or grey, JPEG for a colour photo as it is.
    mime = "jpeg" if shape == (224, 224, 3) else "png"
    assert image_data_uri(image).startswith(f"data:image/{mime};base64,")
    with pytest.raises(ValueError, match="HxWx1 or HxWx3"):
        display_image(image.astype(np.float32))


def rgb_split(n_per_class: int, counts: list[int], seed: int) -> Split:
    """synthetic_split as 96x96 RGB, with ``counts[k]`` images of class k."""
    gray = synthetic_split(n_per_class, num_classes=len(counts), size=96, seed=seed)
    keep = np.concatenate([np.flatnonzero(gray.labels == k)[:n] for k, n in enumerate(counts)])
    return Split(np.repeat(gray.images[keep], 3, axis=3), gray.labels[keep])


def test_evaluate_stage_on_rgb_photos_writes_and_logs_the_error_analysis(project):
    """96x96 RGB, one rare class, and an untrained model (plenty of errors to show)."""
    classes = ["ant", "bee", "cat", "dog"]
    write_dataset(
        project.dataset,
        rgb_split(10, [10, 10, 10, 1], seed=1),
        rgb_split(3, [3, 3, 3, 3], seed=2),
        {"name": "synthetic", "classes": classes, "fraction": 1.0, "source": {}},
    )
    torch.manual_seed(0)
    spec = ModelSpec("resnet_small", 8, 4, 3, 96, tuple(classes), 0.3, 0.3)
    save_checkpoint(project.checkpoint, spec.build(), spec)
    mlflow.set_tracking_uri(f"sqlite:///{project.root / 'mlflow.db'}")
    with mlflow.start_run() as run:
        pass
    write_json(project.train_report, {"mlflow_run_id": run.info.run_id})
    # The default policy flips; without hflip, flip TTA is off whatever evaluate.tta_flip says.
    params = tiny_params(
        evaluate={"top_losses": 5}, train={"augment": [], "class_balance": "weights"}
    )

    report = evaluate.run(params, project)

    assert report == read_json(project.evaluate_report)
    assert report["tta_flip"] is False and "test_accuracy_no_tta" not in report
    assert report["tta_flip_off_because"] == "train.augment has no hflip"
    assert report["class_balance"] == "weights"
    assert list(report["rare_classes"]) == ["dog"]
    assert report["rare_classes"]["dog"]["train_images"] == 1
    assert 0.0 <= report["balanced_accuracy"] <= 1.0
    assert report["worst_recall_class"] in classes

    errors = read_json(project.error_analysis_report)
    wrong = [e["probability"] for e in errors["top_losses"]]
    assert 1 <= len(wrong) <= 5 and wrong == sorted(wrong, reverse=True)
    assert {e["true"] for e in errors["top_losses"]} <= set(classes)
    page = project.error_analysis_html.read_text()
    first = errors["top_losses"][0]
    assert f"test image {first['index']}<br>true: <b>{first['true']}</b>" in page
    assert all(img.size == (192, 192) for img in decoded_images(page)[: len(wrong)])
    for png in (project.top_losses_plot, project.confused_pairs_plot):
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width > 400

    logged = mlflow.MlflowClient().get_run(run.info.run_id)
    assert logged.data.metrics["balanced_accuracy"] == pytest.approx(report["balanced_accuracy"])
    assert logged.data.metrics["recall.dog"] == pytest.approx(report["per_class"]["dog"]["recall"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"top_losses.png", "confused_pairs.png", "errors.html", "errors.json"} <= artifacts

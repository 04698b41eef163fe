"""Seeing inside the model: image choice, attention rollout, the PNGs and their MLflow logging."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imageclf.data.store import write_dataset
from imageclf.evaluation.inside import (
    MAPS_PER_LAYER,
    MAX_FILTERS,
    PANELS_KEY,
    AttentionRecorder,
    attention_probabilities,
    attention_rollout,
    choose_images,
    modules_in_forward_order,
    output_from_probabilities,
    pooled_rollout,
    spread,
    write_inside_views,
)
from imageclf.io import read_json, write_json
from imageclf.models.checkpoint import ModelSpec, save_checkpoint
from imageclf.models.layers import MultiHeadSelfAttention
from imageclf.models.zoo import Normalize, available_models, build_model, model_contract
from imageclf.training.engine import predict_logits
from stages import evaluate
from tests.conftest import synthetic_split, tiny_params

CLASSES = ["ant", "bee", "cat", "dog"]


def panels(png: Path) -> int:
    """The number of image panels the PNG holds (written into it when drawn); decodes it too."""
    with Image.open(png) as img:
        img.load()
        assert img.format == "PNG" and img.width > 100 and img.height > 100
        return int(img.text[PANELS_KEY])


def one_hot_probabilities(predicted: list[int], classes: int = 4) -> np.ndarray:
    return np.eye(classes)[predicted] * 0.7 + 0.3 / classes


def test_images_are_the_first_right_and_first_wrong_of_each_class_in_order():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    predicted = [1, 0, 0, 1, 1, 0, 2, 3]  # class 0: 0 wrong, 1 right; class 1 never wrong
    chosen = choose_images(labels, one_hot_probabilities(predicted), 4)
    assert [(c.index, c.correct) for c in chosen] == [(1, True), (0, False), (3, True), (6, True)]
    assert choose_images(labels, one_hot_probabilities(predicted), 5)[-1].index == 5
    assert choose_images(labels, one_hot_probabilities(predicted), 0) == []
    assert chosen[1].predicted_label == 1 and chosen[1].probability == pytest.approx(0.775)


def test_spread_keeps_the_first_and_last_layer_and_spaces_the_rest():
    assert spread(list(range(10)), 3) == [0, 4, 9]  # round(4.5) is 4: banker's, fine
    assert spread(list(range(2)), 3) == [0, 1]
    assert spread([], 3) == []


def test_rollout_rows_are_distributions_over_the_patches():
    torch.manual_seed(0)
    layers = [torch.rand(2, 4, 9, 9).softmax(-1) for _ in range(3)]
    rollout = attention_rollout(layers)
    assert rollout.shape == (2, 9, 9)
    assert torch.allclose(rollout.sum(-1), torch.ones(2, 9))
    pooled = pooled_rollout(rollout)
    assert pooled.shape == (2, 9) and torch.allclose(pooled.sum(-1), torch.ones(2))
    # Uniform attention spreads evenly: every patch gets 1/9.
    uniform = attention_rollout([torch.full((1, 2, 9, 9), 1 / 9)] * 4)
    assert torch.allclose(pooled_rollout(uniform), torch.full((1, 9), 1 / 9))


def test_rollout_peaks_on_the_patch_every_token_attends_to():
    """All heads of all 4 layers send all attention to patch 5; with the residual identity a
    token keeps half of itself per layer, so each other token ends 1 - 0.5^4 on patch 5."""
    n, layers, target = 9, 4, 5
    probs = torch.zeros(1, 3, n, n)
    probs[..., target] = 1.0
    pooled = pooled_rollout(attention_rollout([probs] * layers))[0]
    expected = ((n - 1) * (1 - 0.5**layers) + 1) / n
    assert int(pooled.argmax()) == target
    assert float(pooled[target]) == pytest.approx(expected)
    assert torch.allclose(pooled.sum(), torch.tensor(1.0))


def test_recomputed_attention_is_what_the_module_computes():
    torch.manual_seed(0)
    module = MultiHeadSelfAttention(16, heads=4).eval()
    x = torch.randn(3, 9, 16)
    probs, v = attention_probabilities(module, x)
    assert probs.shape == (3, 4, 9, 9) and torch.allclose(probs.sum(-1), torch.ones(3, 4, 9))
    assert torch.allclose(output_from_probabilities(module, probs, v), module(x), atol=1e-6)


class ScaledAttention(MultiHeadSelfAttention):
    """An attention layer changed behind the recorder's back (its output no longer proj(PV))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_the_recorder_keeps_every_layer_and_refuses_an_attention_it_cannot_reproduce():
    torch.manual_seed(0)
    model = build_model("vit_tiny", 4, 1, 8, image_size=12).eval()
    with AttentionRecorder(model) as recorder, torch.inference_mode():
        model(torch.rand(2, 1, 12, 12))
    assert [tuple(p.shape) for p in recorder.probabilities] == [(2, 4, 9, 9)] * 4

    changed = nn.Sequential(ScaledAttention(8, heads=2))
    with pytest.raises(RuntimeError, match="no longer computes"), AttentionRecorder(changed):
        changed(torch.randn(1, 4, 8))


def mlp_model(size: int, hidden: int) -> nn.Sequential:
    """An MLP in the zoo's shape (Normalize, body): no convolutions at all."""
    body = nn.Sequential(
        nn.Flatten(), nn.Linear(size * size, hidden), nn.ReLU(), nn.Linear(hidden, 4)
    )
    return nn.Sequential(Normalize(0.5, 0.5, 1), body)


def by_view(report: dict) -> dict[str, dict]:
    """The report's ``inside`` entries by view, each checked to name a file it drew."""
    entries = {entry.pop("view"): entry for entry in report["inside"]}
    assert list(entries) == ["first_layer_filters", "feature_maps", "attention_rollout"]
    return entries


def views(model: nn.Module, tmp_path: Path, size: int, channels: int = 1, count: int = 2):
    split = synthetic_split(3, size=size, channels=channels)
    probabilities = predict_logits(model, split.images, 64).softmax(1).numpy()
    pngs = [tmp_path / f"{name}.png" for name in ("maps", "filters", "rollout")]
    report = write_inside_views(
        model, split.images, split.labels, probabilities, CLASSES, count, *pngs, "t", tmp_path
    )
    entries = by_view(report)
    for entry, png in zip(entries.values(), pngs[1:2] + pngs[:1] + pngs[2:], strict=True):
        assert entry["file"] == png.name and entry["panels"] == panels(png)
    return report["inside_images"], entries, pngs


def test_an_mlp_shows_its_first_layer_as_templates_and_says_why_the_rest_is_empty(tmp_path):
    _, entries, (maps, filters, rollout) = views(mlp_model(12, 20), tmp_path, 12)
    assert entries["feature_maps"]["skipped"] == "the model has no convolutional layers"
    assert entries["attention_rollout"]["skipped"] == "the model has no self-attention layers"
    assert entries["first_layer_filters"]["layer"] == "1" and panels(filters) == 20  # per unit
    assert "skipped" not in entries["first_layer_filters"]
    assert panels(maps) == 0 and panels(rollout) == 0  # message figures, still valid PNGs


@pytest.mark.parametrize("width", [4, 6])
def test_resnet_filters_follow_the_first_conv_and_maps_the_chosen_layers(tmp_path, width):
    torch.manual_seed(0)
    model = build_model("resnet_small", 4, 1, width, image_size=12).eval()
    images, entries, (maps, filters, _) = views(model, tmp_path, 12, count=3)
    convs = modules_in_forward_order(model, torch.rand(1, 1, 12, 12), (nn.Conv2d,))
    assert entries["first_layer_filters"]["layer"] == convs[0][0] == "0.0"
    assert panels(filters) == width
    layers = entries["feature_maps"]["layers"]
    assert layers == [convs[0][0], convs[len(convs) // 2][0], convs[-1][0]]
    # Each (image, layer) row: the image and the layer's strongest channels (capped).
    assert len(images) == 3
    shown = [dict(convs)[name].out_channels for name in layers]
    assert shown == [width, 2 * width, 4 * width]
    assert panels(maps) == 3 * sum(1 + min(MAPS_PER_LAYER, c) for c in shown)
    assert entries["attention_rollout"]["skipped"] == "the model has no self-attention layers"


# The ImageNet backbones are big (up to 28 M parameters, even at 32x32): slow, still run in CI.
ZOO = [
    pytest.param(name, marks=pytest.mark.slow) if model_contract(name).channels else name
    for name in available_models()
]


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_gets_its_views(tmp_path, name):
    """Pretrained backbones included (random weights: the architecture is what matters). The
    first layer is a conv's filters, or (an MLP) the first Linear's rows as images."""
    torch.manual_seed(0)
    channels = model_contract(name).channels or 1
    model = build_model(name, 4, channels, 8, image_size=32).eval()
    _, entries, (maps, filters, rollout) = views(model, tmp_path, 32, channels, count=1)
    probe = torch.rand(1, channels, 32, 32)
    first = modules_in_forward_order(model, probe, (nn.Conv2d, nn.Linear))[0][1]
    out = first.out_channels if isinstance(first, nn.Conv2d) else first.out_features
    assert panels(filters) == min(out, MAX_FILTERS)
    if modules_in_forward_order(model, probe, (nn.Conv2d,)):
        assert 1 <= len(entries["feature_maps"]["layers"]) <= 3 and panels(maps) > 1
    else:
        assert entries["feature_maps"]["skipped"] == "the model has no convolutional layers"
    assert panels(rollout) == (2 if name == "vit_tiny" else 0)


def test_evaluate_stage_writes_the_views_and_logs_them_to_the_training_run(project):
    """vit_tiny (12x12, 3x3 patches) through the real stage and a real SQLite MLflow."""
    write_dataset(
        project.dataset,
        synthetic_split(6, seed=1),
        synthetic_split(3, seed=2),
        {"name": "synthetic", "classes": CLASSES, "fraction": 1.0, "source": {}},
    )
    torch.manual_seed(0)
    spec = ModelSpec("vit_tiny", 8, 4, 1, 12, tuple(CLASSES), 0.3, 0.3)
    save_checkpoint(project.checkpoint, spec.build(), spec)
    mlflow.set_tracking_uri(f"sqlite:///{project.root / 'mlflow.db'}")
    with mlflow.start_run() as run:
        pass
    write_json(project.train_report, {"mlflow_run_id": run.info.run_id})

    report = evaluate.run(tiny_params(evaluate={"inside_images": 3}), project)

    assert report == read_json(project.evaluate_report) and len(report["inside_images"]) == 3
    entries = by_view(report)
    assert {view: e["file"] for view, e in entries.items()} == {
        "first_layer_filters": "reports/plots/first_layer_filters.png",
        "feature_maps": "reports/plots/feature_maps.png",
        "attention_rollout": "reports/plots/attention_rollout.png",
    }
    assert not any("skipped" in e for e in entries.values())
    assert entries["attention_rollout"]["layers"] == 4 and entries["attention_rollout"]["grid"] == [
        3,
        3,
    ]
    assert entries["feature_maps"]["layers"] == ["0.proj"]
    assert panels(project.attention_rollout_plot) == 2 * 3
    assert panels(project.first_layer_filters_plot) == 16  # 2 * width patch filters
    assert panels(project.feature_maps_plot) == 3 * (1 + MAPS_PER_LAYER)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"feature_maps.png", "first_layer_filters.png", "attention_rollout.png"} <= artifacts


def test_no_images_asked_for_still_draws_the_filters_and_says_why_the_rest_is_empty(tmp_path):
    torch.manual_seed(0)
    model = build_model("vit_tiny", 4, 1, 8, image_size=12).eval()
    images, entries, (maps, filters, rollout) = views(model, tmp_path, 12, count=0)
    assert images == [] and panels(filters) == 16
    reason = "no test images chosen (evaluate.inside_images is 0)"
    assert entries["feature_maps"]["skipped"] == entries["attention_rollout"]["skipped"] == reason
    assert panels(maps) == panels(rollout) == 0

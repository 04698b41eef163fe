"""Transfer learning: features from another dataset's checkpoint, a new classifier, a linear
probe on frozen features, then fine-tuning."""

from __future__ import annotations

import pytest
import torch

from imageclf.checkpoint import ModelSpec, load_pretrained_features, save_checkpoint
from imageclf.engine import train_model
from imageclf.models import build_model, split_head
from imageclf.stage import StageError
from stages import train
from tests.conftest import synthetic_split, tiny_params


@pytest.fixture
def source_checkpoint(tmp_path):
    """A 4-class model as another dataset's training would leave it."""
    torch.manual_seed(1)
    spec = ModelSpec("resnet_small", 8, 4, 1, 12, tuple("abcd"), 0.2, 0.3)
    model = spec.build()
    with torch.no_grad():  # make the BN statistics non-default, so copying them is visible
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    return save_checkpoint(tmp_path / "source.pt", model, spec), model


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_features_come_from_the_checkpoint_and_the_classifier_is_new(source_checkpoint):
    path, source = source_checkpoint
    model = build_model("resnet_small", num_classes=3, in_channels=1, width=8, image_size=12)
    copied = load_pretrained_features(model, path)
    theirs = split_head(source)[0][1:].state_dict()  # without Normalize
    ours = split_head(model)[0][1:].state_dict()
    assert copied == len(ours) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert split_head(model)[1].out_features == 3  # the new dataset's classes


def test_linear_probe_then_fine_tuning(source_checkpoint):
    path, _ = source_checkpoint
    model = build_model("resnet_small", num_classes=3, in_channels=1, width=8, image_size=12)
    load_pretrained_features(model, path)
    features, head = split_head(model)
    before_features, before_head = state(features), state(head)
    cfg = tiny_params(train={"epochs": 2, "freeze_epochs": 1, "batch_size": 16}).train
    cfg_probe = cfg.model_copy(update={"epochs": 1})
    split = synthetic_split(12, num_classes=3)
    train_model(model, split, None, cfg_probe, seed=0, progress=False)
    after = state(features)
    assert all(torch.equal(after[k], before_features[k]) for k in after), "features moved"
    assert not all(torch.equal(state(head)[k], before_head[k]) for k in before_head)
    train_model(model, split, None, cfg.model_copy(update={"freeze_epochs": 0}), seed=0)
    assert not all(torch.equal(state(features)[k], after[k]) for k in after), "no fine-tuning"


def test_a_checkpoint_of_another_shape_is_refused_with_the_reason(source_checkpoint):
    path, _ = source_checkpoint
    wider = build_model("resnet_small", num_classes=3, in_channels=1, width=16, image_size=12)
    with pytest.raises(ValueError, match="width 8"):
        load_pretrained_features(wider, path)


def test_train_stage_uses_init_from_and_refuses_freezing_without_it(project, source_checkpoint):
    path, _ = source_checkpoint
    result = train.run(
        tiny_params(train={"width": 8, "init_from": str(path), "freeze_epochs": 1}), project
    )
    assert result["epochs"] == 1
    with pytest.raises(StageError, match=r"needs train\.init_from"):
        train.run(tiny_params(train={"freeze_epochs": 1}), project)
    with pytest.raises(StageError, match="does not fit"):
        train.run(tiny_params(train={"width": 16, "init_from": str(path)}), project)
    with pytest.raises(StageError, match="no file at"):
        train.run(tiny_params(train={"init_from": "models/nowhere.pt"}), project)
    garbage = project.root / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    before = project.checkpoint.read_bytes()
    with pytest.raises(StageError, match="not a checkpoint this project wrote"):
        train.run(tiny_params(train={"init_from": str(garbage)}), project)
    assert project.checkpoint.read_bytes() == before  # the trained model is still there

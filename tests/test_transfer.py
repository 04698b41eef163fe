"""Transfer learning: features from another dataset's checkpoint, a new classifier, a linear
probe on frozen features, then fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imageclf.data.store import channel_statistics
from imageclf.errors import StageError
from imageclf.models.checkpoint import ModelSpec, load_pretrained_features, save_checkpoint
from imageclf.models.zoo import build_model, model_contract, split_head
from imageclf.training.engine import train_model
from imageclf.training.spec import training_spec
from stages import train
from tests.conftest import synthetic_split, tiny_params

SOURCE_MODEL = "resnet_small"  # the architecture of the checkpoint below


@pytest.fixture
def source_checkpoint(tmp_path):
    """A 4-class model as another dataset's training would leave it."""
    torch.manual_seed(1)
    spec = ModelSpec(SOURCE_MODEL, 8, 4, 1, 12, tuple("abcd"), 0.2, 0.3)
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
        tiny_params(
            train={"model": SOURCE_MODEL, "width": 8, "init_from": str(path), "freeze_epochs": 1}
        ),
        project,
    )
    assert result["epochs"] == 1
    with pytest.raises(StageError, match=r"needs train\.init_from"):
        train.run(tiny_params(train={"freeze_epochs": 1}), project)
    with pytest.raises(StageError, match="does not fit"):
        train.run(
            tiny_params(train={"model": SOURCE_MODEL, "width": 16, "init_from": str(path)}),
            project,
        )
    with pytest.raises(StageError, match="no file at"):
        train.run(tiny_params(train={"init_from": "models/nowhere.pt"}), project)
    garbage = project.root / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    before = project.checkpoint.read_bytes()
    with pytest.raises(StageError, match="not a checkpoint this project wrote"):
        train.run(tiny_params(train={"init_from": str(garbage)}), project)
    assert project.checkpoint.read_bytes() == before  # the trained model is still there


# ------------------------------------------------------------- ImageNet-style transfer learning
def pretrained_resnet(source_checkpoint) -> torch.nn.Module:
    """A 3-class resnet_small whose features come from the source checkpoint."""
    path, _ = source_checkpoint
    model = build_model("resnet_small", num_classes=3, in_channels=1, width=8, image_size=12)
    load_pretrained_features(model, path)
    return model


def snapshots(model: torch.nn.Module, cfg, split) -> list[dict[str, torch.Tensor]]:
    """The model's state before training and after every epoch."""
    states = [state(model)]
    train_model(
        model, split, None, cfg, seed=0, progress=False,
        on_epoch_end=lambda _m, model_, _o: states.append(state(model_)),
    )  # fmt: skip
    return states


def changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def test_discriminative_learning_rates_per_layer_group(source_checkpoint):
    from imageclf.training.engine import make_optimizer, make_scheduler
    from imageclf.training.transfer import TransferPlan

    model = pretrained_resnet(source_checkpoint)
    cfg = tiny_params(train={"lr": 0.1, "layer_lr_decay": 0.5, "weight_decay": 0.01}).train
    plan = TransferPlan.for_model(model, cfg, pretrained=False)
    plan.prepare()
    optimizer = make_optimizer(model, cfg, plan)
    make_scheduler(optimizer, cfg, total_steps=100)  # OneCycle keeps the ratios
    depth_of = {}
    for group in optimizer.param_groups:
        assert group["max_lr"] == pytest.approx(0.1 * 0.5 ** group["depth"])
        for p in group["params"]:
            depth_of[id(p)] = group["depth"]
            assert group["weight_decay"] == (0.01 if p.ndim > 1 else 0.0)  # no decay on norm/bias
    body = model[-1]
    assert len(depth_of) == sum(1 for _ in model.parameters())  # every parameter, once
    assert depth_of[id(body[-1].weight)] == 0  # the classifier learns at train.lr
    assert depth_of[id(body[4].body[0][0].weight)] == 1  # the top block
    assert depth_of[id(body[0][0].weight)] == 5  # the stem, lowest


def test_gradual_unfreezing_adds_one_group_per_epoch_from_the_top(source_checkpoint, tmp_path):
    model = pretrained_resnet(source_checkpoint)
    path, _ = source_checkpoint
    cfg = tiny_params(
        train={
            "epochs": 3, "freeze_epochs": 1, "unfreeze": "gradual", "freeze_bn": False,
            "batch_size": 16, "init_from": str(path), "optimizer": "adamw", "lr": 0.01,
        }
    ).train  # fmt: skip
    states = snapshots(model, cfg, synthetic_split(12, num_classes=3))
    # body children: 0 stem, 1 conv, 2 residual, 3 conv, 4 residual (top), 7 classifier
    learned = [
        [changed(states[e - 1], states[e], f"1.{i}.") for i in (0, 1, 2, 3, 4, 7)]
        for e in (1, 2, 3)
    ]
    assert learned[0] == [False, False, False, False, False, True]  # the head only
    assert learned[1] == [False, False, False, False, True, True]  # + the top group
    assert learned[2] == [False, False, False, True, True, True]  # + the next one
    assert all(p.requires_grad for p in model.parameters())  # released after training


def test_frozen_groups_never_learn_and_the_ones_above_do(source_checkpoint):
    """train.frozen_groups: the lowest groups keep their pretrained weights and statistics for
    the whole run (no backward through them), the rest trains from the first epoch."""
    model = pretrained_resnet(source_checkpoint)
    path, _ = source_checkpoint
    cfg = tiny_params(
        train={
            "epochs": 2, "frozen_groups": 2, "freeze_bn": False, "batch_size": 16,
            "init_from": str(path), "optimizer": "adamw", "lr": 0.01,
        }
    ).train  # fmt: skip
    states = snapshots(model, cfg, synthetic_split(12, num_classes=3))
    # body children, each with weights a group: 0 stem, 1 conv, 2 residual, 3 conv, 4 residual
    # (top), 7 classifier
    for epoch in (1, 2):
        learned = [changed(states[epoch - 1], states[epoch], f"1.{i}.") for i in (0, 1, 2, 3, 4, 7)]
        assert learned == [False, False, True, True, True, True]
    assert all(p.requires_grad for p in model.parameters())  # released after training
    whole = tiny_params(train={"frozen_groups": 5, "init_from": str(path)}).train
    with pytest.raises(StageError, match="would freeze all 5 layer groups"):
        train_model(
            pretrained_resnet(source_checkpoint), synthetic_split(12, 3), None, whole, seed=0
        )


def test_frozen_batch_norm_keeps_its_statistics_and_affine_while_convs_learn(source_checkpoint):
    path, _ = source_checkpoint
    split = synthetic_split(12, num_classes=3)
    for freeze_bn in (True, False):
        model = pretrained_resnet(source_checkpoint)
        cfg = tiny_params(
            train={"epochs": 1, "batch_size": 16, "init_from": str(path), "freeze_bn": freeze_bn}
        ).train
        before, after = snapshots(model, cfg, split)
        bn = [k for k in before if k.startswith("1.") and ".1." in k and "running" in k]
        convs = [k for k in before if k.endswith("0.weight") and before[k].ndim == 4]
        assert bn and convs
        assert any(not torch.equal(before[k], after[k]) for k in convs)  # the backbone learns
        bn_moved = [k for k in before if ("running" in k or ".1.weight" in k or ".1.bias" in k)]
        moved = any(not torch.equal(before[k], after[k]) for k in bn_moved if k.startswith("1."))
        assert moved != freeze_bn, f"freeze_bn={freeze_bn}"


def test_feature_extraction_computes_features_once_and_trains_only_the_head(source_checkpoint):
    model = pretrained_resnet(source_checkpoint)
    path, _ = source_checkpoint
    calls = []
    model[0].register_forward_hook(lambda _m, inputs, _o: calls.append(len(inputs[0])))
    cfg = tiny_params(
        train={"epochs": 4, "batch_size": 8, "transfer": "features", "init_from": str(path)}
    ).train
    train_split, val_split = synthetic_split(10, num_classes=3), synthetic_split(3, num_classes=3)
    before = state(model)
    history = train_model(model, train_split, val_split, cfg, seed=0, progress=False)
    assert sum(calls) == len(train_split) + len(val_split)  # each image once, not once an epoch
    assert len(history.epochs) == 4 and history.final.val_accuracy is not None
    after = state(model)
    assert not changed(before, after, "0.") and not changed(before, after, "1.0.")
    assert not any(changed(before, after, f"1.{i}.") for i in range(5)), "the backbone moved"
    assert changed(before, after, "1.7.")  # the new head learned
    assert history.final.train_loss < history.epochs[0].train_loss


@pytest.fixture
def rgb_project(project):
    """The project fixture with a tiny RGB dataset (32x32: Lite0's five stride-2 stages fit)."""
    from imageclf.data.store import write_dataset

    rng = np.random.default_rng(0)
    train_split = synthetic_split(12, size=32, seed=1, channels=3)
    train_split.images[..., 0] //= 2  # channels with different statistics
    train_split.images[..., 2] = rng.integers(100, 200, train_split.images.shape[:3])
    meta = {"name": "synthetic", "classes": ["a", "b", "c", "d"], "fraction": 1.0, "source": {}}
    write_dataset(
        project.dataset, train_split, synthetic_split(4, size=32, seed=2, channels=3), meta
    )
    return project


def test_train_stage_feature_extraction_on_imagenet_lite0(rgb_project):
    from imageclf.models.backbones import lite0_packaged_weights, read_state_dict
    from imageclf.models.checkpoint import load_checkpoint
    from imageclf.models.zoo import IMAGENET_MEAN

    params = tiny_params(
        train={
            "model": "efficientnet_lite0", "pretrained": "imagenet", "transfer": "features",
            "epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.01,
        }
    )  # fmt: skip
    assert train.run(params, rgb_project)["epochs"] == 2
    model, spec, _ = load_checkpoint(rgb_project.checkpoint)
    assert spec.pretrained == "imagenet" and spec.mean == IMAGENET_MEAN  # the weights' contract
    imagenet = read_state_dict(lite0_packaged_weights())
    body = model[-1]
    assert torch.equal(body.stem.conv.weight, imagenet["_conv_stem.weight"])  # loaded, frozen
    assert torch.equal(body.head.bn.running_var, imagenet["_bn1.running_var"])
    assert body.classifier.out_features == 4


def test_train_stage_refuses_transfer_settings_it_cannot_honour(rgb_project, source_checkpoint):
    path, _ = source_checkpoint
    with pytest.raises(StageError, match="ships no weights here"):
        train.run(
            tiny_params(train={"model": "tv_resnet18", "pretrained": "imagenet"}), rgb_project
        )
    with pytest.raises(StageError, match="both name starting weights"):
        train.run(
            tiny_params(train={"pretrained": "imagenet", "init_from": str(path)}), rgb_project
        )
    with pytest.raises(StageError, match=r"features needs train\.init_from or train\.pretrained"):
        train.run(tiny_params(train={"transfer": "features"}), rgb_project)
    with pytest.raises(StageError, match=r"train\.frozen_groups needs train\.init_from"):
        train.run(tiny_params(train={"frozen_groups": 2}), rgb_project)
    with pytest.raises(StageError, match="has no pretrained weights"):
        train.run(tiny_params(train={"pretrained": "imagenet"}), rgb_project)


def test_imagenet_backbone_on_grayscale_data_says_to_set_channels(project):
    params = tiny_params(train={"model": "efficientnet_lite0", "pretrained": "imagenet"})
    with pytest.raises(StageError, match=r"data\.channels: 3"):
        train.run(params, project)


def test_from_scratch_models_normalise_with_per_channel_dataset_statistics(rgb_project):
    from imageclf.data.store import load_dataset, split_train_val
    from imageclf.models.checkpoint import load_checkpoint

    train.run(tiny_params(), rgb_project)
    _, spec, _ = load_checkpoint(rgb_project.checkpoint)
    dataset = load_dataset(rgb_project.dataset)
    index, _ = split_train_val(dataset.train.labels, 0.1, 42)
    pixels = dataset.train.images[index].reshape(-1, 3) / 255.0
    assert spec.mean == pytest.approx(tuple(pixels.mean(0)), abs=1e-6)
    assert spec.std == pytest.approx(tuple(pixels.std(0)), abs=1e-6)
    assert len(set(spec.mean)) == 3


def test_training_spec_normalises_by_the_data_or_by_the_pretrained_weights():
    """One spec for every trainer: from scratch the model divides by the training split's own
    per-channel statistics; pretrained, by the ones its weights were trained with."""
    split = synthetic_split(5, channels=3)
    classes = list("abcd")
    scratch = tiny_params(train={"model": SOURCE_MODEL}).train
    spec = training_spec(scratch, classes, (3, 12, 12), split.images)
    mean, std = channel_statistics(split.images)
    assert spec.mean == pytest.approx(tuple(mean)) and spec.std == pytest.approx(tuple(std))
    assert (spec.name, spec.width, spec.num_classes, spec.image_size) == (SOURCE_MODEL, 8, 4, 12)
    assert spec.classes == tuple(classes) and spec.pretrained == ""

    lite = tiny_params(train={"model": "efficientnet_lite0", "pretrained": "imagenet"}).train
    spec = training_spec(lite, classes, (3, 12, 12), split.images)
    contract = model_contract("efficientnet_lite0")
    assert (spec.mean, spec.std, spec.pretrained) == (contract.mean, contract.std, "imagenet")
    warm = tiny_params(train={"model": SOURCE_MODEL, "init_from": "models/old.pt"}).train
    assert training_spec(warm, classes, (3, 12, 12), split.images).pretrained == "checkpoint"

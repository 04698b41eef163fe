"""Smaller and faster models (course module 7.1): pruning, PyTorch quantization and
distillation on tiny models and data, each measured and put through the accuracy gate."""

from __future__ import annotations

import shutil
from dataclasses import replace

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imageclf.data.transforms import to_model_input
from imageclf.deploy import compress
from imageclf.deploy.candidates import (
    DISTILLED,
    DYNAMIC,
    STATIC,
    STRUCTURED,
    UNSTRUCTURED,
    compress_candidates,
)
from imageclf.deploy.distill import distill, distillation_loss, finetune
from imageclf.deploy.export import load_torchscript
from imageclf.errors import InvalidInput
from imageclf.models.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from imageclf.models.zoo import build_model
from stages import optimize, train
from tests.conftest import synthetic_split, tiny_params

SIZE, CLASSES = 12, 4


@pytest.fixture(scope="module")
def data():
    return synthetic_split(24, size=SIZE, seed=1), synthetic_split(8, size=SIZE, seed=2)


def trained(name: str, data, steps: int = 60, seed: int = 0) -> nn.Module:
    """A tiny model that learned the synthetic classes (plain CE, the shared fine-tune loop)."""
    torch.manual_seed(seed)
    model = build_model(name, CLASSES, 1, width=8, image_size=SIZE)
    finetune(model, data[0], steps, lr=0.05, batch_size=32, seed=seed)
    return model.eval()


@pytest.fixture(scope="module")
def resnet(data) -> nn.Module:
    model = trained("resnet_small", data)
    assert compress.accuracy_of(model, *astuple(data[1]), batch=64) > 0.9
    return model


@pytest.fixture(scope="module")
def cnn(data) -> nn.Module:
    return trained("simple_cnn", data, steps=40)


def astuple(split):
    return split.images, split.labels


def outputs(model: nn.Module, images: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(to_model_input(images))


# ---------------------------------------------------------------------------- unstructured


def test_unstructured_pruning_reaches_the_requested_sparsity_and_is_permanent(resnet, data):
    pruned = compress.prune_unstructured(resnet, 0.6)
    assert compress.weight_sparsity(pruned) == pytest.approx(0.6, abs=1e-4)
    assert compress.weight_sparsity(resnet) == 0.0, "the input model was changed"
    keys = pruned.state_dict().keys()
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in keys)
    assert keys == resnet.state_dict().keys()  # loads into the unpruned architecture
    before, after = compress.size_report(resnet), compress.size_report(pruned)
    assert after["state_dict_bytes"] == before["state_dict_bytes"]  # dense tensors
    assert after["deflated_bytes"] < 0.8 * before["deflated_bytes"]  # zeros deflate


def test_fine_tuning_under_the_masks_keeps_pruned_weights_at_zero(resnet, data):
    pruned = compress.prune_unstructured(
        resnet, 0.7, lambda m: finetune(m, data[0], 5, lr=0.05, batch_size=32, seed=0)
    )
    assert compress.weight_sparsity(pruned) == pytest.approx(0.7, abs=1e-4)


# ------------------------------------------------------------------------------ structured


def silence_channels(conv: nn.Conv2d, after: nn.Module, channels: list[int]) -> None:
    """Make ``channels`` of ``conv`` the weakest (tiny filters) and dead after the ReLU (a very
    negative bias, through the BN ``after`` when there is one): removing them must then change
    no output at all, which checks every index of the surgery."""
    with torch.no_grad():
        conv.weight[channels] *= 1e-3
        if isinstance(after, nn.BatchNorm2d):
            after.bias[channels] = -1e4
        else:
            conv.bias[channels] = -1e4


def test_channel_pruning_really_shrinks_the_layers(resnet, cnn, data):
    slim, facts = compress.prune_channels(resnet, 0.5)
    assert facts["prunable_convs"] == 3 and facts["channels_removed"] == (8 + 16 + 32) // 2
    assert facts["parameters_after"] < 0.8 * facts["parameters_before"]
    assert slim[1][0][0].out_channels == 4 and slim[1][1][0].in_channels == 4
    assert resnet[1][0][0].out_channels == 8, "the input model was changed"
    slim_cnn, _ = compress.prune_channels(cnn, 0.5)
    assert slim_cnn[1][8].in_features == cnn[1][8].in_features // 2  # flattened columns
    for model, small in ((resnet, slim), (cnn, slim_cnn)):
        assert outputs(small, data[1].images).shape == outputs(model, data[1].images).shape


def test_channel_surgery_is_exact_when_the_removed_channels_are_dead(cnn, data):
    """simple_cnn with every prunable conv's weakest half silenced: pruning half the channels
    removes exactly those, so the logits do not change."""
    model = compress.prune_unstructured(cnn, 0.0)
    body = model[1]
    for conv_index in (0, 3):
        conv = body[conv_index]
        silence_channels(conv, body[conv_index + 1], list(range(0, conv.out_channels, 2)))
    slim, facts = compress.prune_channels(model, 0.5)
    assert facts["channels_removed"] == (body[0].out_channels + body[3].out_channels) // 2
    torch.testing.assert_close(
        outputs(slim, data[1].images), outputs(model, data[1].images), atol=1e-4, rtol=1e-4
    )


def test_residual_block_channel_surgery_is_exact(resnet, data):
    model = compress.prune_unstructured(resnet, 0.0)
    for index in (2, 4):  # the residual blocks: their inner conv -> BN -> ReLU -> conv
        inner = model[1][index].body[0]
        silence_channels(inner[0], inner[1], list(range(0, inner[0].out_channels, 2)))
    stem = model[1][0]
    silence_channels(stem[0], stem[1], list(range(0, stem[0].out_channels, 2)))
    slim, facts = compress.prune_channels(model, 0.5)
    assert facts["prunable_convs"] == 3  # residual-tied channels are left alone
    torch.testing.assert_close(
        outputs(slim, data[1].images), outputs(model, data[1].images), atol=1e-4, rtol=1e-4
    )


# ---------------------------------------------------------------------------- quantization


def test_dynamic_quantization_really_quantizes_every_linear(cnn, data):
    dq = compress.quantize_dynamic_linear(cnn)
    linears = [m for m in dq.modules() if type(m) is nn.Linear]
    dynamic = [m for m in dq.modules() if compress.is_dynamic_quantized(m)]
    assert not linears and len(dynamic) == 2
    assert dynamic[0].weight().dtype == torch.qint8
    assert any(type(m) is nn.Linear for m in cnn.modules()), "the input model was changed"
    # simple_cnn's weights are mostly its first Linear: INT8 stores them in a quarter.
    assert (
        compress.size_report(dq)["state_dict_bytes"]
        < 0.5 * compress.size_report(cnn)["state_dict_bytes"]
    )
    x = data[1].images
    agree = (outputs(dq, x).argmax(1) == outputs(cnn, x).argmax(1)).float().mean()
    assert agree >= 0.9


@pytest.mark.parametrize("qat", [False, True])
def test_static_int8_runs_int8_kernels_with_measured_accuracy(resnet, data, qat):
    calib = data[0].images

    def calibrate(observed: nn.Module) -> None:
        with torch.inference_mode():
            observed(to_model_input(calib))

    def train_qat(prepared: nn.Module) -> None:
        finetune(prepared, data[0], 5, lr=0.001, batch_size=32, seed=0)

    q = compress.quantize_static_fx(
        resnet, to_model_input(calib[:8]), calibrate, train_qat if qat else None
    )
    assert compress.is_int8_graph(q)
    assert not compress.is_int8_graph(resnet)
    acc = compress.accuracy_of(q, *astuple(data[1]), batch=16)
    assert acc >= compress.accuracy_of(resnet, *astuple(data[1]), batch=16) - 0.1


# ------------------------------------------------------------------------------ distillation


def test_distillation_loss_with_alpha_zero_is_plain_cross_entropy():
    torch.manual_seed(0)
    student, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    teacher_a, teacher_b = torch.randn(6, 4), torch.randn(6, 4)
    plain = F.cross_entropy(student, labels)
    assert distillation_loss(student, teacher_a, labels, 4.0, 0.0) == plain
    assert distillation_loss(student, teacher_a, labels, 4.0, 0.5) != distillation_loss(
        student, teacher_b, labels, 4.0, 0.5
    )
    # alpha 1, student equal to the teacher: the soft term is zero.
    assert distillation_loss(teacher_a, teacher_a, labels, 2.0, 1.0) == pytest.approx(0, abs=1e-6)


def test_the_student_learns_the_teachers_answers_not_the_labels(resnet, data):
    """A teacher that swaps classes 0<->1 and 2<->3: distilled with alpha 1 the student answers
    like the teacher; with alpha 0 (plain CE) it answers like the labels."""
    teacher = compress.prune_unstructured(resnet, 0.0)
    with torch.no_grad():
        head = teacher[1][-1]
        head.weight.copy_(head.weight[[1, 0, 3, 2]])
        head.bias.copy_(head.bias[[1, 0, 3, 2]])
    test = data[1]
    teacher_answers = outputs(teacher, test.images).argmax(1).numpy()
    assert (teacher_answers == test.labels).mean() < 0.2
    cfg = tiny_params(train={"batch_size": 32, "augment": []}).train
    agreement = {}
    for alpha in (1.0, 0.0):
        torch.manual_seed(0)
        student = build_model("resnet_small", CLASSES, 1, width=8, image_size=SIZE)
        history = distill(student, teacher, data[0], cfg, 15, 2.0, alpha, seed=0)
        assert history["steps"] == 45  # 96 images / batch 32 * 15 epochs
        answers = outputs(student, test.images).argmax(1).numpy()
        agreement[alpha] = (answers == teacher_answers).mean(), (answers == test.labels).mean()
    assert agreement[1.0][0] >= 0.8  # follows the teacher
    assert agreement[0.0][1] >= 0.8 and agreement[0.0][0] < 0.2  # follows the labels


# ------------------------------------------------------------------------------------ gate


def spec_of(model_name: str) -> ModelSpec:
    return ModelSpec(
        name=model_name,
        width=8,
        num_classes=CLASSES,
        in_channels=1,
        image_size=SIZE,
        classes=("a", "b", "c", "d"),
        mean=(0.5,),
        std=(0.5,),
    )


def test_gate_rejects_an_extreme_sparsity_and_writes_only_kept_models(resnet, data, tmp_path):
    params = tiny_params(
        optimize={"prune_sparsity": 0.99, "channel_prune_ratio": 0.5, "latency_iterations": 2}
    )
    (tmp_path / f"{UNSTRUCTURED}.pt").write_bytes(b"stale")  # from an earlier run
    report = compress_candidates(
        resnet,
        spec_of("resnet_small"),
        test=astuple(data[1]),
        train=data[0],
        calibration=data[0].images,
        cfg=params.optimize,
        train_cfg=params.train,
        eval_batch=32,
        seed=0,
        out_dir=tmp_path,
        teacher=None,
    )
    base, found = report["baseline"], report["candidates"]
    assert base["accuracy"] > 0.9 and base["latency_ms"] > 0
    pruned = found[UNSTRUCTURED]
    assert pruned["sparsity"] == pytest.approx(0.99, abs=1e-3)
    assert not pruned["kept"] and pruned["accuracy_drop"] > params.optimize.max_accuracy_drop
    assert pruned["reason"].startswith("rejected: accuracy drop")
    assert not (tmp_path / f"{UNSTRUCTURED}.pt").exists()
    for name in (UNSTRUCTURED, STRUCTURED, DYNAMIC, STATIC):
        record = found[name]
        assert record["accuracy_drop"] == pytest.approx(base["accuracy"] - record["accuracy"])
        assert record["kept"] == (record["accuracy_drop"] <= params.optimize.max_accuracy_drop)
        assert record["speedup"] > 0 and record["deflated_ratio"] > 0
        assert (tmp_path / f"{name}.pt").exists() == record["kept"]
    assert found[STATIC]["state_dict_ratio"] < 0.5  # INT8 weights
    assert found[DYNAMIC]["quantized_linear_layers"] == 1
    assert found[DISTILLED]["skipped"] and "distill_teacher" in found[DISTILLED]["reason"]
    kept = [n for n in report["kept"] if n != DISTILLED]
    assert kept, "nothing passed the gate on an easy task"
    for name in kept:  # a kept file is the candidate itself, loadable without this code
        scripted = load_torchscript(tmp_path / f"{name}.pt")
        with torch.inference_mode():
            got = scripted(to_model_input(data[1].images)).argmax(1).numpy()
        assert (got == data[1].labels).mean() == pytest.approx(found[name]["accuracy"])


# ----------------------------------------------------------------------------------- stage


@pytest.mark.slow
def test_stage_reports_candidates_distills_from_a_teacher_and_logs_to_mlflow(project):
    params = tiny_params(train={"epochs": 2, "width": 8})
    train_result = train.run(params, project)
    teacher = project.models / "teacher.pt"
    shutil.copy(project.checkpoint, teacher)
    missing = tiny_params(optimize={"distill_teacher": "models/nope.pt"})
    with pytest.raises(InvalidInput, match="distill_teacher"):
        optimize.run(missing, project)
    model, spec, _ = load_checkpoint(project.checkpoint)
    save_checkpoint(project.models / "other.pt", model, replace(spec, classes=tuple("wxyz")))
    other = tiny_params(optimize={"distill_teacher": str(project.models / "other.pt")})
    with pytest.raises(InvalidInput, match="other data"):
        optimize.run(other, project)
    assert not project.optimize_report.exists() and not project.optimized_checkpoint.exists()

    params = tiny_params(
        train={"epochs": 2, "width": 8},
        optimize={"distill_teacher": "models/teacher.pt", "distill_epochs": 1},
    )
    report = optimize.run(params, project)
    assert isinstance(report["int8_kept"], bool)  # the existing contract (summary, benchmark)
    assert project.onnx_int8.is_file() and project.optimized_checkpoint.is_file()
    found = report["compression"]["candidates"]
    assert set(found) == {UNSTRUCTURED, STRUCTURED, DYNAMIC, STATIC, DISTILLED}
    student = found[DISTILLED]
    assert 0 <= student["accuracy"] <= 1 and student["teacher_accuracy"] >= 0
    assert student["teacher_latency_ms"] > 0 and student["steps"] >= 1
    for name in report["compression"]["kept"]:
        assert (project.compressed_models / f"{name}.pt").is_file()
    metrics = mlflow.MlflowClient().get_run(train_result["mlflow_run_id"]).data.metrics
    key = f"optimize.compression.candidates.{UNSTRUCTURED}.accuracy_drop"
    assert metrics[key] == pytest.approx(found[UNSTRUCTURED]["accuracy_drop"])
    assert "optimize.compression.baseline.latency_ms" in metrics

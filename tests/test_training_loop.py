"""The loop's standard parts, each against what it promises: exact resume in process, gradient
accumulation = the large batch, parameter groups, LR schedule shapes, clipping and the logged
norm, precision, EMA, early stopping, batch mixing, anomaly detection and the observers."""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from imageclf.data.loaders import LoaderSettings
from imageclf.errors import StageError
from imageclf.models.zoo import available_models, build_model, model_contract
from imageclf.training.ema import WeightEMA
from imageclf.training.engine import (
    NORM_LAYERS,
    ONECYCLE_DIV_FACTOR,
    ONECYCLE_FINAL_DIV_FACTOR,
    ONECYCLE_PCT_START,
    EarlyStopping,
    TrainHistory,
    chosen_weights,
    grad_norm,
    make_optimizer,
    make_scheduler,
    mix_batch,
    optimizer_steps,
    train_model,
)
from imageclf.training.mixing import BatchMixer
from imageclf.training.observers import Observers, TrainingObserver
from tests.conftest import synthetic_split, tiny_params

SPLIT = synthetic_split(6, size=12)  # 24 images, 4 classes
VAL = synthetic_split(3, size=12, seed=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is as fast, and on a busy machine much faster (idle
    OpenMP threads spin while waiting for a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def resnet(seed: int = 0, name: str = "resnet_small") -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 4, 1, 8, image_size=12)


class NoBatchNorm(nn.Sequential):
    """A conv net whose output for an image does not depend on the rest of the batch (no batch
    norm): what gradient accumulation can match exactly."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 4),
        )


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def roundtrip(state: Any) -> Any:
    """What torch.save + torch.load(weights_only=True) of last.pt give back."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("name", ["resnet_small", "simple_cnn"])  # batch norm; dropout
def test_resume_from_epoch_state_gives_the_same_weights(name: str, workers: int) -> None:
    """Resuming after epoch 1 in a process whose random generators were elsewhere, with
    another initial model, ends exactly where the uninterrupted run did: data order,
    augmentation, mixing, dropout, EMA, optimizer momentum and LR schedule all continue
    (with a persistent loader worker too, whose start draws from the global generator)."""
    cfg = tiny_params(
        train={
            "epochs": 3,
            "batch_size": 8,
            "ema_decay": 0.8,
            "cutmix_alpha": 1.0,
            "schedule": "cosine",
        }
    ).train
    settings = LoaderSettings(num_workers=workers)
    model, states = resnet(name=name), {}

    def keep(state: dict[str, Any]) -> None:
        states[state["epoch"]] = roundtrip({**state, "model": snapshot(model)})

    full = train_model(model, SPLIT, VAL, cfg, seed=0, loader=settings, save_state=keep)
    assert [s["finished"] for s in states.values()] == [False, False, True]

    torch.manual_seed(123)  # a new process: its generators are anywhere
    random.seed(123)
    np.random.seed(123)
    again = resnet(seed=7, name=name)
    resumed = train_model(again, SPLIT, VAL, cfg, seed=0, loader=settings, resume=states[1])
    ours, theirs = again.state_dict(), model.state_dict()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    assert resumed.resumed_after_epoch == 1 and [e.epoch for e in resumed.epochs] == [1, 2, 3]
    assert [e.train_loss for e in resumed.epochs] == [e.train_loss for e in full.epochs]
    assert resumed.ema is not None and full.ema is not None
    ema_ours, ema_theirs = resumed.ema.module.state_dict(), full.ema.module.state_dict()
    assert all(torch.equal(ema_ours[k], ema_theirs[k]) for k in ema_ours)


def test_accumulated_small_batches_match_one_large_batch() -> None:
    """k micro-batches of b, each loss scaled by 1/k, give the gradient of one batch of k*b:
    the same steps, the same weights (up to float summation order)."""
    base = {"epochs": 2, "augment": [], "schedule": "constant", "lr": 0.05, "grad_clip_norm": 1.0}
    small = tiny_params(train={**base, "batch_size": 4, "accumulate_steps": 3}).train
    large = tiny_params(train={**base, "batch_size": 12, "accumulate_steps": 1}).train
    models = []
    for cfg in (small, large):
        model = NoBatchNorm()
        train_model(model, SPLIT, None, cfg, seed=0, progress=False)
        models.append(model.state_dict())
    for key in models[0]:
        torch.testing.assert_close(models[0][key], models[1][key], rtol=1e-5, atol=1e-6)
    untouched = NoBatchNorm().state_dict()
    assert not torch.allclose(models[0]["4.weight"], untouched["4.weight"])  # it did train


def test_schedule_is_sized_in_optimizer_steps() -> None:
    """7 batches an epoch at accumulate_steps 3 are 3 optimizer steps (3+3+1); OneCycle over
    them ends at its floor. One step too many and OneCycleLR raises; too few, it ends high."""
    cfg = tiny_params(
        train={"epochs": 4, "batch_size": 4, "accumulate_steps": 3, "schedule": "onecycle"}
    ).train
    data = synthetic_split(7, size=12)  # 28 images: 7 batches of 4
    assert optimizer_steps(7, cfg) == 12
    assert optimizer_steps(7, cfg.model_copy(update={"max_steps": 5})) == 5
    recorder = Recorder()
    train_model(resnet(), data, None, cfg, seed=0, observers=Observers([recorder]))
    used = [s["lr"] for s in recorder.scalars]  # the LR each optimizer step used
    assert len(used) == 12 and max(used) == pytest.approx(cfg.lr)
    floor = cfg.lr / ONECYCLE_DIV_FACTOR / ONECYCLE_FINAL_DIV_FACTOR
    assert used[-1] == pytest.approx(floor, rel=1e-3)


@pytest.mark.parametrize("name", available_models())
def test_no_weight_decay_on_norms_and_biases(name: str) -> None:
    """Every norm layer's parameters and every bias in the no-decay group; every conv and
    linear weight in the decay group (decay on a norm's scale fights the normalisation)."""
    channels = model_contract(name).channels or 1
    model = build_model(name, 4, channels, 8, image_size=12 if channels == 1 else 32)
    decay_group, no_decay_group = make_optimizer(model, tiny_params().train).param_groups
    assert no_decay_group["weight_decay"] == 0 and decay_group["weight_decay"] > 0
    decay = {id(p) for p in decay_group["params"]}
    no_decay = {id(p) for p in no_decay_group["params"]}
    checked = 0
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, NORM_LAYERS) or pname == "bias":
                assert id(p) in no_decay, f"{name}: {type(module).__name__}.{pname} decays"
            elif isinstance(module, nn.Conv2d | nn.Linear):
                assert id(p) in decay, f"{name}: {type(module).__name__}.{pname} does not decay"
            checked += 1
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert checked and len(decay) + len(no_decay) == len(trainable)


def lrs(schedule: str, steps: int = 100) -> list[float]:
    cfg = tiny_params(train={"schedule": schedule, "lr": 0.1}).train
    optimizer = make_optimizer(nn.Linear(2, 2), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_lr_schedule_shapes() -> None:
    onecycle = lrs("onecycle")
    peak = int(np.argmax(onecycle))
    assert abs(peak - ONECYCLE_PCT_START * 100) <= 1 and onecycle[peak] == pytest.approx(0.1)
    assert onecycle[0] == pytest.approx(0.1 / ONECYCLE_DIV_FACTOR)
    assert all(a <= b for a, b in itertools.pairwise(onecycle[: peak + 1]))
    assert all(a >= b for a, b in itertools.pairwise(onecycle[peak:]))
    assert onecycle[-1] < 0.1 / ONECYCLE_DIV_FACTOR / ONECYCLE_FINAL_DIV_FACTOR * 1.1
    cosine = lrs("cosine")
    assert cosine[0] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(cosine))
    assert cosine[-1] < 1e-3 * 0.1
    assert set(lrs("constant")) == {0.1}


class Recorder(TrainingObserver):
    """Keeps every call: what the loop tells observers, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pre_clip: list[float] = []
        self.scalars: list[dict[str, float]] = []
        self.epochs: list[Mapping[str, float]] = []

    def on_train_start(self, model: nn.Module, images: torch.Tensor) -> None:
        self.calls.append("start")
        model.train()
        model(images)  # like a graph trace: must not change BatchNorm's statistics
        torch.rand(3)  # nor the generators training draws from

    def after_backward(self, step: int, model: nn.Module) -> None:
        self.calls.append("backward")
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.pre_clip.append(float(nn.utils.get_total_norm(grads)))

    def on_step_end(self, step: int, scalars: Mapping[str, float]) -> None:
        self.calls.append("step")
        self.scalars.append(dict(scalars))

    def on_epoch_end(self, epoch: int, scalars: Mapping[str, float], model: nn.Module) -> None:
        self.calls.append("epoch")
        self.epochs.append(scalars)

    def close(self) -> None:
        self.calls.append("close")


def test_clipping_logs_the_pre_clip_norm_and_clips_to_the_limit() -> None:
    cfg = tiny_params(train={"epochs": 2, "batch_size": 8, "grad_clip_norm": 0.05}).train
    recorder = Recorder()
    model = resnet()
    history = train_model(model, SPLIT, None, cfg, seed=0, observers=Observers([recorder]))
    logged = [s["grad_norm"] for s in recorder.scalars]
    assert logged == pytest.approx(recorder.pre_clip, rel=1e-6)  # the norm before clipping
    assert all(n > 0.05 for n in logged) and {s["clipped"] for s in recorder.scalars} == {1.0}
    assert history.final.clipped_share == 1.0
    assert history.final.grad_norm_max == pytest.approx(max(logged[3:]), rel=1e-6)
    assert history.final.grad_norm_mean == pytest.approx(np.mean(logged[3:]), rel=1e-6)
    grads = [p.grad for p in model.parameters() if p.grad is not None]  # the last step's
    assert float(nn.utils.get_total_norm(grads)) <= 0.05 * (1 + 1e-5)

    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))]
    params[0].grad, params[1].grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    expected = float(np.sqrt(3 * 9 + 4 * 16))
    assert float(grad_norm(params, 0.0)) == pytest.approx(expected)  # measured, not clipped
    assert float(torch.cat([p.grad for p in params]).norm()) == pytest.approx(expected)
    assert float(grad_norm(params, 1.0)) == pytest.approx(expected)  # the pre-clip norm
    assert float(torch.cat([p.grad for p in params]).norm()) <= 1.0


def test_observers_are_called_in_order_and_change_nothing() -> None:
    cfg = tiny_params(train={"epochs": 2, "batch_size": 8}).train
    recorder = Recorder()
    watched, plain = resnet(), resnet()
    train_model(watched, SPLIT, VAL, cfg, seed=0, observers=Observers([recorder]))
    train_model(plain, SPLIT, VAL, cfg, seed=0)
    ours, theirs = watched.state_dict(), plain.state_dict()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    steps = ["backward", "step"] * 3
    assert recorder.calls == ["start", *steps, "epoch", *steps, "epoch", "close"]
    assert {"loss", "lr", "grad_norm", "clipped"} <= set(recorder.scalars[0])
    assert recorder.epochs[-1]["val_accuracy"] >= 0


def test_observers_are_closed_when_training_fails() -> None:
    recorder = Recorder()
    model = resnet()
    with torch.no_grad():
        model[1][-1].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        train_model(
            model, SPLIT, None, tiny_params().train, seed=0, observers=Observers([recorder])
        )
    assert recorder.calls[-1] == "close"


class WhereTrap(nn.Module):
    """Finite forward, NaN backward: ``torch.where`` computes both branches, and the gradient
    of the unused ``sqrt`` of a negative number is 0 * NaN (a classic autograd trap)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = NoBatchNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        never = torch.sqrt(-logits.abs() - 1)  # NaN, and never selected
        return torch.where(logits.abs() > 1e9, never, logits)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.filterwarnings("ignore:Error detected in SqrtBackward0")
def test_detect_anomaly_names_the_operation() -> None:
    cfg = tiny_params(train={"detect_anomaly": True, "batch_size": 8}).train
    with pytest.raises(StageError, match="SqrtBackward0") as raised:
        train_model(WhereTrap(), SPLIT, None, cfg, seed=0, progress=False)
    assert "train.detect_anomaly" in str(raised.value)


def test_precision() -> None:
    """auto on the CPU is fp32 (the same weights); bf16 autocasts the forward; fp16 on the CPU
    is refused with what to use instead."""
    cfg = tiny_params(train={"batch_size": 8}).train
    weights = {}
    for precision in ("auto", "fp32"):
        model = resnet()
        train_model(model, SPLIT, None, cfg.model_copy(update={"precision": precision}), seed=0)
        weights[precision] = model.state_dict()
    assert all(torch.equal(weights["auto"][k], weights["fp32"][k]) for k in weights["auto"])

    model, dtypes = resnet(), set()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    history = train_model(model, SPLIT, None, cfg.model_copy(update={"precision": "bf16"}), seed=0)
    assert np.isfinite(history.final.train_loss) and torch.bfloat16 in dtypes
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    with pytest.raises(StageError, match="fp16 needs a CUDA GPU"):
        train_model(resnet(), SPLIT, None, cfg.model_copy(update={"precision": "fp16"}), seed=0)


def test_weight_ema_averages_weights_and_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.99)
    before = snapshot(ema.module)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(torch.randn(4, 2))  # moves running_mean and num_batches_tracked
    ema.update(model)  # first update: decay warms up to min(0.99, 1/10)
    after, source = ema.module.state_dict(), model.state_dict()
    for key in ("0.weight", "1.bias", "1.running_mean"):
        torch.testing.assert_close(after[key], 0.1 * before[key] + 0.9 * source[key])
    assert torch.equal(after["1.num_batches_tracked"], source["1.num_batches_tracked"])
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_is_evaluated_and_chosen_when_better() -> None:
    cfg = tiny_params(train={"epochs": 2, "batch_size": 8, "ema_decay": 0.9}).train
    history = train_model(resnet(), SPLIT, VAL, cfg, seed=0)
    assert history.ema is not None
    assert all(e.ema_val_accuracy is not None for e in history.epochs)
    final = history.final
    expected = "ema" if final.ema_val_accuracy > final.val_accuracy else "raw"
    assert chosen_weights(history) == expected
    final.ema_val_accuracy, final.val_accuracy = 0.9, 0.8
    assert chosen_weights(history) == "ema"
    final.ema_val_accuracy = 0.8
    assert chosen_weights(history) == "raw"  # a tie keeps the trained weights
    assert chosen_weights(TrainHistory(epochs=[final])) == "raw"  # no EMA


def test_early_stopping() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    stops = [stopper.update(e, v) for e, v in enumerate([0.5, 0.6, 0.605, 0.62], start=1)]
    assert stops == [False] * 4 and stopper.best_epoch == 4  # 0.605: not enough, 0.62 is
    assert [stopper.update(5, 0.625), stopper.update(6, 0.63)] == [False, True]
    assert stopper.best_epoch == 4
    # A run that cannot improve (a vanishing lr, no batch norm statistics to move) stops after
    # `patience` epochs without a gain.
    cfg = tiny_params(
        train={"epochs": 5, "batch_size": 8, "lr": 1e-12, "early_stopping_patience": 2}
    ).train
    history = train_model(NoBatchNorm(), SPLIT, VAL, cfg, seed=0)
    assert [e.epoch for e in history.epochs] == [1, 2, 3]
    assert history.stopped_early and history.best_epoch == 1


def test_mixing_trains_with_soft_targets_and_stays_deterministic() -> None:
    cfg = tiny_params(
        train={"epochs": 2, "batch_size": 8, "mixup_alpha": 0.4, "cutmix_alpha": 1.0}
    ).train
    mixer = BatchMixer.from_params(cfg, 4)
    assert mixer is not None
    images, labels = torch.rand(8, 1, 12, 12), torch.arange(8) % 4
    mixed, targets = mix_batch(mixer, images, labels, seed=0, number=3)
    assert targets.shape == (8, 4) and torch.allclose(targets.sum(1), torch.ones(8))
    assert ((targets > 0) & (targets < 1)).any()  # soft, not one-hot
    again = mix_batch(mixer, images, labels, seed=0, number=3)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], targets)
    runs = []
    for workers in (0, 1, 0):  # the same with and without a loader worker
        model = resnet()
        history = train_model(model, SPLIT, VAL, cfg, seed=0, loader=LoaderSettings(workers))
        assert all(np.isfinite(e.train_loss) for e in history.epochs)
        runs.append(model.state_dict())
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])
    plain = resnet()
    unmixed = cfg.model_copy(update={"mixup_alpha": 0.0, "cutmix_alpha": 0.0})
    train_model(plain, SPLIT, VAL, unmixed, seed=0)
    differ = [k for k, v in plain.state_dict().items() if not torch.equal(v, runs[0][k])]
    assert differ  # mixing did change what was learned

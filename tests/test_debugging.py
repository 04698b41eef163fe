"""The debugging toolkit: gradient flow, activation statistics and the shape explanation, driven
by hand the way the training loop calls them (forward, backward, after_backward, step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from imageclf.config import TrainParams
from imageclf.io import read_json
from imageclf.models.zoo import ServingGraph, build_model
from imageclf.paths import ProjectPaths
from imageclf.training.debugging import (
    ActivationStats,
    GradientFlow,
    ShapeMismatch,
    check_model_accepts,
    parameter_layers,
    shuffled_labels,
)
from imageclf.training.observers import Observers, TrainingObserver
from imageclf.training.watch import build_observers
from tests.conftest import tiny_params

EVERY = 2  # sample every other step


def small_model(dead: bool = False) -> nn.Sequential:
    """Conv, batch norm, ReLU, two linear layers with dropout between (uses random numbers, so
    an observer that drew any would change the weights). ``dead``: the hidden linear layer gets a
    bias of -100, so the ReLU after it is 0 for every input and no gradient passes it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 3),
        nn.Tanh(),
    )
    if dead:
        with torch.no_grad():
            model[4].bias.fill_(-100.0)
    return model


def drive(model: nn.Module, observer: TrainingObserver, steps: int = 6) -> None:
    """What the engine does: forward, backward, after_backward, clip, step, on_step_end, and
    on_epoch_end every 3 steps; close at the end."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(steps, 16, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (steps, 16), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()
    observer.on_train_start(model, images[0])
    try:
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(images[step]), labels[step])
            loss.backward()
            observer.after_backward(step, model)
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), 5.0))
            optimizer.step()
            observer.on_step_end(step, {"loss": loss.item(), "lr": 0.1, "grad_norm": grad_norm})
            if (step + 1) % 3 == 0:
                scalars = {"train_loss": loss.item(), "val_accuracy": 0.5, "lr": 0.1}
                observer.on_epoch_end((step + 1) // 3, scalars, model)
    finally:
        observer.close()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_observers_do_not_change_the_training_result(tmp_path):
    """Same weights and batch-norm statistics after 6 steps with every observer attached
    (TensorBoard's graph tracing included) as without any."""
    bare = small_model()
    torch.manual_seed(5)
    drive(bare, Observers())
    watched = small_model()
    cfg = tiny_params(train={"log_every_steps": EVERY, "tensorboard": True}).train
    torch.manual_seed(5)
    drive(watched, build_observers(cfg, ProjectPaths(tmp_path), "run"))
    expected, got = weights(bare), weights(watched)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert (tmp_path / "reports" / "gradient_flow.json").is_file()  # they did run


def test_gradient_flow_plot_and_report_one_row_per_layer_in_forward_order(tmp_path):
    model = small_model(dead=True)
    flow = GradientFlow(EVERY, tmp_path / "flow.png", tmp_path / "flow.json")
    drive(model, flow)
    report = read_json(tmp_path / "flow.json")
    assert report["steps"] == [0, 2, 4]
    names = [row["layer"] for row in report["layers"]]
    assert names == ["0", "1", "4", "7"]  # conv, bn, linear, linear: forward order
    assert sorted(names) == sorted(n for n, _ in parameter_layers(model))
    # No gradient passes the dead ReLU: the layer feeding it and every layer before it learn
    # nothing; the output layer after it still does (through its bias).
    assert report["flagged"] == {"0": "zero", "1": "zero", "4": "zero"}
    rows = {row["layer"]: row for row in report["layers"]}
    assert rows["4"]["max_abs_grad"] == 0.0 and rows["7"]["mean_abs_grad"] > 0
    assert rows["7"]["status"] == "ok"
    png = (tmp_path / "flow.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_gradient_flow_order_follows_the_forward_not_the_definition(tmp_path):
    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)  # defined first, called last
            self.stem = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.stem(x)))

    model = Backwards()
    flow = GradientFlow(1, tmp_path / "f.png", tmp_path / "f.json")
    flow.on_train_start(model, torch.zeros(1, 3))
    model(torch.randn(5, 3)).sum().backward()
    flow.after_backward(0, model)
    assert [r["layer"] for r in flow.summary()] == ["stem", "head"]
    flow.close()


def test_vanishing_and_exploding_layers_are_flagged_relative_to_the_median(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    flow = GradientFlow(1, tmp_path / "f.png", tmp_path / "f.json")
    flow.on_train_start(model, torch.zeros(1, 4))
    model(torch.randn(8, 4)).sum().backward()
    with torch.no_grad():
        model[0].weight.grad.mul_(1e-6)
        model[0].bias.grad.mul_(1e-6)
        model[3].weight.grad.mul_(1e6)
        model[3].bias.grad.mul_(1e6)
    flow.after_backward(0, model)
    status = {r["layer"]: r["status"] for r in flow.summary()}
    assert status == {"0": "vanishing", "1": "ok", "2": "ok", "3": "exploding"}
    flow.close()


def test_activation_stats_report_dead_units_saturation_and_remove_their_hooks(tmp_path):
    model = small_model(dead=True)
    stats = ActivationStats(EVERY, tmp_path / "act.json")
    drive(model, stats)
    report = read_json(tmp_path / "act.json")
    assert report["steps"] == [0, 2, 4]
    rows = {row["layer"]: row for row in report["layers"]}
    assert set(rows) == {"2", "5", "8"}  # ReLU (in place), ReLU, Tanh
    assert rows["5"]["dead_units"] == 1.0 and rows["5"]["zeros"] == 1.0
    assert report["dead_units"] == {"5": 1.0}  # the live conv ReLU is not listed
    assert rows["2"]["dead_units"] < 1.0 and 0 < rows["2"]["zeros"] < 1
    # The in-place ReLU's input is read before it is overwritten: its pre-activations have a
    # negative part (batch norm centres them), its outputs none.
    assert rows["2"]["input_mean"] < rows["2"]["mean"]
    assert rows["5"]["input_mean"] < -50  # the -100 bias, seen in the layer feeding the ReLU
    assert "saturated" in rows["8"] and "dead_units" not in rows["8"]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_tanh_fed_large_inputs_reads_as_saturated(tmp_path):
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.mul_(1000)
    stats = ActivationStats(1, tmp_path / "a.json")
    stats.on_train_start(model, torch.zeros(1, 2))
    model(torch.randn(64, 2)).sum().backward()
    stats.after_backward(0, model)
    stats.close()
    (row,) = read_json(tmp_path / "a.json")["layers"]
    assert row["saturated"] > 0.9


def test_activation_hooks_skip_unsampled_steps_and_eval_mode(tmp_path):
    """The engine numbers after_backward from 0 and on_step_end from 1 (after its step += 1):
    the sampled steps follow after_backward's numbering, as GradientFlow's do."""
    model = small_model()
    stats = ActivationStats(3, tmp_path / "a.json")
    stats.on_train_start(model, torch.zeros(1, 1, 8, 8))
    for step in range(7):
        model.train()
        model(torch.rand(4, 1, 8, 8)).sum().backward()
        stats.after_backward(step, model)
        stats.on_step_end(step + 1, {})
        model.eval()
        with torch.no_grad():
            model(torch.rand(4, 1, 8, 8))  # validation: never recorded
    assert [s["step"] for s in stats.samples] == [0, 3, 6]
    stats.close()


def test_factory_honours_train_tensorboard(tmp_path):
    paths = ProjectPaths(tmp_path)
    cfg: TrainParams = tiny_params(train={"tensorboard": False}).train
    kinds = [type(o).__name__ for o in build_observers(cfg, paths, "r").observers]
    assert kinds == ["GradientFlow", "ActivationStats"]
    assert not paths.tensorboard.exists()
    on = build_observers(cfg.model_copy(update={"tensorboard": True}), paths, "r")
    assert [type(o).__name__ for o in on.observers][-1] == "TensorBoardObserver"
    on.close()


def test_wrong_channel_count_names_the_first_conv_and_data_channels():
    body = build_model("simple_cnn", 4, in_channels=1, width=8, image_size=28)[1]  # bare CNN
    with pytest.raises(ShapeMismatch) as caught:
        check_model_accepts(body, (3, 28, 28))
    message = str(caught.value)
    assert "layer '0' (Conv2d)" in message and "in_channels=1" in message
    assert "[2, 3, 28, 28]" in message and "data.channels" in message
    assert body.training  # its mode is back
    # The project's models normalise first: the same mistake is named there.
    model = build_model("simple_cnn", 4, in_channels=1, width=8, image_size=28)
    with pytest.raises(ShapeMismatch, match=r"'0' \(Normalize\) expects 1 channel"):
        check_model_accepts(model, (3, 28, 28))


def test_an_rgb_model_fed_grayscale_is_caught_before_broadcasting_hides_it():
    model = build_model("resnet_small", 4, in_channels=3, width=8, image_size=32)
    with pytest.raises(ShapeMismatch, match=r"Normalize\) expects 3 channel.*data\.channels: 3"):
        check_model_accepts(model, (1, 32, 32))


def test_wrong_image_size_names_the_linear_head_and_data_image_size():
    model = build_model("simple_cnn", 4, in_channels=1, width=8, image_size=28)
    with pytest.raises(ShapeMismatch) as caught:
        check_model_accepts(model, (1, 32, 32))
    message = str(caught.value)
    assert "layer '1.8' (Linear)" in message and f"in_features={16 * 7 * 7}" in message
    assert f"({16 * 8 * 8} features)" in message and "data.image_size" in message
    assert check_model_accepts(model, (1, 28, 28)) == (2, 4)
    serving = ServingGraph(model, views=1)  # what export exports: (scores, probs)
    assert check_model_accepts(serving, (1, 28, 28)) == ((2, 4), (2, 128))  # + embedding


def test_layer_norm_mismatch_names_normalized_shape():
    model = nn.Sequential(nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 2))
    with pytest.raises(ShapeMismatch, match=r"'1' \(LayerNorm\) expects normalized_shape=\[16\]"):
        check_model_accepts(model, (1, 5, 5))


def test_shuffled_labels_carry_no_class_information():
    labels = np.repeat(np.arange(4), [40, 40, 40, 41])
    random = shuffled_labels(labels, 4, seed=0)
    assert not np.array_equal(random, labels)
    table = np.zeros((4, 4), dtype=int)
    np.add.at(table, (labels, random), 1)
    assert (table.max(axis=1) - table.min(axis=1) <= 1).all()  # every class: labels used evenly
    assert np.array_equal(random, shuffled_labels(labels, 4, seed=0))  # seeded


def test_the_real_training_loop_trains_the_same_with_every_observer(tmp_path):
    """train_model itself (helper of the train stage) with the factory's observers, sampling
    every step: the same weights as without, and every report written."""
    from imageclf.training.engine import train_model
    from tests.conftest import synthetic_split

    train, val = synthetic_split(10, seed=1), synthetic_split(3, seed=2)
    cfg = tiny_params(
        train={"tensorboard": True, "log_every_steps": 1, "batch_size": 8, "epochs": 1}
    ).train
    paths = ProjectPaths(tmp_path)
    states = []
    for observers in (None, build_observers(cfg, paths, "run")):
        torch.manual_seed(0)
        model = build_model(cfg.model, 4, 1, cfg.width, image_size=12)
        train_model(model, train, val, cfg, seed=0, progress=False, observers=observers)
        states.append(weights(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    flow = read_json(paths.gradient_flow_report)
    assert len(flow["steps"]) == 5  # 40 images in batches of 8, each step sampled
    assert read_json(paths.activation_stats_report)["steps"] == flow["steps"]
    assert paths.gradient_flow_plot.is_file()
    assert any((paths.tensorboard / "run").glob("events.out.tfevents.*"))

"""TensorBoard beside MLflow: what the observer writes is there when read back, and
`make tensorboard` serves it on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from imageclf.paths import ProjectPaths
from imageclf.training.tensorboard import TensorBoardObserver
from imageclf.training.watch import build_observers
from ops.local_servers import free_port, start, stop
from tests.conftest import REPO, tiny_params
from tests.test_debugging import drive, small_model

STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def written_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder whose logs/tensorboard holds one run of the small model, written by
    the factory's observers (TensorBoard with gradient flow and activation statistics)."""
    root = tmp_path_factory.mktemp("project")
    cfg = tiny_params(train={"tensorboard": True, "log_every_steps": EVERY}).train
    drive(small_model(), build_observers(cfg, ProjectPaths(root), "run-1"), steps=STEPS)
    return root


def accumulated(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_event_files_hold_scalars_histograms_image_and_graph(written_run: Path):
    acc = accumulated(ProjectPaths(written_run).tensorboard / "run-1")
    tags = acc.Tags()
    for tag in ("step/loss", "step/lr", "step/grad_norm"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(STEPS)), tag
    assert [e.step for e in acc.Scalars("epoch/val_accuracy")] == [1, 2]
    assert {"epoch/train_loss", "epoch/lr"} <= set(tags["scalars"])
    assert "weights/0.weight" in tags["histograms"] and "gradients/7.bias" in tags["histograms"]
    assert [e.step for e in acc.Histograms("weights/0.weight")] == [0, 2, 4]
    # The debugging observers write into the same run.
    assert [e.step for e in acc.Scalars("grad_norm/0")] == [0, 2, 4]
    assert "activations/2/dead_units" in tags["scalars"]
    (image,) = acc.Images("input/augmented_batch")
    assert image.width > 8 and image.height > 8  # a grid of the 16 8x8 images
    assert tags["graph"] and "Conv2d" in str(acc.Graph())


def test_an_untraceable_model_costs_a_warning_not_the_run(tmp_path, caplog):
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> dict[str, object]:
            return {"logits": self.linear(x), "note": "not a tensor"}  # jit.trace refuses

    observer = TensorBoardObserver(tmp_path / "run", every=1)
    with caplog.at_level("WARNING"):
        observer.on_train_start(Untraceable(), torch.rand(4, 4))
    observer.on_step_end(0, {"loss": 1.0})
    observer.close()
    assert "could not trace" in caplog.text
    assert "step/loss" in accumulated(tmp_path / "run").Tags()["scalars"]


def test_make_help_lists_tensorboard():
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True)
    assert "make tensorboard" in out.stdout


@pytest.mark.slow
def test_make_tensorboard_serves_the_runs_on_loopback(written_run: Path, tmp_path: Path):
    """The real `make tensorboard` (venv not reinstalled: -o), pointed at the written project
    through IMAGECLF_ROOT, answers on 127.0.0.1 and its scalars API returns the logged loss."""
    port = free_port()
    env = {**os.environ, "IMAGECLF_ROOT": str(written_run)}
    cmd = ["make", "-s", "-o", ".venv/.installed", "tensorboard", f"PORT={port}"]
    base = f"http://127.0.0.1:{port}"
    proc = start(cmd, env, cwd=REPO, ready_url=f"{base}/", log_path=tmp_path / "tb.log")
    try:
        with urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=30) as r:
            tags = json.load(r)
        assert "step/loss" in tags["run-1"]
        query = urllib.parse.urlencode({"run": "run-1", "tag": "step/loss"})
        with urllib.request.urlopen(f"{base}/data/plugin/scalars/scalars?{query}", timeout=30) as r:
            points = json.load(r)
        assert [p[1] for p in points] == list(range(STEPS))  # (wall time, step, value)
    finally:
        stop(proc)

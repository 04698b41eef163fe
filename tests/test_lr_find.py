"""The learning-rate finder: the sweep, its stopping rule, its suggestions, and the CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from imageclf.config import Params, apply_overrides
from imageclf.data.store import Dataset, load_dataset
from imageclf.models.checkpoint import save_checkpoint
from imageclf.models.zoo import split_head
from imageclf.paths import ProjectPaths
from imageclf.training import lr_find
from imageclf.training.engine import TrainingDiverged, train_model
from imageclf.training.spec import prepare_run
from tests.conftest import tiny_params, write_params
from tools import lr_find as cli

STEPS = 100
SIZE = {"image_size": 12}  # the `project` fixture's synthetic images


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is as fast, and on a busy machine much faster (idle
    OpenMP threads spin while waiting for a core). The CLI sets train.threads itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def u_curve(lr: float) -> float:
    """A loss that is flat below 1e-4, falls to its minimum at 0.1, and blows up above."""
    x = math.log10(lr)
    return 2.0 - 1.5 / (1 + math.exp(-3 * (x + 3))) + max(0.0, x + 1) ** 3 * 5


def test_lr_schedule_is_exponential_from_start_to_end() -> None:
    lrs = lr_find.lr_schedule(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(lrs)), 1.0)
    with pytest.raises(ValueError):
        lr_find.lr_schedule(1.0, 1e-3, 10)


def test_sweep_stops_when_the_smoothed_loss_diverges() -> None:
    lrs = lr_find.lr_schedule(1e-7, 10, 100)
    done, raw, smoothed, stopped = lr_find.sweep(u_curve, lrs)
    assert stopped == "diverged"
    assert len(done) < len(lrs) and done[-1] > 0.1  # past the minimum, before the end
    assert smoothed[-1] > lr_find.DIVERGE_FACTOR * min(smoothed)
    assert raw == [u_curve(lr) for lr in done]


def test_sweep_stops_at_a_non_finite_loss() -> None:
    lrs = lr_find.lr_schedule(1e-3, 1.0, 20)
    done, _, _, stopped = lr_find.sweep(lambda lr: math.nan if lr > 0.1 else 1.0, lrs)
    assert stopped == "non-finite loss" and max(done) <= 0.1


def test_suggestions_lie_in_the_falling_part_of_a_known_curve() -> None:
    lrs = lr_find.lr_schedule(1e-7, 10, 100)
    done, _, smoothed, _ = lr_find.sweep(u_curve, lrs)
    found = lr_find.suggest(done, smoothed, 100)
    for method, value in found.items():
        assert value is not None
        # where the true curve falls: past the flat start, below its minimum at 0.1
        assert 1e-5 < value < 0.1, (method, value)
        assert u_curve(value * 1.5) < u_curve(value), method


def test_too_short_a_curve_gives_no_suggestion_and_says_to_start_lower() -> None:
    found = lr_find.suggest([1e-3, 1e-2, 1e-1, 1.0], [1.0, 0.9, 2.0, 9.0], 100)
    assert found == dict.fromkeys(lr_find.METHODS)
    result = lr_find.LRFindResult([1e-3], [1.0], [1.0], 1e-3, 1.0, 100, "diverged", found)
    with pytest.raises(Exception, match="lower --start"):
        lr_find.config_line(result)


def tiny_run(project: ProjectPaths) -> tuple[Params, Dataset]:
    """Small-batch parameters and the `project` fixture's synthetic dataset."""
    return tiny_params(train={"batch_size": 16, "threads": 1}), load_dataset(project.dataset)


def final_train_loss(params: Params, dataset: Dataset, project: ProjectPaths, lr: float) -> float:
    """The train loss after a short constant-LR run from the same start (inf: diverged)."""
    short = {"train.lr": lr, "train.schedule": "constant", "train.max_steps": 25}
    params = apply_overrides(params, {**short, "train.epochs": 5})
    prepared = prepare_run(params, dataset, project)
    try:
        history = train_model(
            prepared.model, prepared.train, None, params.train, seed=params.seed, progress=False
        )
    except TrainingDiverged:
        return math.inf
    loss = history.final.train_loss
    return loss if math.isfinite(loss) else math.inf


def test_sweep_on_a_real_run_suggests_an_lr_that_trains(project) -> None:
    """The engine's model, optimizer and loader on a tiny problem: the loss falls then
    diverges, and the suggestion trains better than 1000x less or 1000x more."""
    params, dataset = tiny_run(project)
    prepared = prepare_run(params, dataset, project)
    result = lr_find.find_lr(prepared, steps=STEPS, start=1e-5, end=100.0)
    assert result.stopped in {"diverged", "non-finite loss"}
    smoothed = np.asarray(result.smoothed)
    assert smoothed.min() < 0.8 * smoothed[0]  # it learned before it blew up
    lowest = result.lrs[int(np.argmin(smoothed))]
    for method, value in result.suggestions.items():  # where the loss still falls
        assert value is not None and result.start < value < lowest, method
    best = result.suggestion
    assert best == result.suggestions[lr_find.DEFAULT_METHOD]
    assert result.setup["optimizer"] == params.train.optimizer
    at_best = final_train_loss(params, dataset, project, best)
    assert at_best < final_train_loss(params, dataset, project, best / 1000)
    assert at_best < final_train_loss(params, dataset, project, best * 1000)


def test_the_head_only_epoch_sweeps_only_the_head(project) -> None:
    """With train.init_from and freeze_epochs, --epoch 1 trains the head alone, as the run's
    first epoch would, and the default (the last epoch) trains the backbone too."""
    params, dataset = tiny_run(project)
    start = prepare_run(params, dataset, project)
    save_checkpoint(project.root / "start.pt", start.model, start.spec)
    transfer = tiny_params(
        train={"batch_size": 16, "threads": 1, "init_from": "start.pt", "freeze_epochs": 1,
               "epochs": 2, "layer_lr_decay": 0.5},
    )  # fmt: skip
    for epoch, backbone_learns in ((1, False), (None, True)):
        prepared = prepare_run(transfer, dataset, project)
        features, head = split_head(prepared.model)
        before = {k: v.clone() for k, v in features.state_dict().items()}
        head_before = head.weight.detach().clone()
        lr_find.find_lr(prepared, steps=15, start=1e-3, end=1e-1, epoch=epoch)
        changed = any(not torch.equal(before[k], v) for k, v in features.state_dict().items())
        assert changed == backbone_learns, epoch
        assert not torch.equal(head.weight, head_before)


def test_cli_writes_the_plot_and_the_curve(project, capsys) -> None:
    write_params(project.root, tiny_params(train={"batch_size": 16, "threads": 1}, data=SIZE))
    code = cli.main(
        ["--root", str(project.root), "--steps", "40", "--start", "1e-5", "--end", "100",
         "--set", "train.optimizer=adamw", "-S", "train.weight_decay=0.01"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert project.lr_find_plot.read_bytes().startswith(b"\x89PNG")
    report = json.loads(project.lr_find_report.read_text())
    assert report["setup"]["optimizer"] == "adamw"
    assert report["method"] == lr_find.DEFAULT_METHOD and report["suggestion"] > 0
    assert 2 <= len(report["curve"]) <= 40
    assert f"set `{report['set']}`" in out and "valley" in out
    assert report["set"].startswith("train.lr: ")


def test_cli_says_to_start_lower_when_the_loss_diverges_at_once(project, capsys) -> None:
    write_params(project.root, tiny_params(train={"batch_size": 16, "threads": 1}, data=SIZE))
    code = cli.main(
        ["--root", str(project.root), "--steps", "20", "--start", "1e3", "--end", "1e6"]
    )
    assert code == 2
    assert "lower --start" in capsys.readouterr().err
    assert project.lr_find_plot.is_file()  # the curve is still there to look at


def test_cli_without_a_dataset_names_the_stage_to_run(tmp_path, monkeypatch, capsys) -> None:
    write_params(tmp_path, tiny_params())
    monkeypatch.setenv("IMAGECLF_ROOT", str(tmp_path))
    assert cli.main(["--steps", "20"]) == 2
    assert "dvc repro download" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def test_cli_refuses_a_dataset_made_with_other_data_settings(project, capsys) -> None:
    write_params(project.root, tiny_params(data=SIZE))
    assert cli.main(["--root", str(project.root), "--set", "data.image_size=32"]) == 2
    assert "download stage" in capsys.readouterr().err

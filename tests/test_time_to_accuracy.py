"""The time-to-accuracy benchmark's logic on tiny data: the baseline is the example's network,
the bookkeeping reads the clock right, and one invocation times every run it was asked for.
No timing is asserted (speed is the benchmark's output, never a test's)."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch

from benchmarks.time_to_accuracy import (
    STEP_VARIANTS,
    CourseCNN,
    Run,
    accuracy_at,
    main,
    scored_accuracy,
    step_time_ratios,
    summarize,
    time_to,
)
from imageclf.config import ParamsError, load_params
from imageclf.data.store import load_dataset, write_dataset
from imageclf.models.checkpoint import load_checkpoint
from imageclf.paths import ProjectPaths
from tests.conftest import REPO, synthetic_split, tiny_params


def test_course_cnn_is_the_pytorch_examples_net():
    # pytorch/examples mnist Net: 9216 -> 128 -> 10, 1,199,882 parameters at 28x28.
    model = CourseCNN(0.3, 0.3)
    assert model.fc1.in_features == 9216
    assert sum(p.numel() for p in model.parameters()) == 1_199_882
    out = model.eval()(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(3))  # log-probabilities, for nll_loss


def test_accuracy_at_a_budget_and_time_to_a_target():
    seconds, accuracy = [10.0, 20.0, 30.0], [0.5, 0.9, 0.8]
    assert accuracy_at(seconds, accuracy, 5.0) is None
    assert accuracy_at(seconds, accuracy, 25.0) == 0.9
    assert accuracy_at(seconds, accuracy, 30.0) == 0.8  # the last epoch in budget, not the best
    assert time_to(seconds, accuracy, 0.85) == 20.0
    assert time_to(seconds, accuracy, 0.95) is None


def test_summary_in_baseline_epochs_and_on_the_quiet_clock():
    run = Run("r", "a run", train_images=1000)
    for seconds, acc in ((10.0, 0.90), (10.0, 0.94), (30.0, 0.95)):
        run.add(seconds, acc)
    assert run.seconds == [10.0, 20.0, 50.0]
    assert run.images_per_second == 100.0  # median epoch, 10 s for 1000 images
    row = summarize(
        run,
        baseline_epoch_s=20.0,
        baseline_ips=50.0,
        budgets_s=[25.0],
        targets=[0.94, 0.99],
        quiet_scale=0.5,
    )
    assert row["speed_vs_baseline"] == 2.0
    assert row["train_baseline_epochs"] == 2.5
    assert [h["baseline_epochs"] for h in row["history"]] == [0.5, 1.0, 2.5]
    at = row["accuracy_at"]["0.416667min"]
    assert at["measured_s"] == 0.94
    assert at["quiet_estimate_s"] == 0.95  # quiet epochs at the median pace: 5, 10, 15 s
    assert at["in_baseline_epochs"] == 2.5  # 25 s of the quiet reference's 10-s epochs
    assert row["time_to"]["0.9400"] == {
        "measured_s": 20.0,
        "baseline_epochs": 1.0,
        "quiet_estimate_s": 10.0,
    }
    assert row["time_to"]["0.9900"]["measured_s"] is None


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, ProjectPaths]:
    """One invocation on a tiny synthetic project: baseline, params.yaml and a config file."""
    root = tmp_path_factory.mktemp("tta")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    paths = ProjectPaths(root)
    write_dataset(
        paths.dataset,
        synthetic_split(24, seed=1),
        synthetic_split(8, seed=2),
        {"name": "synthetic", "classes": ["a", "b", "c", "d"], "fraction": 1.0, "source": {}},
    )
    (root / "short.yaml").write_text(
        "train.epochs: 2\ntrain.model: simple_cnn\ntrain.ema_decay: 0.5\n"  # EMA path too
    )
    (root / "pair.yaml").write_text(  # an ensemble: a second seed, and an EMA member
        "train.epochs: 2\ntrain.ensemble: [{}, {seed: 43, train.ema_decay: 0.5}]\n"
    )
    (root / "quiet.json").write_text(json.dumps({"images_per_second": 1.0e6}))
    threads = torch.get_num_threads()
    report = main(
        [
            "--root", str(root),
            "--config", str(root / "short.yaml"),
            "--config", str(root / "pair.yaml"),
            "--set", "train.width=8",
            "--set", "train.batch_size=16",
            "--baseline-epochs", "2",
            "--threads", "1",
            "--quiet-reference", str(root / "quiet.json"),
            "--save-models", str(root / "saved"),
        ]
    )  # fmt: skip
    torch.set_num_threads(threads)  # --threads is process-wide: leave later tests theirs
    return report, paths


def test_one_invocation_times_the_baseline_and_each_configuration(tiny_report):
    report, paths = tiny_report
    runs = {row["name"]: row for row in report["runs"]}
    assert list(runs) == ["baseline", "default", "short", "pair"]
    assert runs["baseline"]["epochs"] == 2
    assert runs["baseline"]["speed_vs_baseline"] == 1.0
    assert runs["default"]["epochs"] == load_params(paths.params).train.epochs
    assert runs["short"]["epochs"] == 2  # the config file applied...
    assert "train.width=8" in runs["short"]["description"]  # ... and --set over it
    # An ensemble is one run: its members' epochs on one clock, each member's own accuracy.
    assert runs["pair"]["epochs"] == 4 and "ensemble of 2" in runs["pair"]["description"]
    members = runs["pair"]["members"]
    assert [(m["seed"], m["epochs"]) for m in members] == [(42, 2), (43, 4)]
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in members)
    for row in runs.values():
        clock = [h["train_seconds"] for h in row["history"]]
        assert all(b > a for a, b in itertools.pairwise(clock))
        assert all(0.0 <= h["test_accuracy"] <= 1.0 for h in row["history"])
        assert math.isclose(row["train_seconds"], clock[-1])
    # The quiet reference is far faster than anything here: every quiet time is shorter.
    assert 0 < report["quiet_seconds_per_measured_second"] < 1
    saved = json.loads((paths.reports / "time_to_accuracy.json").read_text())
    assert [r["name"] for r in saved["runs"]] == list(runs)
    table = (paths.reports / "time_to_accuracy.md").read_text()
    assert table.count("\n| ") == len(runs) and "quiet clock" in table  # a line per run


def test_the_project_runs_learn(tiny_report):
    # The default configuration, through train_model, learns the synthetic task.
    report, _ = tiny_report
    default = next(r for r in report["runs"] if r["name"] == "default")
    assert default["final_accuracy"] >= 0.9


def test_saved_models_are_the_weights_the_last_epoch_scored(tiny_report):
    """--save-models keeps each run's final weights (the EMA where it validated better): loaded
    back, a checkpoint scores on the test split exactly what the report says."""
    report, paths = tiny_report
    params = load_params(paths.params)
    test = load_dataset(paths.dataset).test
    for row in report["runs"][1:]:
        model, spec, extra = load_checkpoint(paths.root / "saved" / f"{row['name']}.pt")
        assert extra["epoch"] == row["epochs"] and spec.classes == ("a", "b", "c", "d")
        # The ensemble's saved model averages its members, and scores what its run reported.
        assert spec.members == (2 if row["name"] == "pair" else 1)
        assert scored_accuracy(model.eval(), test, params) == row["final_accuracy"]
        assert extra["test_accuracy"] == row["final_accuracy"]
    assert not (paths.root / "saved" / "baseline.pt").exists()  # the yardstick is not kept


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "train.epochs"], "KEY=VALUE"),
        (["--set", "train.nope=1"], "Unknown parameter"),
        (["--skip-default"], "no project run"),
        (["--config", "missing.yaml"], "No configuration file"),
        # refused before the baseline trains (it was once refused after the whole run)
        (
            ["--skip-default", "--config", "configs/long.yaml", "--quiet-reference", "x.json"],
            "drop --skip-default",
        ),
        (["--save-models", str(REPO / "params.yaml")], "is a file: name a folder"),
    ],
)
def test_bad_arguments_say_what_to_fix(argv, message, tmp_path):
    with pytest.raises(ParamsError, match=message):
        main([*argv, "--out", str(tmp_path / "r.json")])


def test_step_time_ratios_are_per_variant_and_relative_to_fp32():
    ratios = step_time_ratios(tiny_params(), (1, 12, 12), 4, rounds=2, steps=1)
    assert list(ratios) == list(STEP_VARIANTS)
    assert ratios["fp32"] == [1.0, 1.0]
    assert all(len(r) == 2 and all(v > 0 for v in r) for r in ratios.values())

"""Every stage as a Python function on a tiny dataset: outputs exist, make sense, fail safely."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pytest
import torch

from imageclf.data.transforms import to_model_input
from imageclf.deploy.export import load_torchscript
from imageclf.deploy.optimize import MIN_TIMED_CALLS, time_call
from imageclf.errors import StageError
from imageclf.io import read_json
from stages import benchmark, dataloader_check, download, evaluate, export, optimize, profile, train
from tests.conftest import REPO, tiny_params


@pytest.fixture
def trained(project):
    """The synthetic project after dataloader_check and train."""
    params = tiny_params(train={"epochs": 2, "width": 8})
    dataloader_check.run(params, project)
    result = train.run(params, project)
    return project, params, result


def test_chain_of_stages_produces_consistent_outputs(trained):
    paths, params, result = trained
    assert paths.checkpoint.is_file()
    assert (paths.models / "checkpoints" / "last.pt").is_file()
    history = read_json(paths.reports / "train_history.json")
    assert [row["epoch"] for row in history] == [1, 2]

    run = mlflow.MlflowClient().get_run(result["mlflow_run_id"])
    assert run.data.params["train.epochs"] == "2"
    assert {"git_commit", "data_train_hash", "params_hash"} <= set(run.data.tags)
    artifacts = [
        a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "checkpoints")
    ]
    assert artifacts == ["checkpoints/epoch_001.pt", "checkpoints/epoch_002.pt"]

    report = evaluate.run(params, paths)
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert set(report["per_class"]) == {"a", "b", "c", "d"}
    assert (paths.reports / "plots" / "confusion_matrix.png").stat().st_size > 1000
    run = mlflow.MlflowClient().get_run(result["mlflow_run_id"])
    assert run.data.metrics["test_accuracy"] == pytest.approx(report["test_accuracy"])
    assert run.data.metrics["balanced_accuracy"] == pytest.approx(report["balanced_accuracy"])
    assert report["tta_flip"] and "test_accuracy_no_tta" in report  # the default policy flips
    assert paths.error_analysis_html.is_file() and paths.top_losses_plot.is_file()

    prof = profile.run(params, paths)
    assert 0.0 <= prof["data_wait_share"] <= 1.0 and prof["top_ops"]
    assert (paths.reports / "profile" / "trace.json").stat().st_size > 0

    opt = optimize.run(params, paths)
    assert isinstance(opt["int8_kept"], bool) and opt["int8_static"]["reason"]
    assert paths.onnx_int8.is_file() and paths.optimized_checkpoint.is_file()

    exp = export.run(params, paths)
    assert exp["dynamic_batch"] and exp["argmax_agreement"] >= 0.999
    session = ort.InferenceSession(str(paths.onnx), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis really is dynamic
        x = to_model_input(np.zeros((batch, 12, 12, 1), np.uint8)).numpy()
        assert session.run(None, {"images": x})[0].shape == (batch, 4)

    scripted = load_torchscript(paths.torchscript)  # the LibTorch artefact, verified
    assert exp["torchscript"]["argmax_agreement"] == 1.0 and exp["torchscript"]["batch_1_matches"]
    with torch.inference_mode():
        logits, embedding = scripted(to_model_input(np.zeros((3, 12, 12, 1), np.uint8)))
    assert logits.shape == (3, 4) and embedding.shape[0] == 3

    bench = benchmark.run(params, paths)
    backends = {(r["backend"], r["batch_size"]) for r in bench["rows"]}
    assert ("pytorch_eager", 1) in backends and ("onnxruntime_fp32", 8) in backends
    assert ("torchscript", 8) in backends
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in bench["rows"])
    assert (paths.reports / "plots" / "benchmark.png").is_file()


def test_export_outside_tolerance_fails_and_keeps_previous_model(trained):
    paths, params, _ = trained
    optimize.run(params, paths)
    export.run(params, paths)
    before = paths.onnx.read_bytes(), paths.torchscript.read_bytes()
    strict = tiny_params(export={"max_abs_diff": 1e-30})
    with pytest.raises(StageError, match="does not match PyTorch"):
        export.run(strict, paths)
    assert (paths.onnx.read_bytes(), paths.torchscript.read_bytes()) == before
    assert not list(paths.models.glob(".model.*")), "temporary export left behind"


def test_benchmark_times_torch_compile(trained):
    paths, _, _ = trained
    params = tiny_params(benchmark={"torch_compile": True, "batch_sizes": [8], "iterations": 3})
    optimize.run(params, paths)
    export.run(params, paths)
    bench = benchmark.run(params, paths)
    compiled = [r for r in bench["rows"] if r["backend"] == "torch_compile"]
    assert len(compiled) == 1 and compiled[0]["compile_seconds"] > 0
    assert bench["torch_compile.batch_8.compile_seconds"] == compiled[0]["compile_seconds"]


def test_a_time_budget_bounds_a_slow_benchmark_but_keeps_five_timed_calls():
    """A call slower than the whole budget still gets 1 warm-up and MIN_TIMED_CALLS timed
    calls (a p50 of fewer is noise); a fast one runs every iteration it was given."""
    calls = []

    def slow() -> None:
        calls.append(1)
        time.sleep(0.02)

    latencies = time_call(slow, warmup=10, iterations=100, max_seconds=0.01)
    assert (len(calls), len(latencies)) == (1 + MIN_TIMED_CALLS, MIN_TIMED_CALLS)
    calls.clear()
    assert len(time_call(lambda: calls.append(1), 3, 50, max_seconds=60)) == 50
    assert len(calls) == 53


def test_download_failure_keeps_previous_dataset(project, tmp_path):
    before = {p.name: p.read_bytes() for p in project.dataset.iterdir()}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"not the dataset"))
    params = tiny_params(data={"sources": [str(broken), str(tmp_path / "missing")]})
    with pytest.raises(StageError) as err:
        download.run(params, project)
    message = str(err.value)
    assert "wrong content" in message and str(tmp_path / "missing") in message
    assert "dataset-fashion-mnist" in message
    assert {p.name: p.read_bytes() for p in project.dataset.iterdir()} == before


def test_imagefolder_dataset_is_supported(project, tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    for split, n in (("train", 6), ("test", 2)):
        for cls, color in (("cats", 30), ("dogs", 220)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + i, 30), (color, color, 0)).save(
                    root / split / cls / f"{i}.png"
                )
    params = tiny_params(
        data={"name": "imagefolder", "imagefolder_root": str(root), "image_size": 16, "channels": 1}
    )
    report = download.run(params, project)
    assert report["num_train"] == 12 and report["num_test"] == 4 and report["num_classes"] == 2
    meta = read_json(project.dataset / "meta.json")
    assert meta["classes"] == ["cats", "dogs"] and meta["image_shape"] == [16, 16, 1]


def test_imagefolder_without_root_is_a_clear_error(project):
    with pytest.raises(StageError, match="imagefolder_root"):
        download.run(tiny_params(data={"name": "imagefolder"}), project)


# A stage module run as `python -m buggy_stage`, like DVC runs the real ones; FAILURE picks
# what its run() does. The bugs are plain mistakes, not messages meant for a user.
FAILING_STAGE = '''
import os
from pathlib import Path

from imageclf.errors import StageError
from imageclf.stage import main


def run(params, paths):
    """A stage that fails the way FAILURE says."""
    failure = os.environ["FAILURE"]
    if failure == "key_error":
        return {"accuracy": {}["accuracy"]}
    if failure == "value_error":
        return {"epochs": int("twelve")}
    if failure == "zero_division":
        return {"share": 1 / len([])}
    if failure == "runtime_error":  # next() on an empty iterator inside a generator
        return {"first": list(next(iter([])) for _ in range(1))}
    if failure == "stage_error":
        raise StageError("data.fraction leaves no image of class a: raise it.")
    if failure == "invalid_input":  # the library's own check of an ImageFolder
        from imageclf.data.scan import list_imagefolder

        empty = Path(os.environ["EMPTY_DIR"])
        (empty / "train").mkdir(parents=True, exist_ok=True)
        list_imagefolder(empty)
    if failure == "download_error":
        from imageclf.data.fashion_mnist import fetch

        fetch(Path(os.environ["EMPTY_DIR"]), [])
    return {}


if __name__ == "__main__":
    main(run)
'''


def run_failing_stage(tmp_path: Path, failure: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "buggy_stage.py").write_text(FAILING_STAGE)
    env = {
        **os.environ,  # IMAGECLF_ROOT from the project fixture
        "FAILURE": failure,
        "EMPTY_DIR": str(tmp_path / "empty"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
    }
    env.pop("IMAGECLF_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "buggy_stage", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("failure", "last_line", "code"),
    [
        ("key_error", "KeyError: 'accuracy'", '{}["accuracy"]'),
        ("value_error", "ValueError: invalid literal for int() with base 10: 'twelve'", "int("),
        ("zero_division", "ZeroDivisionError: division by zero", "1 / len([])"),
        ("runtime_error", "RuntimeError: generator raised StopIteration", "next(iter([]))"),
    ],
)
def test_stage_cli_shows_the_traceback_of_a_bug(project, tmp_path, failure, last_line, code):
    """A bug is not turned into one sentence: the traceback says where it is."""
    result = run_failing_stage(tmp_path, failure)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr, result.stderr
    assert 'buggy_stage.py", line' in result.stderr and code in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == last_line
    assert "failed:" not in result.stderr


@pytest.mark.parametrize(
    ("failure", "args", "message"),
    [
        ("stage_error", (), "data.fraction leaves no image of class a: raise it."),
        ("invalid_input", (), "has no class folders"),
        ("download_error", (), "No data sources are configured"),
        ("none", ("--params", "missing.yaml"), "missing.yaml does not exist"),  # ParamsError
    ],
)
def test_stage_cli_states_an_expected_failure_in_one_line(
    project, tmp_path, failure, args, message
):
    result = run_failing_stage(tmp_path, failure, *args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    failed = [line for line in result.stderr.splitlines() if "failed:" in line]
    assert len(failed) == 1 and failed[0].startswith("stage buggy_stage failed: ")
    assert message in failed[0], result.stderr


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ("stage_error", "stage buggy_stage failed: data.fraction leaves no image of class a"),
        ("key_error", "stage buggy_stage crashed: KeyError: 'accuracy' (its traceback is in"),
    ],
)
def test_a_failed_stage_run_by_dvc_is_one_message_said_once(
    project, tmp_path, monkeypatch, failure, message
):
    """What the flow shows of a failed stage (any stage): its message, taken out of DVC's output
    and not streamed to the log as well, so the flow states it once."""
    from pipelines import dvc_experiment
    from pipelines.dvc_experiment import StageFailed, Workspace, repro_stage

    said = run_failing_stage(tmp_path, failure).stderr
    (tmp_path / "said.txt").write_text(said)
    fake = tmp_path / "dvc"  # prints what `dvc repro` prints around the stage's own output
    fake.write_text(
        "#!/bin/sh\necho \"Running stage 'buggy_stage':\"\necho '> bin/python -m buggy_stage'\n"
        f"cat {tmp_path / 'said.txt'}\necho \"ERROR: failed to reproduce 'buggy_stage': failed "
        'to run: bin/python -m buggy_stage, exited with 1"\nexit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setattr(dvc_experiment, "_dvc_bin", lambda: str(fake))
    seen: list[str] = []
    workspace = Workspace(project=tmp_path, root=tmp_path, name="x", baseline="0" * 40)
    with pytest.raises(StageFailed) as err:
        repro_stage(workspace, "buggy_stage", dict(os.environ), on_line=seen.append)
    assert str(err.value).startswith(message) and "ERROR:" not in str(err.value)
    assert "\n" not in str(err.value)
    log = "\n".join(seen)
    assert "Running stage 'buggy_stage'" in log
    if failure == "stage_error":  # held back: the flow's state says it
        assert "data.fraction" not in log and "ERROR: failed to reproduce" not in log
    else:  # a bug's traceback stays in the log: it says where
        assert "Traceback (most recent call last)" in log

"""The real `dvc repro` and `dvc exp run` in a fresh clone of the repository, with shrunken
parameters, run as the README writes them (`.venv/bin/dvc ...`, the venv not on PATH)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from imageclf.io import read_json
from tests.conftest import FASHION_MNIST_DIR, dvc_stages, repo_copy

# `make test` runs the whole pipeline once (`dvc repro`, then again to see nothing rerun); the
# experiment rerun and the second training are `slow` (`make test-all`).
pytestmark = [
    pytest.mark.skipif(
        not FASHION_MNIST_DIR.is_dir(),
        reason="needs Debian's dataset-fashion-mnist (make setup installs it)",
    ),
]


def shrink(params_file: Path) -> None:
    raw = yaml.safe_load(params_file.read_text())
    raw["data"].update(fraction=0.05, sources=[str(FASHION_MNIST_DIR)])
    raw["train"].update(epochs=2, width=8)
    raw["dataloader_check"].update(
        throughput_batches=3,
        grid={"num_workers": [0, 1], "pin_memory": [False], "prefetch_factor": [2]},
    )
    raw["profile"].update(steps=2, warmup=1)
    raw["optimize"].update(calibration_images=64, eval_images=500)
    # torch.compile costs ~30 s per batch size: test_stages.py times it (benchmark stage)
    raw["benchmark"].update(warmup=2, iterations=5, torch_compile=False)
    raw["monitoring"].update(reference_size=500)
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def dvc(workdir: Path, *args: str) -> str:
    """``.venv/bin/dvc ARGS`` exactly as the README writes it, from a shell whose PATH does not
    hold the venv (the stages' `bin/python` must find the project's .venv by itself)."""
    venv_bin = str(Path(sys.executable).parent)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("IMAGECLF_ROOT", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "IMAGECLF_PYTHON")
    }
    env["PATH"] = os.pathsep.join(
        d for d in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if d != venv_bin
    )
    proc = subprocess.run(
        [".venv/bin/dvc", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("repo")
    repo_copy(work)
    shrink(work / "params.yaml")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "commit", "-qam", "shrink"], cwd=work, check=True)
    # The checkout's own venv, as `make` creates it (a link: the tests' venv is that venv).
    (work / ".venv").symlink_to(Path(sys.executable).parents[1])
    return work, dvc(work, "repro")


def test_every_stage_ran_and_wrote_sensible_outputs(pipeline):
    work, output = pipeline
    for stage in dvc_stages():
        assert f"Running stage '{stage}'" in output
    reports = work / "reports"
    download = read_json(reports / "download.json")
    assert (download["num_train"], download["num_test"]) == (3000, 500)
    validate = read_json(reports / "validate.json")
    assert validate["success"] and validate["failed"] == 0
    assert (work / validate["data_docs"]).is_file()
    assert read_json(reports / "dataloader_check.json")["overfit_passed"]
    assert read_json(reports / "train.json")["epochs"] == 2
    evaluate = read_json(reports / "evaluate.json")
    assert 0.3 < evaluate["test_accuracy"] <= 1.0  # two short epochs: far above chance (0.1)
    assert len(evaluate["per_class"]) == 10
    assert 0 <= read_json(reports / "profile.json")["data_wait_share"] <= 1
    assert (reports / "profile" / "trace.json").is_file()
    assert "int8_kept" in read_json(reports / "optimize.json")
    export = read_json(reports / "export.json")
    assert export["dynamic_batch"] and export["max_abs_diff"] <= 1e-4
    bench = read_json(reports / "benchmark.json")
    assert {r["batch_size"] for r in bench["rows"]} == {1, 64}
    assert {r["backend"] for r in bench["rows"]} >= {
        "pytorch_eager",
        "torchscript",
        "onnxruntime_fp32",
    }
    assert export["torchscript"]["argmax_agreement"] >= 0.999
    assert read_json(reports / "reference.json")["images"] == 500
    for png in ("confusion_matrix.png", "benchmark.png"):
        assert (reports / "plots" / png).stat().st_size > 1000
    assert (work / "mlflow.db").is_file()


def test_nothing_changed_reruns_nothing(pipeline):
    work, _ = pipeline
    output = dvc(work, "repro")
    assert "Running stage" not in output


@pytest.mark.slow
def test_one_parameter_reruns_exactly_its_dependents(pipeline):
    """`dvc exp run -S` (the README's command) reruns exactly the stages that read the key."""
    work, _ = pipeline
    output = dvc(work, "exp", "run", "-S", "evaluate.top_losses=12")
    ran = {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate"}
    assert "evaluate.top_losses" in dvc(work, "exp", "show", "--csv")


def out_hashes(work: Path) -> dict[str, str]:
    """Every stage output's hash as dvc.lock records it."""
    stages = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for stage in stages.values() for o in stage.get("outs", [])}


CLOCK = {"seconds", "images_per_second"}  # wall-clock readings: the one thing allowed to differ


def same_state(a: object, b: object) -> bool:
    """Equal checkpoint contents, tensors by value, ignoring the wall-clock readings."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) - CLOCK
        return keys == set(b) - CLOCK and all(same_state(a[k], b[k]) for k in keys)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


@pytest.mark.slow
def test_training_and_exporting_again_give_identical_model_files(pipeline):
    """Identical results give identical files (tests/test_determinism.py has the causes): a
    forced rerun of train and export changes no model hash, so no stage sees a changed model.
    models/checkpoints/last.pt is the resumable training state: besides the weights, optimizer,
    schedule and random states (all identical) it keeps each epoch's training time, so its bytes
    differ; no stage reads it. (The reports hold timings, and a new MLflow run id, so stages that
    read reports/train.json are out of date afterwards: this test comes last.)"""
    work, _ = pipeline
    models = ["models/model.pt", "models/model.onnx", "models/model.torchscript.pt"]
    last = work / "models" / "checkpoints" / "last.pt"
    state_before = torch.load(last, weights_only=True)
    before = out_hashes(work)
    output = dvc(work, "repro", "--force", "--single-item", "train", "export")
    assert "Running stage 'train'" in output and "Running stage 'export'" in output
    after = out_hashes(work)
    assert {m: after[m] for m in models} == {m: before[m] for m in models}
    state_after = torch.load(last, weights_only=True)
    assert state_after["extra"]["resume"]["finished"]
    assert same_state(state_before, state_after)
    state_after["extra"]["resume"]["step"] += 1  # the comparison sees a real difference
    assert not same_state(state_before, state_after)
    status = dvc(work, "status")
    assert "models/" not in status, status

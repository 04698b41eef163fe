"""The training flow against a real Prefect API and real DVC: each run is a DVC experiment in its
own workspace, started in-process and through its deployment (what the UI's Run button does).

One Prefect test server (``prefect_test_harness``) and one project (a fresh Git clone of this
repository with tiny parameters) are shared by the module; the tests build on each other's runs
in file order, as a user's successive runs do.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from imageclf.paths import ProjectPaths
from ops.local_servers import output, start, stop
from tests.conftest import REPO, dvc_stages, repo_copy, tiny_params, write_imagefolder

MODEL = "flow-test-model"
ALL_STAGES = dvc_stages()


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def flow_repo(tmp_path_factory: pytest.TempPathFactory) -> ProjectPaths:
    """A user's fresh clone: a Git repo with the project's code and tiny params, never run."""
    base = tmp_path_factory.mktemp("flow")
    images = write_imagefolder(base / "images")
    params = tiny_params(
        data={"name": "imagefolder", "imagefolder_root": str(images), "image_size": 12},
        registry={"model_name": MODEL, "max_latency_ms": 1000.0},
        monitoring={"reference_size": 100},
    )
    return ProjectPaths(repo_copy(base / "repo", params))


@pytest.fixture
def in_repo(flow_repo: ProjectPaths, monkeypatch: pytest.MonkeyPatch) -> ProjectPaths:
    monkeypatch.setenv("IMAGECLF_ROOT", str(flow_repo.root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{flow_repo.root / 'mlflow.db'}")
    return flow_repo


def git_status(root: Path) -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def exp_show(root: Path) -> list[dict[str, str]]:
    """`dvc exp show --csv` in the user's checkout, one dict per row."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "exp", "show", "--csv"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return list(csv.DictReader(io.StringIO(proc.stdout)))


def flow_logs(flow_run_id, wait_for: str = "") -> str:
    """The flow run's logs as stored by the Prefect API (they are shipped asynchronously)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    text = ""
    for _ in range(60):
        logs: list = []
        with get_client(sync_client=True) as client:
            while True:  # the API pages logs by 200
                page = client.read_logs(
                    LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                    limit=200,
                    offset=len(logs),
                )
                logs.extend(page)
                if len(page) < 200:
                    break
        text = "\n".join(log.message for log in logs)
        if wait_for in text and text:
            break
        time.sleep(0.5)
    return text


def task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


@pytest.mark.slow
def test_flow_run_is_a_dvc_experiment_and_leaves_the_checkout_alone(prefect_api, in_repo):
    from pipelines.training_flow import training_flow

    before = git_status(in_repo.root)
    params_before = in_repo.params.read_text()
    state = training_flow(epochs=2, lr=0.05, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    flow_run_id = str(state.state_details.flow_run_id)
    assert result["stages_run"] == ALL_STAGES and result["promoted"]
    assert result["overrides"] == {"train.epochs": 2, "train.lr": 0.05}

    # The user's checkout: same files, same params, no outputs; the workspace is gone.
    assert in_repo.params.read_text() == params_before
    assert git_status(in_repo.root) == before
    assert not in_repo.onnx.exists() and not in_repo.dataset.exists()
    assert not list((in_repo.root / ".dvc" / "tmp" / "flows").glob("*"))

    # `dvc exp show` lists the run, with its params and its Prefect flow-run id.
    row = next(r for r in exp_show(in_repo.root) if r["Experiment"] == result["experiment"])
    assert row["prefect_flow_run_id"] == flow_run_id
    assert row["train.epochs"] == "2" and row["train.lr"] == "0.05"
    accuracy = next(v for k, v in row.items() if k.split(":")[-1] == "test_accuracy" and v)
    assert float(accuracy) == pytest.approx(result["test_accuracy"]), row

    # One Prefect task per dvc.yaml stage, each with DVC's own log lines.
    names = [r.name for r in task_runs(state.state_details.flow_run_id)]
    assert all(any(n.startswith(stage) for n in names) for stage in ALL_STAGES)
    logs = flow_logs(state.state_details.flow_run_id, wait_for="stage reference: ran")
    assert "Running stage 'train'" in logs and "stage download: ran" in logs

    # MLflow: the training run and the registered version say which experiment made them.
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(result["run_id"])
    assert run.data.params["train.epochs"] == "2" and run.data.params["train.lr"] == "0.05"
    assert run.data.tags["dvc_exp_name"] == result["experiment"]
    assert run.data.tags["dvc_exp_commit"] == result["experiment_commit"]
    assert run.data.tags["prefect_flow_run_id"] == flow_run_id
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == result["version"] == "1"
    assert version.tags["monitoring_reference"].endswith("reference.npz")
    assert version.tags["dvc_exp_commit"] == result["experiment_commit"]


@pytest.mark.slow
def test_ui_run_with_only_lr_changed_skips_the_data_stages(prefect_api, in_repo):
    """The user keeps the first run (`dvc exp apply`, then a commit: the README's workflow), then
    starts a run from the UI with another lr: DVC reruns training and what follows, and reuses
    download, validate and dataloader_check from the shared cache."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    first = next(r["Experiment"] for r in exp_show(in_repo.root) if r["Experiment"])
    subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "exp", "apply", first],
        cwd=in_repo.root,
        check=True,
        capture_output=True,
    )
    assert in_repo.onnx.is_file()  # the experiment's outputs, from the shared cache
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    # `git commit -a` as the README says, plus what this clone did not track yet and the
    # project's main branch does: dvc.lock and the metrics and plots under reports/.
    subprocess.run(["git", "add", "-u"], cwd=in_repo.root, check=True)
    subprocess.run(["git", "add", "dvc.lock", "reports"], cwd=in_repo.root, check=True)
    subprocess.run([*git, "commit", "-qm", "keep the first run"], cwd=in_repo.root, check=True)

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    server = start([sys.executable, "-m", "pipelines.deployments_runner"], env, cwd=in_repo.root)
    try:
        deadline = time.monotonic() + 120
        flow_run = None
        while time.monotonic() < deadline:
            try:
                flow_run = run_deployment(
                    "imageclf-training/train",
                    parameters={"epochs": 2, "lr": 0.08, "promote": False},
                    timeout=0,
                )
                break
            except Exception:  # the deployment is not registered yet
                assert server.poll() is None, output(server)
                time.sleep(2)
        assert flow_run is not None, "deployment never appeared"
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline + 400:
                flow_run = client.read_flow_run(flow_run.id)
                if flow_run.state and flow_run.state.is_final():
                    break
                time.sleep(2)
        logs = flow_logs(flow_run.id, wait_for="skipped by DVC")
        assert flow_run.state.is_completed(), logs[-3000:]
    finally:
        stop(server)
    for stage in ("download", "validate", "dataloader_check"):
        assert f"stage {stage}: skipped" in logs
    for stage in ("train", "evaluate", "export", "reference"):
        assert f"stage {stage}: ran" in logs
    rows = [r for r in exp_show(in_repo.root) if r["prefect_flow_run_id"] == str(flow_run.id)]
    assert len(rows) == 1 and rows[0]["train.lr"] == "0.08"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["imageclf"])
    mine = runs[runs["tags.prefect_flow_run_id"] == str(flow_run.id)]
    assert len(mine) == 1 and mine.iloc[0]["params.train.lr"] == "0.08"
    assert mine.iloc[0]["tags.dvc_exp_name"] == rows[0]["Experiment"]


def test_bad_override_fails_before_anything_runs(prefect_api, in_repo):
    from pipelines.training_flow import training_flow

    state = training_flow(set_params=["train.lrr=0.1"], return_state=True)
    assert state.is_failed()
    logs = flow_logs(state.state_details.flow_run_id, wait_for="train.lrr")
    assert "Unknown parameter 'train.lrr'" in logs
    assert "Running stage" not in logs


def test_failing_stage_fails_the_flow_with_its_message_and_registers_nothing(
    prefect_api, in_repo, capfd
):
    from pipelines.dvc_experiment import StageFailed
    from pipelines.training_flow import training_flow

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    versions = len(client.search_model_versions(f"name = '{MODEL}'"))
    capfd.readouterr()
    state = training_flow(
        set_params=["validate.min_train_images_per_class=1000"], return_state=True
    )
    assert state.is_failed()
    # The flow run's state message is the stage's own message, and nothing else.
    need = (
        "c0: 30 train images, needs at least 1000 to be learned "
        "(validate.min_train_images_per_class)"
    )
    assert state.message.startswith("stage validate failed: the dataset failed 1 of ")
    assert need in state.message and "classes too small to learn or to test" in state.message
    failure = state.result(raise_on_failure=False)
    assert isinstance(failure, StageFailed) and str(failure) == state.message
    # The flow's final-state line is the last one shipped (the logs travel asynchronously: on a
    # slow machine it lands after the line before it was read).
    final_line = "Finished in state Failed('stage validate failed:"
    logs = flow_logs(state.state_details.flow_run_id, wait_for=final_line)
    console = "".join(capfd.readouterr())
    # Said once (the flow's final state), not again by the task, the flow and the exception;
    # and without Great Expectations' progress bars.
    for text in (logs, state.message):
        assert text.count(need) == 1, text
    # The console holds it once, or not at all when an earlier test's Prefect console handler
    # kept that test's stderr (as in the whole suite): never twice or three times.
    assert console.count(need) in (0, 1), console
    for text in (logs, console, state.message):
        assert "Calculating Metrics" not in text and "%|" not in text, text
    assert "workspace is kept" in logs
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == versions
    # validation never retries (download would, twice: dvc.yaml's meta.retries)
    runs = {r.name.split("-")[0]: r for r in task_runs(state.state_details.flow_run_id)}
    assert runs["validate"].run_count == 1 and runs["validate"].state.is_failed()
    kept = list((in_repo.root / ".dvc" / "tmp" / "flows").glob("*"))
    assert len(kept) == 1 and ProjectPaths(kept[0]).validation_failed.is_dir()


@pytest.mark.slow
def test_monitoring_flow_records_a_drift_artifact_and_retrains(prefect_api, in_repo):
    """The served model sees images unlike its training data (the test images inverted): the
    monitoring flow finds drift, records it as a Prefect artifact and, with retrain_on_drift,
    runs the training flow, which records a new DVC experiment and registers its model.

    It runs in the project the earlier tests trained and committed (the README's workflow), so
    the retraining finds every stage's outputs in the shared cache, as a retrain on unchanged
    data does; the stages themselves are run for real by the tests above."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from imageclf.config import load_params
    from imageclf.data.store import load_dataset
    from pipelines.monitoring_flow import monitoring_flow
    from tests.monitoring_helpers import serve_window

    params = load_params(in_repo.params)
    test = load_dataset(in_repo.dataset).test.images
    serve_window(in_repo, params, 255 - np.concatenate([test] * (300 // len(test) + 1))[:300])
    before = {r["Experiment"] for r in exp_show(in_repo.root)}
    state = monitoring_flow(last=300, retrain_on_drift=True, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["drift"] and result["reasons"] and result["window_size"] == 300, result
    # retrain_on_drift ran the training flow: a new DVC experiment, its model registered
    training = result["training"]
    assert training["experiment"] not in before
    assert training["experiment"] in {r["Experiment"] for r in exp_show(in_repo.root)}
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    assert client.get_model_version(MODEL, training["version"]).run_id == training["run_id"]
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["drift-report"]))
        )
    mine = [a for a in artifacts if a.flow_run_id == state.state_details.flow_run_id]
    assert mine and "Drift detected" in (mine[0].data or "")


@pytest.mark.slow
def test_photo_configuration_runs_the_rgb_transfer_path_end_to_end(prefect_api, in_repo):
    """`make photos DATA=...`: configs/photos.yaml on a folder of RGB photos of all sizes, one of
    them corrupt. The run skips and reports the bad file, fine-tunes the pretrained
    EfficientNet-Lite0, exports it at the configured size and registers it under the photo
    model's own name. Sizes are shrunk by -S on top of the configuration, as a user would."""
    from benchmarks.photo_folder import write_photo_folder
    from pipelines.training_flow import training_flow

    photos = in_repo.root.parent / "photos"
    write_photo_folder(photos, train_per_class=8, test_per_class=3, seed=3)
    broken = photos / "train" / "cat" / "broken.jpg"
    broken.write_bytes((photos / "train" / "cat" / "00000.jpg").read_bytes()[:300])
    shrink = {
        "data.imagefolder_root": str(photos),
        "data.image_size": 64,
        "train.epochs": 2,
        "train.batch_size": 16,
        "dataloader_check.throughput_batches": 2,
        "dataloader_check.decode_images": 8,
        "profile.steps": 2,
        "profile.batch_size": 16,
        "optimize.calibration_images": 32,
        "optimize.eval_images": 30,
        "benchmark.batch_sizes": [1, 8],
        "benchmark.iterations": 5,
        "benchmark.warmup": 2,
        "monitoring.reference_size": 100,
        "registry.max_latency_ms": 1000.0,
    }
    state = training_flow(
        config="configs/photos.yaml",
        set_params=[f"{k}={v}" for k, v in shrink.items()],
        return_state=True,
    )
    assert state.is_completed(), state.message
    result = state.result()
    assert result["stages_run"] == ALL_STAGES and result["promoted"]
    assert result["overrides"]["train.model"] == "efficientnet_lite0"

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(result["run_id"])
    assert run.data.params["train.pretrained"] == "imagenet"
    # Ten classes, 8 of each but the corrupt file: chance is 10%; pretrained features do far
    # better even after two short epochs at 64x64.
    assert result["test_accuracy"] >= 0.4, result
    version = client.get_model_version_by_alias("imageclf-photos", "champion")
    assert version.run_id == result["run_id"]
    contract = json.loads(version.tags["input_contract"])
    assert (contract["channels"], contract["height"], contract["width"]) == (3, 64, 64)
    # The Fashion-MNIST-style model of the earlier tests is untouched: one model per task.
    assert client.get_model_version_by_alias(MODEL, "champion").run_id != result["run_id"]

    # The data-quality report named the corrupt file, and the data went on without it: the
    # experiment's commit holds the reports (metrics and the page a person reads).
    def shown(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{result['experiment_commit']}:{path}"],
            cwd=in_repo.root, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip

    counts = json.loads(shown("reports/data_quality.json"))
    assert counts["bad_file"] == 1, counts
    page = shown("reports/data_quality.html")
    assert "broken.jpg" in page and "data:image/" in page  # named, with thumbnails
    assert "balanced_accuracy" in json.loads(shown("reports/evaluate.json"))

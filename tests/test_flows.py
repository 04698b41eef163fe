"""The training flow against a real Prefect API, including a run started through its deployment.

One Prefect test server (``prefect_test_harness``) is shared by the module: it takes ~25 s to start.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import mlflow
import pytest

from imageclf.local_servers import output, start, stop
from imageclf.paths import ProjectPaths
from tests.conftest import REPO, tiny_params, write_imagefolder, write_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def make_project(root: Path, **params_overrides: dict) -> ProjectPaths:
    write_imagefolder(root / "images", **params_overrides.pop("_folder", {}))
    params = tiny_params(
        data={"name": "imagefolder", "imagefolder_root": str(root / "images"), "image_size": 12},
        registry={"model_name": "flow-test-model", "max_latency_ms": 1000.0},
        **params_overrides,
    )
    write_params(root, params)
    return ProjectPaths(root)


@pytest.fixture
def flow_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ProjectPaths:
    monkeypatch.setenv("IMAGECLF_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return make_project(tmp_path)


def flow_logs(flow_run_id, wait_for: str = "") -> str:
    """The flow run's logs as stored by the Prefect API (they are shipped asynchronously)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    text = ""
    for _ in range(60):
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200
            )
        text = "\n".join(log.message for log in logs)
        if wait_for in text and text:
            break
        time.sleep(0.5)
    return text


def test_flow_runs_every_stage_registers_and_promotes(prefect_api, flow_project):
    from pipelines.training_flow import training_flow

    state = training_flow(epochs=2, lr=0.05, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["promoted"] and result["overrides"] == {"train.epochs": 2, "train.lr": 0.05}
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(result["run_id"])
    assert run.data.params["train.epochs"] == "2" and run.data.params["train.lr"] == "0.05"
    assert run.data.tags["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    assert "test_accuracy" in run.data.metrics
    assert str(client.get_model_version_by_alias("flow-test-model", "champion").version) == "1"
    logs = flow_logs(state.state_details.flow_run_id, wait_for="stage benchmark: done")
    for stage in ("download", "validate", "train", "export", "benchmark"):
        assert f"stage {stage}: done" in logs
    assert "overrides of params.yaml for this run" in logs


def test_failing_stage_fails_the_flow_with_its_message_and_leaves_registry(
    prefect_api, tmp_path, monkeypatch
):
    monkeypatch.setenv("IMAGECLF_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    make_project(tmp_path, _folder={"counts": {0: 5}})  # class c0 badly under-represented
    from pipelines.training_flow import training_flow

    state = training_flow(epochs=1, return_state=True)
    assert state.is_failed()
    logs = flow_logs(state.state_details.flow_run_id, wait_for="class_share")
    assert "failed" in logs and "class_share" in logs
    registry = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    assert registry.search_registered_models() == []


def test_deployment_run_like_the_ui_with_parameter_override(prefect_api, flow_project):
    """Serve the deployment in its own process and start a run the way the UI's Run button does."""
    from prefect.deployments import run_deployment

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    server = start([sys.executable, "-m", "pipelines.serve"], env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        flow_run = None
        while time.monotonic() < deadline:
            try:
                flow_run = run_deployment(
                    "imageclf-training/train",
                    parameters={"epochs": 3, "promote": False},
                    timeout=0,
                )
                break
            except Exception:  # the deployment is not registered yet
                assert server.poll() is None, output(server)
                time.sleep(2)
        assert flow_run is not None, "deployment never appeared"
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline + 240:
                flow_run = client.read_flow_run(flow_run.id)
                if flow_run.state and flow_run.state.is_final():
                    break
                time.sleep(2)
        assert flow_run.state.is_completed(), flow_logs(flow_run.id)[-3000:]
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        runs = mlflow.search_runs(experiment_names=["imageclf"])
        mine = runs[runs["tags.prefect_flow_run_id"] == str(flow_run.id)]
        assert len(mine) == 1 and mine.iloc[0]["params.train.epochs"] == "3"
        assert mine.iloc[0]["params.train.model"] == "resnet_small"
    finally:
        stop(server)


def test_monitoring_flow_records_a_drift_artifact(prefect_api, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from imageclf.data.store import load_dataset
    from pipelines.monitoring_flow import monitoring_flow
    from tests.monitoring_helpers import monitoring_project, serve_window

    monkeypatch.setenv("IMAGECLF_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    paths, params = monitoring_project(tmp_path, monkeypatch)
    serve_window(paths, params, 255 - load_dataset(paths.dataset).test.images[:300])
    state = monitoring_flow(last=300, retrain_on_drift=True, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["drift"] and result["reasons"]
    # retrain_on_drift started the training flow, which trained and registered a new model
    assert result["training"]["version"] == "1" and result["training"]["run_id"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["drift-report"]))
        )
    assert any(a.flow_run_id == state.state_details.flow_run_id for a in artifacts)
    assert any("Drift detected" in (a.data or "") for a in artifacts)

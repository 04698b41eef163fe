"""Registry: challenger on registration, promotion rules, rollback. Real SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from imageclf.config import RegistryParams
from imageclf.export import export_onnx
from imageclf.models import build_model
from imageclf.paths import ProjectPaths
from imageclf.registry import (
    RegistryError,
    log_and_register,
    promote,
    rollback,
    status,
)
from imageclf.tracking import setup_mlflow
from tests.conftest import tiny_params

CFG = RegistryParams(model_name="test-model", accuracy_tolerance=0.01, max_latency_ms=5.0)


@pytest.fixture
def registry_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ProjectPaths:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    paths = ProjectPaths(tmp_path)
    torch.manual_seed(0)
    export_onnx(build_model("resnet_small", 4, 1, 4).eval(), tmp_path / "m.onnx", (1, 12, 12))
    setup_mlflow(paths, "registry-test")
    return paths


def new_version(paths: ProjectPaths, accuracy: float, latency: float) -> str:
    """A finished training run with the metrics promotion looks at, registered as challenger."""
    with mlflow.start_run() as run:
        mlflow.log_metrics(
            {"test_accuracy": accuracy, "bench.onnxruntime_fp32.batch_1.p50_ms": latency}
        )
    params = tiny_params(registry=CFG.model_dump())
    example = np.random.default_rng(0).random((2, 1, 12, 12), dtype=np.float32)
    return log_and_register(
        paths, params, run.info.run_id, paths.root / "m.onnx", example, tags={"git_commit": "abc"}
    )


def test_new_version_is_challenger_with_signature(registry_project):
    version = new_version(registry_project, 0.90, 1.0)
    state = status(registry_project, CFG)
    assert state["challenger"] == version and state["champion"] is None
    client = mlflow.MlflowClient()
    mv = client.get_model_version(CFG.model_name, version)
    assert mv.tags["git_commit"] == "abc"
    local = mlflow.artifacts.download_artifacts(f"models:/{CFG.model_name}@challenger")
    assert (Path(local) / "model.onnx").is_file()
    info = mlflow.models.get_model_info(f"models:/{CFG.model_name}/{version}")
    assert info.signature is not None and info.signature.inputs is not None


def test_better_promoted_worse_not_rollback_restores(registry_project):
    paths = registry_project
    v1 = new_version(paths, 0.90, 1.0)
    assert promote(paths, CFG).promoted
    v2 = new_version(paths, 0.92, 1.0)
    decision = promote(paths, CFG)
    assert decision.promoted and decision.champion_before == v1
    assert status(paths, CFG)["champion"] == v2

    v3 = new_version(paths, 0.80, 1.0)  # worse beyond tolerance
    decision = promote(paths, CFG)
    assert not decision.promoted and "below champion" in decision.reason
    state = status(paths, CFG)
    assert state["champion"] == v2 and state["challenger"] == v3
    tags = mlflow.MlflowClient().get_model_version(CFG.model_name, v3).tags
    assert tags["promotion"].startswith("rejected:")

    v4 = new_version(paths, 0.95, 50.0)  # better but too slow
    decision = promote(paths, CFG)
    assert not decision.promoted and "latency" in decision.reason

    restored = rollback(paths, CFG, reason="v2 misclassifies sandals in production")
    assert restored == v1
    state = status(paths, CFG)
    assert state["champion"] == v1 and state["history"] == [v1]
    tags = mlflow.MlflowClient().get_model_version(CFG.model_name, v2).tags
    assert tags["rolled_back"] == "v2 misclassifies sandals in production"
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(paths, CFG, reason="again")
    assert v4 != v1


def test_within_tolerance_is_promoted(registry_project):
    new_version(registry_project, 0.900, 1.0)
    promote(registry_project, CFG)
    v2 = new_version(registry_project, 0.895, 1.0)  # 0.005 lower, tolerance 0.01
    assert promote(registry_project, CFG).promoted
    assert (
        json.loads(
            mlflow.MlflowClient().get_registered_model(CFG.model_name).tags["champion_history"]
        )[-1]
        == v2
    )


def test_promote_without_challenger_is_clear(registry_project):
    with pytest.raises(RegistryError, match="test-model has no challenger"):
        promote(registry_project, CFG)

"""Registry: challenger on registration, promotion rules, rollback. Real SQLite MLflow store."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from imageclf.deploy.export import export_onnx
from imageclf.models.zoo import build_model
from imageclf.paths import ProjectPaths
from imageclf.registry import (
    LATENCY_METRIC,
    RegistryError,
    download_reference,
    log_and_register,
    promote,
    promotion_lock,
    rollback,
    status,
)
from imageclf.tracking import setup_mlflow, tracking_uri
from tests.conftest import tiny_params

PARAMS = tiny_params(
    registry={"model_name": "test-model", "accuracy_tolerance": 0.01, "max_latency_ms": 5.0}
)
CFG = PARAMS.registry
SAME_DATA = {
    "test_data_hash": "a" * 64,
    "classes": json.dumps(["a", "b", "c", "d"]),
    "input_contract": json.dumps({"channels": 1, "height": 12, "width": 12}),
}


@pytest.fixture
def registry_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ProjectPaths:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    paths = ProjectPaths(tmp_path)
    torch.manual_seed(0)
    export_onnx(build_model("resnet_small", 4, 1, 4).eval(), tmp_path / "m.onnx", (1, 12, 12))
    setup_mlflow(paths, "registry-test")
    return paths


def uri(paths: ProjectPaths) -> str:
    return tracking_uri(paths)


def new_version(
    paths: ProjectPaths,
    accuracy: float,
    latency: float,
    reference: Path | None = None,
    **tags: str,
) -> str:
    """A finished training run with the metrics promotion looks at, registered as challenger;
    evaluated on the same test data as every other version unless ``tags`` say otherwise."""
    with mlflow.start_run() as run:
        mlflow.log_metrics({"test_accuracy": accuracy, LATENCY_METRIC: latency})
    example = np.random.default_rng(0).random((2, 1, 12, 12), dtype=np.float32)
    return log_and_register(
        uri(paths),
        PARAMS,
        run.info.run_id,
        paths.root / "m.onnx",
        example,
        tags={"git_commit": "abc", **SAME_DATA, **tags},
        reference=reference,
    )


def test_new_version_is_challenger_with_signature(registry_project):
    version = new_version(registry_project, 0.90, 1.0)
    state = status(CFG, uri(registry_project))
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
    assert promote(CFG, tracking=uri(paths)).promoted
    v2 = new_version(paths, 0.92, 1.0)
    decision = promote(CFG, tracking=uri(paths))
    assert decision.promoted and decision.champion_before == v1
    assert status(CFG, uri(paths))["champion"] == v2

    v3 = new_version(paths, 0.80, 1.0)  # worse beyond tolerance
    decision = promote(CFG, tracking=uri(paths))
    assert not decision.promoted and "below champion" in decision.reason
    state = status(CFG, uri(paths))
    assert state["champion"] == v2 and state["challenger"] == v3
    tags = mlflow.MlflowClient().get_model_version(CFG.model_name, v3).tags
    assert tags["promotion"].startswith("rejected:")

    v4 = new_version(paths, 0.95, 50.0)  # better but too slow
    decision = promote(CFG, tracking=uri(paths))
    assert not decision.promoted and "latency" in decision.reason

    restored = rollback(CFG, "v2 misclassifies sandals in production", uri(paths))
    assert restored == v1
    state = status(CFG, uri(paths))
    assert state["champion"] == v1 and state["history"] == [v1]
    tags = mlflow.MlflowClient().get_model_version(CFG.model_name, v2).tags
    assert tags["rolled_back"] == "v2 misclassifies sandals in production"
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(CFG, "again", uri(paths))
    assert v4 != v1


def test_within_tolerance_is_promoted(registry_project):
    new_version(registry_project, 0.900, 1.0)
    promote(CFG, tracking=uri(registry_project))
    v2 = new_version(registry_project, 0.895, 1.0)  # 0.005 lower, tolerance 0.01
    assert promote(CFG, tracking=uri(registry_project)).promoted
    assert (
        json.loads(
            mlflow.MlflowClient().get_registered_model(CFG.model_name).tags["champion_history"]
        )[-1]
        == v2
    )


def test_promote_without_challenger_is_clear(registry_project):
    with pytest.raises(RegistryError, match="test-model has no challenger"):
        promote(CFG, tracking=uri(registry_project))


@pytest.mark.parametrize(
    ("tag", "value", "words"),
    [
        ("test_data_hash", "b" * 64, "test data differs"),  # e.g. a data.fraction=0.05 run
        ("classes", json.dumps(["a", "b", "c", "e"]), "class list differs"),
        ("input_contract", json.dumps({"channels": 3, "height": 12, "width": 12}), "input"),
    ],
)
def test_incomparable_challenger_stays_challenger_with_the_reason(
    registry_project, tag, value, words
):
    paths = registry_project
    v1 = new_version(paths, 0.90, 1.0)
    assert promote(CFG, tracking=uri(paths)).promoted
    v2 = new_version(paths, 0.99, 1.0, **{tag: value})  # far "better", on other terms
    decision = promote(CFG, tracking=uri(paths))
    assert not decision.promoted and words in decision.reason
    assert status(CFG, uri(paths))["champion"] == v1
    recorded = mlflow.MlflowClient().get_model_version(CFG.model_name, v2).tags["promotion"]
    assert recorded.startswith("rejected:") and words in recorded
    # An operator can still decide otherwise, and it says so.
    forced = promote(CFG, v2, uri(paths), force=True)
    assert forced.promoted and forced.reason.startswith("forced by operator")


def test_version_that_records_no_test_data_is_not_compared(registry_project):
    paths = registry_project
    new_version(paths, 0.90, 1.0)
    promote(CFG, tracking=uri(paths))
    new_version(paths, 0.95, 1.0, test_data_hash="")
    client = mlflow.MlflowClient()
    client.delete_model_version_tag(CFG.model_name, "2", "test_data_hash")
    decision = promote(CFG, tracking=uri(paths))
    assert not decision.promoted and "v2 does not record its test data" in decision.reason


def test_concurrent_promotions_are_serialized_and_both_kept(registry_project):
    """Two flows promote at once: the second is judged against the first's result."""
    paths = registry_project
    new_version(paths, 0.90, 1.0)
    promote(CFG, tracking=uri(paths))
    v2 = new_version(paths, 0.93, 1.0)
    v3 = new_version(paths, 0.94, 1.0)
    decisions: dict[str, object] = {}
    with promotion_lock(uri(paths)):  # both start while a third promotion holds the lock
        threads = [
            threading.Thread(
                target=lambda v=v: decisions.__setitem__(v, promote(CFG, v, uri(paths)))
            )
            for v in (v2, v3)
        ]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert not decisions, "a promotion ran while another held the lock"
    for t in threads:
        t.join(timeout=60)
    first, second = sorted(decisions.values(), key=lambda d: d.champion_before)
    assert first.promoted and second.promoted
    assert second.champion_before == first.version  # judged against the new champion
    history = status(CFG, uri(paths))["history"]
    assert history == ["1", first.version, second.version]


def test_reference_belongs_to_its_version_and_follows_rollback(registry_project, tmp_path):
    """Monitoring reads the reference registered with the served version, after a rollback too."""
    from monitoring.reference import load_reference, save_reference
    from monitoring.report import only_version, served_reference

    paths = registry_project
    refs = []
    for i in (1, 2):
        ref = tmp_path / f"ref{i}" / "reference.npz"
        ref.parent.mkdir()
        save_reference({"confidence": np.full(3, i / 10, np.float32)}, ref)
        refs.append(ref)
    v1 = new_version(paths, 0.90, 1.0, reference=refs[0])
    promote(CFG, tracking=uri(paths))
    v2 = new_version(paths, 0.92, 1.0, reference=refs[1])
    promote(CFG, tracking=uri(paths))
    for version, expected in ((v1, 0.1), (v2, 0.2)):
        got = download_reference(uri(paths), CFG.model_name, version, tmp_path / f"dl{version}")
        assert load_reference(got)["confidence"][0] == pytest.approx(expected)
    rollback(CFG, "bad in production", uri(paths))
    champion = status(CFG, uri(paths))["champion"]
    reference, source = served_reference(paths, PARAMS, champion)
    assert champion == v1 and reference["confidence"][0] == pytest.approx(0.1)
    assert source == f"registry: {CFG.model_name} v{v1}"
    # A window that spans the rollback is judged on the served (newest) version's rows only.
    window = {
        "model_version": [v2, v2, v1],
        "confidence": np.array([0.5, 0.6, 0.7], np.float32),
        "images": [None, None, None],
    }
    kept = only_version(window, v1)
    assert kept["model_version"] == [v1] and kept["confidence"].tolist() == pytest.approx([0.7])

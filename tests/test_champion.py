"""The champion's lifecycle: following promotions and rollbacks, refusing tampered files, a
registry that is down, temp files that do not pile up.

The watcher runs against a real SQLite MLflow registry with real (tiny) ONNX models; the one
end-to-end test runs a real two-worker `bentoml serve` and a real `mlflow server`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import torch

from imageclf.config import Params, load_params
from imageclf.deploy.champion import ChampionWatcher, bound_registry_calls, remove_orphaned_folders
from imageclf.deploy.export import export_onnx
from imageclf.deploy.inference import resolve_model, save_examples
from imageclf.models.zoo import build_model
from imageclf.paths import ProjectPaths
from imageclf.registry import (
    EXAMPLES_TAG,
    LATENCY_METRIC,
    SHA256_TAG,
    artifact_sha256_tag,
    log_and_register,
    promote,
    rollback,
)
from imageclf.tracking import setup_mlflow, tracking_uri
from ops.local_servers import free_port, output, start, stop
from tests.conftest import FASHION_MNIST_DIR, tiny_params, write_params
from tests.service_helpers import champion_project, png, start_server

__all__ = ["champion_project"]  # a fixture: imported for pytest, not used by name

PARAMS = tiny_params(
    registry={"model_name": "watched", "accuracy_tolerance": 0.5, "max_latency_ms": 50.0}
)
CFG = PARAMS.registry
LIMITS = PARAMS.serving
CLASSES = ["a", "b", "c", "d"]
SAME_DATA = {
    "test_data_hash": "b" * 64,
    "classes": json.dumps(CLASSES),
    "input_contract": json.dumps({"channels": 1, "height": 12, "width": 12}),
}


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two different tiny classifiers with the export metadata the service reads."""
    folder = tmp_path_factory.mktemp("models")
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        files.append(
            export_onnx(
                build_model("resnet_small", 4, 1, 4).eval(),
                folder / f"m{seed}.onnx",
                (1, 12, 12),
                metadata={
                    "classes": json.dumps(CLASSES),
                    "input": '{"height": 12, "width": 12, "channels": 1}',
                },
            )
        )
    return files


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    paths = ProjectPaths(tmp_path)
    setup_mlflow(paths, "champion-test")
    return tracking_uri(paths)


def register(tracking: str, onnx_path: Path, accuracy: float = 0.9) -> str:
    with mlflow.start_run() as run:
        mlflow.log_metrics({"test_accuracy": accuracy, LATENCY_METRIC: 1.0})
    example = np.random.default_rng(0).random((2, 1, 12, 12), dtype=np.float32)
    return log_and_register(tracking, PARAMS, run.info.run_id, onnx_path, example, SAME_DATA)


def stored_file(version: str, name: str = CFG.model_name) -> Path:
    """The registered version's ONNX file in the artifact store (where tampering happens)."""
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, version)
    location = client.get_logged_model(mv.source.removeprefix("models:/")).artifact_location
    (path,) = Path(location.removeprefix("file://")).rglob("*.onnx")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == mv.tags[SHA256_TAG]
    return path


def tamper(path: Path) -> None:
    """Flip one byte in the middle of the file (a weight, not the header)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def entries(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*"))


def watcher(tracking: str, parent: Path, **limits: object) -> ChampionWatcher:
    return ChampionWatcher(
        tracking, CFG.model_name, "champion", LIMITS.model_copy(update=limits), parent
    )


def test_registration_records_the_stored_files_sha256(store, onnx_files, tmp_path):
    version = register(store, onnx_files[0])
    ref = resolve_model(store, CFG.model_name, "challenger", tmp_path / "dl")
    recorded = mlflow.MlflowClient().get_model_version(CFG.model_name, version).tags[SHA256_TAG]
    assert ref.verified and ref.sha256 == recorded
    assert hashlib.sha256(ref.path.read_bytes()).hexdigest() == recorded


def test_follows_promotions_and_rollbacks_and_temp_files_do_not_pile_up(
    store, onnx_files, tmp_path, monkeypatch
):
    """Every swap loads the version the alias names; MLflow's downloads and the previous
    version's files go, so the temp dir (the service's is /dev/shm) does not grow."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where MLflow would leave its own
    a = register(store, onnx_files[0])
    b = register(store, onnx_files[1])
    w = watcher(store, temp)
    assert w.poll() is None and "no model version has the alias" in w.reason
    assert promote(CFG, a, tracking=store).promoted
    first = w.poll()
    assert first is not None and first.ref.version == a and first.ref.verified
    assert w.poll() is None and w.current is first  # unchanged: nothing downloaded again
    baseline = entries(temp)
    probe = np.zeros((1, 12, 12, 1), dtype=np.uint8)
    outputs = {a: first.model.probabilities(probe)}
    for step in range(3):
        if step % 2 == 0:
            assert promote(CFG, b, tracking=store, force=True).promoted
            expected = b
        else:
            expected = rollback(CFG, "test", store)
            assert expected == a
        loaded = w.poll()
        assert loaded is not None and loaded.ref.version == expected
        assert w.current is loaded and w.reason == ""
        outputs[expected] = loaded.model.probabilities(probe)
        assert entries(temp) == baseline, sorted(temp.rglob("*"))
        assert [p.name.split("-")[0] for p in w.folder.iterdir()] == [f"v{expected}"]
    assert not np.allclose(outputs[a], outputs[b])  # two different models really were served
    w.close()
    assert entries(temp) == 0


def test_tampered_champion_is_refused_and_the_served_one_kept(store, onnx_files, tmp_path):
    a = register(store, onnx_files[0])
    b = register(store, onnx_files[1])
    assert promote(CFG, a, tracking=store).promoted
    w = watcher(store, tmp_path)
    assert w.poll() is not None
    tamper(stored_file(b))
    assert promote(CFG, b, tracking=store, force=True).promoted
    assert w.poll() is None
    assert w.current is not None and w.current.ref.version == a  # still serving A
    assert w.refused is not None and w.refused.version == b
    assert f"refused v{b}" in w.reason and "SHA-256" in w.reason and "tampered" in w.reason
    assert list(w.folder.iterdir()) == [w.current.folder]  # the refused download is gone

    fresh = watcher(store, tmp_path)  # a worker starting now has nothing to fall back on
    assert fresh.poll() is None and fresh.current is None
    assert f"refused v{b}" in fresh.reason

    rollback(CFG, "tampered file", store)  # back to the served version: nothing pending
    assert w.poll() is None and w.refused is None and w.reason == ""


def register_with_examples(tracking: str, onnx_path: Path, examples: Path) -> str:
    with mlflow.start_run() as run:
        mlflow.log_metrics({"test_accuracy": 0.9, LATENCY_METRIC: 1.0})
    example = np.random.default_rng(0).random((2, 1, 12, 12), dtype=np.float32)
    return log_and_register(
        tracking, PARAMS, run.info.run_id, onnx_path, example, SAME_DATA, examples=examples
    )


def stored_examples(version: str) -> Path:
    """The version's example images in the artifact store."""
    client = mlflow.MlflowClient()
    mv = client.get_model_version(CFG.model_name, version)
    root = Path(client.get_run(mv.run_id).info.artifact_uri.removeprefix("file://"))
    return root / mv.tags[EXAMPLES_TAG]


def test_every_file_of_a_version_is_verified_and_a_bad_one_never_leaks_or_crashes(
    store, onnx_files, tmp_path, monkeypatch
):
    """The examples file is hashed at registration like the model: changed in the store, it
    refuses the version, whose download is deleted at once and not fetched again each poll; a
    broken one (registered so) costs only the examples; and any other failure while loading a
    version refuses it instead of crashing a worker that is starting."""
    images = np.full((4, 12, 12, 1), 7, dtype=np.uint8)
    good = tmp_path / "examples.npz"
    save_examples(good, images, np.arange(4), CLASSES)
    a = register_with_examples(store, onnx_files[0], good)
    b = register_with_examples(store, onnx_files[1], good)
    tags = mlflow.MlflowClient().get_model_version(CFG.model_name, b).tags
    assert tags[artifact_sha256_tag(EXAMPLES_TAG)] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert promote(CFG, a, tracking=store).promoted
    for parent in ("w", "fresh"):
        (tmp_path / parent).mkdir()
    w = watcher(store, tmp_path / "w")
    served = w.poll()
    assert served is not None and len(served.examples) == 4
    stored_examples(b).write_bytes(b"not the registered file")
    assert promote(CFG, b, tracking=store, force=True).promoted
    for _ in range(3):  # refused once, and nothing is downloaded or left behind by later polls
        assert w.poll() is None and w.current is served
        assert list(w.folder.iterdir()) == [served.folder]
    assert f"refused v{b}" in w.reason and "tampered" in w.reason

    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 a zip that is not one")
    c = register_with_examples(store, onnx_files[1], broken)
    assert promote(CFG, c, tracking=store, force=True).promoted
    loaded = w.poll()
    assert loaded is not None and loaded.ref.version == c and loaded.examples == []

    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr(ChampionWatcher, "_examples", fails)
    fresh = watcher(store, tmp_path / "fresh")  # a worker starting now: must not crash
    for _ in range(2):
        assert fresh.poll() is None and fresh.current is None
        assert list(fresh.folder.iterdir()) == []
    assert f"refused v{c}" in fresh.reason and "something nobody foresaw" in fresh.reason


def test_version_without_recorded_sha256(store, onnx_files, tmp_path):
    """Versions registered before the hash was recorded: served unverified, and said so, by
    default; refused with serving.require_sha256."""
    a = register(store, onnx_files[0])
    mlflow.MlflowClient().delete_model_version_tag(CFG.model_name, a, SHA256_TAG)
    assert promote(CFG, a, tracking=store).promoted
    lenient = watcher(store, tmp_path)
    loaded = lenient.poll()
    assert loaded is not None and not loaded.ref.verified
    assert "unverified" in lenient.reason
    strict = watcher(store, tmp_path, require_sha256=True)
    assert strict.poll() is None and strict.current is None
    assert "require_sha256" in strict.reason


def test_registry_down_is_a_reason_without_credentials(tmp_path, monkeypatch):
    for var in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(var, raising=False)
    bound_registry_calls(LIMITS.registry_timeout_s)  # else MLflow retries for minutes
    uri = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    w = watcher(uri, tmp_path)
    assert w.poll() is None and w.current is None
    assert "does not answer" in w.reason and "s3cret" not in w.reason
    assert "***@127.0.0.1" in w.reason


def test_folders_of_dead_workers_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = tmp_path / f"imageclf-models-{dead.stdout.strip()}-abc"
    (orphan / "v1-1").mkdir(parents=True)
    mine = tmp_path / f"imageclf-models-{os.getpid()}-def"
    mine.mkdir()
    assert remove_orphaned_folders(tmp_path) == [orphan]
    assert not orphan.exists() and mine.exists()


# ------------------------------------------------------------------ end to end, real servers
LIFECYCLE_EXPERIMENT = "lifecycle"


def lifecycle_root(champion: ProjectPaths, root: Path) -> tuple[ProjectPaths, str, Params]:
    """A copy of the served champion's registry (its artifacts stay where they are): the
    promotions, rollbacks and tampering below never touch the shared project."""
    import shutil

    shutil.copy(champion.root / "mlflow.db", root / "mlflow.db")
    params = load_params(champion.params)
    raw = params.model_dump(by_alias=True)
    raw["serving"]["poll_seconds"] = 1.0
    raw["serving"]["upload_temp_dir"] = str(root / "shm")  # what each worker leaves, seen
    (root / "shm").mkdir()
    raw["monitoring"]["log_predictions"] = False
    params = Params.model_validate(raw)
    write_params(root, params)
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    # Through a client only: MLflow's process-wide tracking URI and active experiment would
    # outlive this test and send later tests' runs into this store.
    mlflow.MlflowClient(tracking).create_experiment(
        LIFECYCLE_EXPERIMENT, artifact_location=(root / "mlruns").as_uri()
    )
    return ProjectPaths(root), tracking, params


def register_untrained(champion: ProjectPaths, tracking: str, params: Params, seed: int) -> str:
    """Another version for the champion's inputs and classes (untrained: only its version
    number matters here), with the metrics promotion asks for."""
    from imageclf.onnx_runtime import onnx_metadata

    meta = onnx_metadata(champion.onnx)
    spec = json.loads(meta["input"])
    torch.manual_seed(seed)
    path = champion.root.parent / f"untrained-{seed}.onnx"
    export_onnx(
        build_model("resnet_small", len(json.loads(meta["classes"])), spec["channels"], 4),
        path,
        (spec["channels"], spec["height"], spec["width"]),
        metadata={k: meta[k] for k in ("classes", "input")},
    )
    client = mlflow.MlflowClient(tracking)
    experiment = client.get_experiment_by_name(LIFECYCLE_EXPERIMENT)
    run = client.create_run(experiment.experiment_id)
    for key, value in {"test_accuracy": 0.1, LATENCY_METRIC: 1.0}.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    example = np.zeros((2, spec["channels"], spec["height"], spec["width"]), np.float32)
    return log_and_register(tracking, params, run.info.run_id, path, example)


def served_versions(url: str, image: bytes, requests: int = 12) -> set[str]:
    """The versions named by ``requests`` concurrent requests, each on its own connection
    (so that both workers answer some)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(_: int) -> str:
        r = httpx.post(
            f"{url}/classify", files={"image": ("x.png", image, "image/png")}, timeout=30
        )
        assert r.status_code == 200, r.text
        return r.json()["model"]["version"]

    with ThreadPoolExecutor(requests) as pool:
        return set(pool.map(one, range(requests)))


def wait_for(
    check: Callable[[], bool], what: str, proc: subprocess.Popen, seconds: float = 90
) -> None:
    """Poll ``check`` until true (a bound on waiting, not a speed requirement)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:.0f} s\n{output(proc)}")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs dataset-fashion-mnist")
def test_service_follows_the_champion_without_restart(champion_project, tmp_path_factory):
    """Two workers follow a promotion and a rollback, keep the champion when the promoted
    file is tampered with, and a service started while the registry is down becomes ready
    when a real tracking server comes up."""
    paths, tracking, params = lifecycle_root(champion_project, tmp_path_factory.mktemp("life"))
    cfg = params.registry
    a = str(mlflow.MlflowClient().get_model_version_by_alias(cfg.model_name, "champion").version)
    b = register_untrained(champion_project, tracking, params, seed=1)
    c = register_untrained(champion_project, tracking, params, seed=2)
    image = png(np.zeros((28, 28), np.uint8))
    port = free_port()
    down = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    waiting, waiting_url = start_server(paths, env=down)
    registry_server = None
    served, url = start_server(paths)
    try:
        # Started while the registry is down: not ready, and every endpoint says why.
        assert httpx.get(f"{waiting_url}/readyz").status_code == 503
        refused = httpx.post(
            f"{waiting_url}/classify", files={"image": ("x.png", image, "image/png")}
        )
        assert refused.status_code == 503 and "does not answer" in refused.text
        registry_server = start(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                tracking,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            # Its optional job runner would leave a folder in /dev/shm per start.
            {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )

        assert served_versions(url, image) == {a}
        assert promote(cfg, b, tracking=tracking, force=True).promoted
        wait_for(lambda: served_versions(url, image) == {b}, f"v{b} on every worker", served)
        assert rollback(cfg, "end-to-end test", tracking) == a
        wait_for(lambda: served_versions(url, image) == {a}, f"v{a} back", served)

        # The registry came back: ready by itself, serving the champion. /readyz is answered
        # by one worker: every worker is ready once concurrent requests all get answers.
        def all_workers_serve_a() -> bool:
            try:
                return served_versions(waiting_url, image) == {a}
            except AssertionError:  # a worker still without a model (503)
                return False

        wait_for(
            all_workers_serve_a,
            "ready once the registry answers",
            waiting,
            seconds=240,  # mlflow server takes 30-90 s to start on 2 cores
        )

        # A tampered file is refused: the workers keep serving A and say why.
        mlflow.set_tracking_uri(tracking)
        tamper(stored_file(c, cfg.model_name))
        assert promote(cfg, c, tracking=tracking, force=True).promoted

        def refusal_reported() -> bool:
            infos = [httpx.post(f"{url}/model_info", json={}).json() for _ in range(6)]
            return all(f"refused v{c}" in (i.get("reason") or "") for i in infos)

        wait_for(refusal_reported, f"v{c} refused", served)
        info = httpx.post(f"{url}/model_info", json={}).json()
        assert info["ready"] and info["version"] == a and "tampered" in info["reason"]
        assert served_versions(url, image) == {a}
        for worker in range(1, params.serving.workers + 1):  # each worker polls on its own
            assert f"imageclf:{worker}] refused {cfg.model_name} v{c}" in output(served, 10**6)
        # One folder per worker of both services, each holding only the version it serves.
        folders = list((paths.root / "shm").glob("imageclf-models-*"))
        assert len(folders) == 2 * params.serving.workers
        assert all(len(list(folder.iterdir())) == 1 for folder in folders)
        assert not list((paths.root / "shm").glob("tmp*"))  # no MLflow download folders
    finally:
        for proc in (served, waiting, registry_server):
            if proc is not None:
                stop(proc)
    assert not list((paths.root / "shm").glob("imageclf-models-*"))  # removed at shutdown

"""A served champion for the tests that talk to a real `bentoml serve`, trained once per session.

The champion is a real (small, quickly trained) Fashion-MNIST model: trained with the stage
functions, registered and promoted in a temporary MLflow store. Every test module that needs a
served model imports ``champion_project`` (and ``start_server``) from here; the project is
built by whichever module asks first and reused by the others, so the suite trains it once.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from imageclf.config import load_params
from imageclf.paths import ProjectPaths
from imageclf.registry import promote, register_workspace
from imageclf.tracking import tracking_uri
from ops.local_servers import free_port, start
from stages import benchmark, download, evaluate, export, reference, train
from tests.conftest import FASHION_MNIST_DIR, REPO, tiny_params, write_params

# The served limits are the project's defaults (phone photos must pass them), except a small
# max_images_per_request that keeps the "too many images" request cheap.
DEFAULT_LIMITS = load_params(REPO / "params.yaml").serving
MAX_BYTES = DEFAULT_LIMITS.max_request_bytes
MAX_IMAGES = 4
_BUILT: dict[str, ProjectPaths] = {}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.squeeze()).save(buf, format="PNG")
    return buf.getvalue()


def _project_env(root: Path) -> dict[str, str]:
    return {"IMAGECLF_ROOT": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}


def _build(root: Path) -> ProjectPaths:
    params = tiny_params(
        data={"fraction": 0.25, "sources": [str(FASHION_MNIST_DIR)]},
        train={"epochs": 3, "width": 8, "batch_size": 128, "lr": 0.1},
        serving={"max_images_per_request": MAX_IMAGES},
        registry={"max_latency_ms": 1000.0},
    )
    write_params(root, params)
    paths = ProjectPaths(root)
    for stage in (download, train, evaluate, export, benchmark, reference):
        stage.run(params, paths)
    register_workspace(paths, params)
    assert promote(params.registry, tracking=tracking_uri(paths)).promoted
    return paths


@pytest.fixture(scope="module")
def champion_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProjectPaths]:
    """The trained, registered and promoted project (built once per session), with this
    process's environment pointing at its MLflow store while the module's tests run."""
    old = {k: os.environ.get(k) for k in ("IMAGECLF_ROOT", "MLFLOW_TRACKING_URI")}
    if "paths" in _BUILT:
        os.environ.update(_project_env(_BUILT["paths"].root))
    else:
        root = tmp_path_factory.mktemp("served")
        os.environ.update(_project_env(root))
        _BUILT["paths"] = _build(root)
    yield _BUILT["paths"]
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def start_server(
    paths: ProjectPaths,
    alias: str | None = None,
    env: dict[str, str] | None = None,
    serving: dict[str, Any] | None = None,
) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` of the project on a free loopback port; ``env`` adds variables,
    ``serving`` overrides params.yaml's serving section (in a folder of its own, beside the
    project, that shares the project's MLflow store)."""
    port = free_port()
    home = paths.root / f"bentoml-{port}"
    root = paths.root
    if serving:
        root = paths.root / f"variant-{port}"
        root.mkdir()
        raw = yaml.safe_load(paths.params.read_text())
        raw["serving"].update(serving)
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    full_env = {
        **os.environ,
        **_project_env(paths.root),
        "IMAGECLF_ROOT": str(root),
        "BENTOML_HOME": str(home),
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }
    # One BentoML home per server: each keeps (and resets at start) its task store there.
    home.mkdir()
    if alias:
        full_env["IMAGECLF_SERVING_ALIAS"] = alias
    bentoml = shutil.which("bentoml", path=str(Path(sys.executable).parent))
    assert bentoml is not None
    url = f"http://127.0.0.1:{port}"
    cmd = [bentoml, "serve", "services.service:ImageClassifier", "--host", "127.0.0.1"]
    return start([*cmd, "--port", str(port)], full_env, cwd=REPO, ready_url=f"{url}/livez"), url

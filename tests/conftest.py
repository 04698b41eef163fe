"""Shared fixtures: real configs shrunk to tiny sizes, tiny datasets made here (no downloads)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from imageclf.config import Params, load_params
from imageclf.data.store import Split, write_dataset
from imageclf.paths import ProjectPaths

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def _mlflow_state_stays_in_its_test() -> Iterator[None]:
    """Each test starts with MLflow as a fresh process has it: MLflow keeps the tracking URI
    and the active experiment process-wide and copies them into os.environ, so whatever an
    earlier test (or a module's fixture) pointed it at would receive this test's runs, or its
    child processes'. The store a test means is the one its fixtures put in
    MLFLOW_TRACKING_URI."""
    import mlflow.tracking._tracking_service.utils as tracking_state
    import mlflow.tracking.fluent as fluent_state

    env = {key: os.environ.get(key) for key in MLFLOW_ENV}

    def forget() -> None:
        tracking_state._tracking_uri = None
        fluent_state._active_experiment_id = None
        for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
            os.environ.pop(key, None)

    forget()
    yield
    forget()
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def dvc_stages() -> list[str]:
    """The pipeline's stages, in dvc.yaml's order: tests read them, never list them again."""
    return list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def synthetic_split(
    n_per_class: int, num_classes: int = 4, size: int = 12, seed: int = 0, channels: int = 1
) -> Split:
    """Class k is a central block of brightness 60(k+1) on noise: learnable in a few steps, and
    unchanged in meaning by the flips and shifts of training augmentation."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    lo, hi = size // 4, size - size // 4
    for cls in range(num_classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 40, size=(size, size, channels), dtype=np.uint8)
            img[lo:hi, lo:hi] = min(255, 60 * (cls + 1)) - rng.integers(0, 15)
            images.append(img)
            labels.append(cls)
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64))


def tiny_params(**overrides: dict) -> Params:
    """The project's params.yaml with sizes shrunk so a stage takes seconds."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(epochs=1, width=8, batch_size=32)
    raw["dataloader_check"].update(
        overfit_steps=60,
        overfit_batch_size=16,
        throughput_batches=2,
        grid={"num_workers": [0], "pin_memory": [False], "prefetch_factor": [2]},
    )
    raw["profile"].update(steps=2, warmup=1, batch_size=32)
    raw["optimize"].update(calibration_images=32, eval_images=64)
    raw["export"].update(compare_images=32)
    raw["benchmark"].update(batch_sizes=[1, 8], warmup=1, iterations=3, torch_compile=False)
    raw["data"]["val_fraction"] = 0.1
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return Params.model_validate(raw)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ProjectPaths:
    """A project folder with the real params.yaml, an isolated MLflow store, and a tiny dataset."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("IMAGECLF_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    paths = ProjectPaths(tmp_path)
    write_dataset(
        paths.dataset,
        synthetic_split(24, seed=1),
        synthetic_split(8, seed=2),
        {"name": "synthetic", "classes": ["a", "b", "c", "d"], "fraction": 1.0, "source": {}},
    )
    return paths


@pytest.fixture
def default_params() -> Params:
    return load_params(REPO / "params.yaml")


def write_params(root: Path, params: Params) -> Path:
    """Write ``params`` as the project's params.yaml (what flows and CLIs read)."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(by_alias=True), sort_keys=False))
    return path


def write_imagefolder(
    root: Path,
    n_train: int = 30,
    n_test: int = 10,
    seed: int = 0,
    counts: dict[int, int] | None = None,
) -> Path:
    """A small ImageFolder tree of PNGs (class folders c0..c3) from :func:`synthetic_split`.

    ``counts`` overrides the number of training images of some classes (for imbalance tests).
    """
    from PIL import Image

    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1)):
        data = synthetic_split(n, seed=seed + offset)
        for i, (img, label) in enumerate(zip(data.images, data.labels, strict=True)):
            if split == "train" and counts and i % n >= counts.get(int(label), n):
                continue
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[..., 0]).save(folder / f"{i}.png")
    return root


def repo_copy(dest: Path, params: Params | None = None) -> Path:
    """A Git repository at ``dest`` holding this project's files (tracked and new, not ignored;
    no dvc.lock or outputs), with ``params`` as its params.yaml, committed once: what a user's
    fresh clone is, for tests of the pipeline, DVC experiments and the flows."""
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src = REPO / name
        output = name.startswith(("reports/", "models/")) and not name.endswith(".gitignore")
        if name == "dvc.lock" or output or not src.is_file():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    if params is not None:
        write_params(dest, params)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    for key, value in (("user.name", "test"), ("user.email", "test@localhost")):
        # `dvc exp run` commits; CI machines may have no global Git identity.
        subprocess.run(["git", "config", key, value], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fresh clone"], cwd=dest, check=True)
    return dest

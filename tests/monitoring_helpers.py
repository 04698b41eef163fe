"""Build a project with a served-model stand-in, its reference, and a filled prediction log."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from imageclf.config import Params
from imageclf.deploy.inference import OnnxClassifier
from imageclf.paths import ProjectPaths
from monitoring.features import pixel_features
from monitoring.prediction_log import PredictionLog
from stages import download, export, reference, train
from tests.conftest import FASHION_MNIST_DIR, tiny_params, write_params


def monitoring_project(root: Path, monkeypatch: Any) -> tuple[ProjectPaths, Params]:
    """A project whose exported model was trained briefly on real Fashion-MNIST (an untrained
    network's embedding barely notices some shifts, e.g. rotation), with its reference."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    params = tiny_params(
        data={"fraction": 0.1, "sources": [str(FASHION_MNIST_DIR)]},
        train={"epochs": 2, "width": 8, "batch_size": 128, "lr": 0.1},
        monitoring={"reference_size": 2000, "min_window": 100},
    )
    write_params(root, params)
    paths = ProjectPaths(root)
    for stage in (download, train, export, reference):
        stage.run(params, paths)
    return paths, params


def serve_window(paths: ProjectPaths, params: Params, images: np.ndarray) -> Path:
    """Log ``images`` the way the service does: through the model, one row per image."""
    model = OnnxClassifier(paths.onnx)
    probs, embeddings = model.predict(images)
    pixels = pixel_features(images)
    path = paths.root / params.monitoring.log_path
    log = PredictionLog(path)
    log.append(
        [
            PredictionLog.row(
                time.time(),
                "1",
                int(k),
                model.classes[int(k)],
                float(probs[i, k]),
                1.0,
                pixels[i],
                embeddings[i],
            )
            for i, k in enumerate(probs.argmax(1))
        ]
    )
    log.close()
    return path

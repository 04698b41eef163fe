"""Build a project with a served-model stand-in, its reference, and a filled prediction log."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from imageclf.config import Params
from imageclf.data.store import load_dataset
from imageclf.export import export_onnx
from imageclf.models import ServingGraph, build_model
from imageclf.paths import ProjectPaths
from imageclf.serving import OnnxClassifier
from monitoring.features import pixel_features
from monitoring.prediction_log import PredictionLog
from stages import download, reference
from tests.conftest import FASHION_MNIST_DIR, tiny_params, write_params


def monitoring_project(root: Path) -> tuple[ProjectPaths, Params]:
    params = tiny_params(
        data={"fraction": 0.1, "sources": [str(FASHION_MNIST_DIR)]},
        monitoring={"reference_size": 2000, "min_window": 100},
    )
    write_params(root, params)
    paths = ProjectPaths(root)
    download.run(params, paths)
    torch.manual_seed(0)
    model = ServingGraph(build_model("resnet_small", 10, 1, 8).eval(), tta_flip=False)
    classes = load_dataset(paths.dataset).classes
    export_onnx(
        model,
        paths.onnx,
        (1, 28, 28),
        metadata={
            "classes": json.dumps(classes),
            "input": json.dumps({"height": 28, "width": 28, "channels": 1}),
        },
    )
    reference.run(params, paths)
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

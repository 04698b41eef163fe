"""Monitoring end to end without the server: reference stage, prediction log, report, verdict."""

from __future__ import annotations

import numpy as np
import pytest

from imageclf.data.store import load_dataset
from imageclf.io import read_json
from imageclf.models.checkpoint import load_checkpoint
from imageclf.models.zoo import split_head
from monitoring.report import run_monitoring
from tests.conftest import FASHION_MNIST_DIR
from tests.monitoring_helpers import monitoring_project, serve_window

pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="needs dataset-fashion-mnist"
)


def test_reference_stage_writes_summaries(tmp_path, monkeypatch):
    paths, _ = monitoring_project(tmp_path, monkeypatch)
    summary = read_json(paths.reports / "reference.json")
    # The embedding is the classifier's input, whatever the trained architecture.
    dim = split_head(load_checkpoint(paths.checkpoint)[0])[1].in_features
    assert summary["images"] == 2000 and summary["embedding_dim"] == dim
    assert abs(sum(summary["predicted_share"].values()) - 1) < 1e-3


@pytest.mark.parametrize(
    ("shift", "drift"),
    [("none", False), ("inverted", True), ("brighter", True), ("rotated", True)],
)
def test_report_on_the_logged_window(tmp_path, monkeypatch, shift, drift):
    paths, params = monitoring_project(tmp_path, monkeypatch)
    images = load_dataset(paths.dataset).test.images[:400]
    if shift == "inverted":
        images = 255 - images
    elif shift == "rotated":
        images = np.rot90(images, 1, axes=(1, 2)).copy()
    elif shift == "brighter":
        images = (images.astype(int) + 60).clip(0, 255).astype("uint8")
    serve_window(paths, params, images)
    result = run_monitoring(paths, params, last=400)
    assert result["drift"] is drift, result["reasons"]
    assert result["window_size"] == 400 and result["model_versions"] == ["1"]
    page = (paths.reports / "monitoring" / "report.html").read_text()
    assert ("DRIFT" in page) is drift and "data:image/png;base64," in page
    assert read_json(paths.reports / "monitoring" / "verdict.json")["drift"] is drift


def test_repeated_held_out_windows_rarely_alarm_with_the_models_embedding(tmp_path, monkeypatch):
    """False alarms in at most 5% of windows, through the real log and the model's embedding."""
    import numpy as np

    from monitoring.prediction_log import PredictionLog

    paths, params = monitoring_project(tmp_path, monkeypatch)
    test = load_dataset(paths.dataset).test.images
    alarms = 0
    for w in range(20):
        log_file = paths.root / params.monitoring.log_path
        log_file.unlink(missing_ok=True)
        idx = np.random.default_rng(w).choice(len(test), 150, replace=False)
        serve_window(paths, params, test[idx])
        assert len(PredictionLog(log_file).read_window()["ts"]) == 150
        alarms += run_monitoring(paths, params, last=150)["drift"]
    assert alarms <= 1


def test_images_of_another_kind_alarm(tmp_path, monkeypatch):
    """Not clothes at all: synthetic block images (the kind the unit tests train on)."""
    from tests.conftest import synthetic_split

    paths, params = monitoring_project(tmp_path, monkeypatch)
    other = synthetic_split(100, size=28).images  # 400 images of bright squares on noise
    serve_window(paths, params, other)
    result = run_monitoring(paths, params, last=400)
    assert result["drift"] and len(result["reasons"]) >= 2

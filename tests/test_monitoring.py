"""Monitoring end to end without the server: reference stage, prediction log, report, verdict."""

from __future__ import annotations

import pytest

from imageclf.data.store import load_dataset
from imageclf.io import read_json
from monitoring.report import run_monitoring
from tests.conftest import FASHION_MNIST_DIR
from tests.monitoring_helpers import monitoring_project, serve_window

pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="needs dataset-fashion-mnist"
)


def test_reference_stage_writes_summaries(tmp_path):
    paths, _ = monitoring_project(tmp_path)
    summary = read_json(paths.reports / "reference.json")
    assert summary["images"] == 2000 and summary["embedding_dim"] == 32
    assert abs(sum(summary["predicted_share"].values()) - 1) < 1e-3


@pytest.mark.parametrize(
    ("shift", "drift"), [("none", False), ("inverted", True), ("brighter", True)]
)
def test_report_on_the_logged_window(tmp_path, shift, drift):
    paths, params = monitoring_project(tmp_path)
    images = load_dataset(paths.dataset).test.images[:400]
    if shift == "inverted":
        images = 255 - images
    elif shift == "brighter":
        images = (images.astype(int) + 60).clip(0, 255).astype("uint8")
    serve_window(paths, params, images)
    result = run_monitoring(paths, params, last=400)
    assert result["drift"] is drift, result["reasons"]
    assert result["window_size"] == 400 and result["model_versions"] == ["1"]
    page = (paths.reports / "monitoring" / "report.html").read_text()
    assert ("DRIFT" in page) is drift and "data:image/png;base64," in page
    assert read_json(paths.reports / "monitoring" / "verdict.json")["drift"] is drift

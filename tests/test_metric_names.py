"""Shared metric names: one spelling, stable across releases, cheap to import."""

from __future__ import annotations

import ast

from imageclf.metric_names import ONNXRUNTIME_FP32, SERVED_LATENCY_METRIC, bench_key, bench_metric
from tests.conftest import REPO


def test_names_match_what_earlier_runs_recorded():
    """MLflow runs and dvc.lock already hold these names: a new spelling would orphan them."""
    assert bench_key(ONNXRUNTIME_FP32, 64, "images_per_second") == (
        "onnxruntime_fp32.batch_64.images_per_second"
    )
    assert bench_metric(ONNXRUNTIME_FP32, 1, "p50_ms") == "bench.onnxruntime_fp32.batch_1.p50_ms"
    assert SERVED_LATENCY_METRIC == "bench.onnxruntime_fp32.batch_1.p50_ms"


def test_module_imports_nothing():
    """The registry, the service and compare read these names without loading torch & co."""
    tree = ast.parse((REPO / "imageclf" / "metric_names.py").read_text())
    imports = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")
    ]
    assert not imports, [ast.unparse(node) for node in imports]

"""ONNX Runtime sessions and the metadata exported models carry; no torch needed here.

Serving imports only this (and NumPy/Pillow), so a service image does not have to ship torch.
A base module (tests/test_architecture.py): the registry reads exported models through it too,
without importing deploy/, which sits above the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
EMBEDDING_NAME = "embedding"


def ort_session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session with full graph optimizations (``threads`` 0: ORT default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_metadata(path: Path) -> dict[str, str]:
    """The key/value metadata written by :func:`export_onnx` (class names, input spec...)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}

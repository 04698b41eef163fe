"""Names of the metrics that several modules share, spelled in one place.

The benchmark stage writes them, the registry promotes by one of them, the service shows them and
``imageclf.compare`` tabulates them: a name built here cannot differ between writer and readers.
Imports nothing, so reading a metric name never costs loading torch or MLflow.
"""

from __future__ import annotations

# Backends the benchmark times (rows of reports/benchmark.json).
PYTORCH_EAGER = "pytorch_eager"
TORCHSCRIPT = "torchscript"
TORCH_COMPILE = "torch_compile"
ONNXRUNTIME_FP32 = "onnxruntime_fp32"  # the served runtime and precision
ONNXRUNTIME_INT8 = "onnxruntime_int8"

# Statistics of one (backend, batch size) row that become metrics.
BENCH_STATS = ("p50_ms", "p99_ms", "images_per_second", "compile_seconds")

# Where a benchmark number lives in MLflow: the training run's metrics carry this prefix.
BENCH_PREFIX = "bench."


def bench_key(backend: str, batch: int, stat: str) -> str:
    """The key of one benchmark number in reports/benchmark.json (what `dvc metrics` shows)."""
    return f"{backend}.batch_{batch}.{stat}"


def bench_metric(backend: str, batch: int, stat: str) -> str:
    """The MLflow metric name of the same number, e.g. ``bench.onnxruntime_fp32.batch_1.p50_ms``."""
    return BENCH_PREFIX + bench_key(backend, batch, stat)


# What promotion's latency budget (registry.max_latency_ms) is checked against: one image at a
# time through the served runtime.
SERVED_LATENCY_METRIC = bench_metric(ONNXRUNTIME_FP32, 1, "p50_ms")

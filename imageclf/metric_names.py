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

# Evaluation (reports/evaluate.json, and the training run's metrics in MLflow).
TEST_ACCURACY = "test_accuracy"
TEST_ACCURACY_NO_TTA = "test_accuracy_no_tta"
MACRO_F1 = "macro_f1"
# Mean per-class recall: on an imbalanced test set, plain accuracy hides a class the model misses.
BALANCED_ACCURACY = "balanced_accuracy"
# The lowest per-class recall (the number; which class it is sits beside it in the report).
WORST_RECALL = "worst_recall"
# Per-class statistics logged as ``<stat>.<class>``.
PER_CLASS_STATS = ("precision", "recall", "f1")


def per_class_metric(stat: str, class_name: str) -> str:
    """``recall.Shirt``: the MLflow name of one class's statistic. A folder name may hold any
    character: those MLflow refuses in a metric name become ``_``, and empty, ``.`` and ``..``
    path segments (MLflow refuses names that normalise to another path) are dropped."""
    safe = "".join(c if c.isalnum() or c in "_-. /" else "_" for c in class_name)
    parts = [part for part in safe.split("/") if part not in ("", ".", "..")]
    return f"{stat}.{'/'.join(parts) or '_'}"

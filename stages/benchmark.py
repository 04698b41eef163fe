"""Stage benchmark: PyTorch (eager, TorchScript, torch.compile) vs ONNX Runtime (FP32, INT8)
latency and throughput, all in one process."""

from __future__ import annotations

from typing import Any

from imageclf.config import Params
from imageclf.data.store import load_dataset
from imageclf.deploy.benchmark import benchmark_backends
from imageclf.evaluation.metrics import plot_bars
from imageclf.io import read_json, write_json
from imageclf.metric_names import (
    BENCH_PREFIX,
    BENCH_STATS,
    ONNXRUNTIME_FP32,
    ONNXRUNTIME_INT8,
    bench_key,
)
from imageclf.models.checkpoint import load_serving_model
from imageclf.paths import ProjectPaths
from imageclf.stage import main
from imageclf.tracking import log_to_run


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Time every backend in one process and write reports/benchmark.json plus a chart."""
    cfg = params.benchmark
    dataset = load_dataset(paths.dataset)
    model, _, _ = load_serving_model(paths, params.tta_views)
    onnx_paths = {ONNXRUNTIME_FP32: paths.onnx}
    if paths.onnx_int8.is_file():
        onnx_paths[ONNXRUNTIME_INT8] = paths.onnx_int8
    rows = benchmark_backends(
        model,
        onnx_paths,
        dataset.test.images[: max(cfg.batch_sizes)],
        cfg.batch_sizes,
        cfg.warmup,
        cfg.iterations,
        cfg.threads,
        torchscript_path=paths.torchscript if paths.torchscript.is_file() else None,
        compile_model=cfg.torch_compile,
        max_seconds=cfg.max_seconds,
    )
    summary: dict[str, Any] = {}
    for row in rows:
        for stat in BENCH_STATS:
            if stat in row:
                summary[bench_key(row["backend"], row["batch_size"], stat)] = row[stat]
    report = {"threads": rows[0]["threads"], "rows": rows, **summary}
    write_json(paths.benchmark_report, report)
    labels = [f"batch {b}" for b in cfg.batch_sizes]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    chart = plot_bars(
        labels,
        {
            b: [
                next(
                    r["images_per_second"]
                    for r in rows
                    if r["backend"] == b and r["batch_size"] == bs
                )
                for bs in cfg.batch_sizes
            ]
            for b in backends
        },
        paths.benchmark_plot,
        f"Inference throughput ({report['threads']} threads)",
        "images / second",
        log=True,
    )
    train_info = read_json(paths.train_report) if paths.train_report.is_file() else {}
    log_to_run(paths, train_info.get("mlflow_run_id"), summary, [chart], prefix=BENCH_PREFIX)
    return report


if __name__ == "__main__":
    main(run)

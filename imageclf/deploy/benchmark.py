"""Latency and throughput of the model in PyTorch (eager, TorchScript, torch.compile) and ONNX
Runtime (FP32, INT8), measured in one process.

Numbers from one invocation are comparable with each other; numbers from different runs on a
shared machine are not, which is why every backend is timed here side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imageclf.data.transforms import to_model_input
from imageclf.deploy.export import INPUT_NAME, load_torchscript, ort_session
from imageclf.deploy.optimize import time_call
from imageclf.metric_names import PYTORCH_EAGER, TORCH_COMPILE, TORCHSCRIPT


def summarize(latencies_ms: list[float], batch: int) -> dict[str, float]:
    arr = np.asarray(latencies_ms)
    p50 = float(np.percentile(arr, 50))
    return {
        "p50_ms": p50,
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "images_per_second": batch * 1000.0 / max(float(arr.mean()), 1e-9),
    }


def benchmark_backends(
    model: nn.Module,
    onnx_paths: dict[str, Path],
    images: np.ndarray,
    batch_sizes: list[int],
    warmup: int,
    iterations: int,
    threads: int,
    torchscript_path: Path | None = None,
    compile_model: bool = False,
    max_seconds: float = 0.0,
) -> list[dict[str, Any]]:
    """One row per (backend, batch size): p50/p99 latency and throughput, from at most
    ``iterations`` calls or ``max_seconds`` of them (``time_call``); each row says how many.

    ``torch_compile`` rows also carry ``compile_seconds``: the first call at each batch size
    (Inductor generates and builds C++ kernels per shape), paid once per process and shape,
    which is what decides whether compiling pays off for a short job."""
    if threads > 0:
        torch.set_num_threads(threads)
    rows = []
    model = model.eval().cpu()
    sessions = {name: ort_session(path, threads) for name, path in onnx_paths.items()}
    scripted = load_torchscript(torchscript_path) if torchscript_path else None
    compiled = torch.compile(model, dynamic=False) if compile_model else None
    for batch in batch_sizes:
        reps = int(np.ceil(batch / len(images)))
        x = to_model_input(np.concatenate([images] * reps)[:batch] if reps > 1 else images[:batch])
        backends: dict[str, Callable[[], Any]] = {}

        def eager(x: torch.Tensor = x) -> Any:
            with torch.inference_mode():
                return model(x)

        backends[PYTORCH_EAGER] = eager
        compile_seconds: float | None = None
        if scripted is not None:

            def torchscript(x: torch.Tensor = x, m: Any = scripted) -> Any:
                with torch.inference_mode():
                    return m(x)

            backends[TORCHSCRIPT] = torchscript
        if compiled is not None:

            def torch_compile(x: torch.Tensor = x, m: Any = compiled) -> Any:
                with torch.inference_mode():
                    return m(x)

            started = time.perf_counter()
            torch_compile()  # compiles for this shape
            compile_seconds = time.perf_counter() - started
            backends[TORCH_COMPILE] = torch_compile
        feed = {INPUT_NAME: x.numpy()}
        for name, session in sessions.items():
            backends[name] = lambda s=session, f=feed: s.run(None, f)
        for name, fn in backends.items():
            latencies = time_call(fn, warmup, iterations, max_seconds)
            rows.append(
                {
                    "backend": name,
                    "batch_size": batch,
                    **summarize(latencies, batch),
                    "iterations": len(latencies),
                    "threads": threads or torch.get_num_threads(),
                    **({"compile_seconds": compile_seconds} if name == TORCH_COMPILE else {}),
                }
            )
    return rows

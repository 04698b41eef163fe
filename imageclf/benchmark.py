"""Latency and throughput of the model in PyTorch eager and ONNX Runtime, measured in one process.

Numbers from one invocation are comparable with each other; numbers from different runs on a
shared machine are not, which is why every backend is timed here side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imageclf.export import INPUT_NAME, ort_session
from imageclf.optimize import time_call
from imageclf.transforms import to_model_input


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
) -> list[dict[str, Any]]:
    """One row per (backend, batch size): p50/p99 latency and throughput."""
    if threads > 0:
        torch.set_num_threads(threads)
    rows = []
    model = model.eval().cpu()
    sessions = {name: ort_session(path, threads) for name, path in onnx_paths.items()}
    for batch in batch_sizes:
        reps = int(np.ceil(batch / len(images)))
        x = to_model_input(np.concatenate([images] * reps)[:batch] if reps > 1 else images[:batch])
        backends: dict[str, Callable[[], Any]] = {}

        def eager(x: torch.Tensor = x) -> Any:
            with torch.inference_mode():
                return model(x)

        backends["pytorch_eager"] = eager
        feed = {INPUT_NAME: x.numpy()}
        for name, session in sessions.items():
            backends[name] = lambda s=session, f=feed: s.run(None, f)
        for name, fn in backends.items():
            stats = summarize(time_call(fn, warmup=warmup, iterations=iterations), batch)
            rows.append(
                {
                    "backend": name,
                    "batch_size": batch,
                    **stats,
                    "threads": torch.get_num_threads()
                    if name == "pytorch_eager"
                    else (threads or torch.get_num_threads()),
                }
            )
    return rows

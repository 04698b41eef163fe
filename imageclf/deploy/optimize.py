"""Inference optimizations, each kept only when its measured effect is worth it.

* Batch-norm folding: at inference BN is an affine map, so it folds into the preceding conv's
  weights and bias, removing one memory pass per layer in PyTorch eager.
* ONNX Runtime INT8 static quantization (QDQ) with calibration images. On CPUs without VNNI or
  AVX-512 (like this project's CI machine), INT8 can be *slower* than FP32 for small CNNs, so the
  decision is measured, never assumed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imageclf.data.transforms import to_model_array, to_model_input
from imageclf.deploy.export import INPUT_NAME, ort_logits, ort_session
from imageclf.models.zoo import fold_batchnorm

# A time budget never cuts the timed calls below this many: fewer make a p50 of noise.
MIN_TIMED_CALLS = 5


def time_call(
    fn: Callable[[], Any],
    warmup: int = 3,
    iterations: int = 20,
    max_seconds: float = 0.0,
) -> list[float]:
    """Per-call latencies in milliseconds (after warm-up).

    ``max_seconds`` > 0 bounds the whole measurement, so a slow model (a big batch through an
    8-view graph takes seconds a call) costs seconds, not tens of minutes: the warm-up stops
    after a quarter of the budget (one call at least), the timed calls once the budget is spent
    and ``MIN_TIMED_CALLS`` have run."""
    started = time.perf_counter()
    for done in range(warmup):
        if done and max_seconds and time.perf_counter() - started >= max_seconds / 4:
            break
        fn()
    out: list[float] = []
    for _ in range(iterations):
        if (
            max_seconds
            and len(out) >= MIN_TIMED_CALLS
            and time.perf_counter() - started >= max_seconds
        ):
            break
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def accuracy(logits: np.ndarray | torch.Tensor, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == labels).mean())


def measure_fold(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 64
) -> tuple[nn.Module, dict[str, Any]]:
    """Fold BN and measure eager latency and accuracy before and after."""
    folded = fold_batchnorm(model)
    x = to_model_input(images[:batch])
    with torch.inference_mode():
        base_ms = float(np.median(time_call(lambda: model(x))))
        fold_ms = float(np.median(time_call(lambda: folded(x))))
        full = to_model_input(images)
        base_acc = accuracy(model(full), labels)
        fold_acc = accuracy(folded(full), labels)
        diff = float((model(x) - folded(x)).abs().max())
    return folded, {
        "eager_ms_batch64_before": base_ms,
        "eager_ms_batch64_after": fold_ms,
        "speedup": base_ms / max(fold_ms, 1e-9),
        "accuracy_before": base_acc,
        "accuracy_after": fold_acc,
        "max_abs_diff": diff,
    }


class _Calibration:
    """onnxruntime CalibrationDataReader over uint8 images (shared preprocessing)."""

    def __init__(self, images: np.ndarray, batch: int = 64) -> None:
        self._batches = iter(
            [to_model_array(images[i : i + batch]) for i in range(0, len(images), batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_static_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> Path:
    """QDQ static quantization (per-channel weights), the recommended path for CNNs."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8_path.with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_path),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return int8_path


def compare_onnx(
    fp32_path: Path, int8_path: Path, images: np.ndarray, labels: np.ndarray, batch: int = 64
) -> dict[str, Any]:
    """Accuracy and ORT latency (batch ``batch``) of the FP32 and INT8 models, same process."""
    fp32, int8 = ort_session(fp32_path), ort_session(int8_path)
    x = {INPUT_NAME: to_model_array(images[:batch])}
    fp32_ms = float(np.median(time_call(lambda: fp32.run(None, x), iterations=30)))
    int8_ms = float(np.median(time_call(lambda: int8.run(None, x), iterations=30)))
    return {
        "fp32_ms_batch64": fp32_ms,
        "int8_ms_batch64": int8_ms,
        "speedup": fp32_ms / max(int8_ms, 1e-9),
        "fp32_accuracy": accuracy(ort_logits(fp32, images), labels),
        "int8_accuracy": accuracy(ort_logits(int8, images), labels),
        "fp32_bytes": fp32_path.stat().st_size,
        "int8_bytes": int8_path.stat().st_size,
    }

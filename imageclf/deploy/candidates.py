"""Build every compression candidate the parameters ask for, gate and time each against the
unmodified model in one process, and keep (write) only those within the accuracy budget.

Numbers a person compares: accuracy drop (the gate), latency ratio to the baseline measured in
the same run (this machine's speed varies from run to run; a ratio does not), and size ratios
(the ``state_dict`` and its deflated bytes: unstructured zeros shrink only the latter).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imageclf.config import OptimizeParams, TrainParams
from imageclf.data.store import Split
from imageclf.data.transforms import to_model_input
from imageclf.deploy import compress
from imageclf.deploy.distill import distill, finetune
from imageclf.deploy.export import export_torchscript
from imageclf.errors import InvalidInput
from imageclf.models.checkpoint import ModelSpec, load_checkpoint

log = logging.getLogger(__name__)

BASELINE = "baseline"
UNSTRUCTURED = "prune_unstructured"
STRUCTURED = "prune_channels"
DYNAMIC = "quant_dynamic_linear"
STATIC = "quant_int8_fx"
DISTILLED = "distilled_student"
TEACHER = "distill_teacher"
TECHNIQUES = (UNSTRUCTURED, STRUCTURED, DYNAMIC, STATIC, DISTILLED)


def teacher_path(cfg: OptimizeParams, root: Path) -> Path | None:
    """The teacher checkpoint (relative paths are from the project root); None: no distillation.
    A path that is set but missing is an error before any work, not a silent skip."""
    if not cfg.distill_teacher:
        return None
    path = Path(cfg.distill_teacher)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise InvalidInput(
            f"optimize.distill_teacher {cfg.distill_teacher!r} is not a file: train a teacher "
            "with the long configuration and copy its models/model.pt there (docs/optimize.md, "
            '"Distillation"), or set it to "" to skip distillation.'
        )
    return path


def load_teacher(path: Path, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
    """The teacher, checked against the student's classes and input."""
    teacher, tspec, _ = load_checkpoint(path)
    same = (tspec.classes, tspec.in_channels, tspec.image_size) == (
        spec.classes,
        spec.in_channels,
        spec.image_size,
    )
    if not same:
        raise InvalidInput(
            f"teacher {path} was trained on other data (classes {list(tspec.classes)}, "
            f"{tspec.in_channels} channel(s), {tspec.image_size}px) than the model "
            f"(classes {list(spec.classes)}, {spec.in_channels} channel(s), "
            f"{spec.image_size}px): train the teacher on this dataset."
        )
    return teacher, tspec


@dataclass
class _Bench:
    """What the technique steps share: their inputs, and each candidate's record and model."""

    model: nn.Module
    spec: ModelSpec
    images: np.ndarray
    labels: np.ndarray
    train: Split
    cfg: OptimizeParams
    train_cfg: TrainParams
    eval_batch: int
    seed: int
    base_acc: float
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, nn.Module] = field(default_factory=dict)

    def acc(self, candidate: nn.Module) -> float:
        """Test accuracy: one spelling, so every candidate is scored like the baseline."""
        return compress.accuracy_of(candidate, self.images, self.labels, self.eval_batch)

    def tune(self, steps: int, lr: float) -> Callable[[nn.Module], Any] | None:
        """A fine-tune on the training split for a technique to apply; None when steps is 0."""
        if steps == 0:
            return None
        return lambda m: finetune(m, self.train, steps, lr, self.train_cfg.batch_size, self.seed)

    def add(self, name: str, candidate: nn.Module, seconds: float, **facts: Any) -> None:
        """Keep a built candidate for timing, and record its gate, build time and sizes."""
        self.models[name] = candidate
        self.records[name] = {
            **compress.gate(self.base_acc, self.acc(candidate), self.cfg.max_accuracy_drop),
            "build_seconds": round(seconds, 2),
            **compress.size_report(candidate),
            **facts,
        }

    def skip(self, name: str, reason: str) -> None:
        """Record a technique that is off or cannot apply, so the report says why it is absent."""
        self.records[name] = {"kept": False, "skipped": True, "reason": reason}


def _prune_unstructured(bench: _Bench) -> None:
    """Zero the smallest weights (then fine-tune): only the deflated file shrinks."""
    cfg = bench.cfg
    if cfg.prune_sparsity > 0:
        t0 = time.perf_counter()
        pruned = compress.prune_unstructured(
            bench.model, cfg.prune_sparsity, bench.tune(cfg.finetune_steps, cfg.finetune_lr)
        )
        bench.add(
            UNSTRUCTURED,
            pruned,
            time.perf_counter() - t0,
            requested_sparsity=cfg.prune_sparsity,
            sparsity=round(compress.weight_sparsity(pruned), 6),
            finetune_steps=cfg.finetune_steps,
            note="dense tensors: the state_dict and the latency do not shrink, the deflated "
            "file does",
        )
    else:
        bench.skip(UNSTRUCTURED, "off (optimize.prune_sparsity: 0)")


def _prune_channels(bench: _Bench) -> None:
    """Remove whole conv channels (then fine-tune): the technique that can cut latency."""
    cfg = bench.cfg
    if cfg.channel_prune_ratio > 0:
        t0 = time.perf_counter()
        slim, facts = compress.prune_channels(bench.model, cfg.channel_prune_ratio)
        if facts["prunable_convs"] == 0:
            bench.skip(STRUCTURED, f"{bench.spec.name}: no conv whose channels can be removed")
        else:
            fit = bench.tune(cfg.finetune_steps, cfg.finetune_lr)
            if fit is not None:
                fit(slim)
            bench.add(
                STRUCTURED,
                slim,
                time.perf_counter() - t0,
                ratio=cfg.channel_prune_ratio,
                finetune_steps=cfg.finetune_steps,
                **facts,
                note="channels physically removed (prune.ln_structured would only mask them "
                "and change no latency); residual-tied channels are kept",
            )
    else:
        bench.skip(STRUCTURED, "off (optimize.channel_prune_ratio: 0)")


def _quantize_dynamic(bench: _Bench) -> None:
    """INT8 Linear layers with activations quantized on the fly: no calibration needed."""
    if bench.cfg.dynamic_quantization:
        t0 = time.perf_counter()
        dq = compress.quantize_dynamic_linear(bench.model)
        quantized = sum(compress.is_dynamic_quantized(m) for m in dq.modules())
        bench.add(
            DYNAMIC,
            dq,
            time.perf_counter() - t0,
            api="torch.ao.quantization.quantize_dynamic (deprecated in torch 2.14, works)",
            quantized_linear_layers=quantized,
        )
    else:
        bench.skip(DYNAMIC, "off (optimize.dynamic_quantization: false)")


def _quantize_static(bench: _Bench, calibration: np.ndarray, batch: int) -> None:
    """Whole-graph INT8 (FX), calibrated or QAT; a model FX cannot trace is skipped, not fatal."""
    cfg = bench.cfg
    if not cfg.static_int8:
        bench.skip(STATIC, "off (optimize.static_int8: false)")
        return
    example = to_model_input(calibration[:batch])

    def calibrate(observed: nn.Module) -> None:
        with torch.inference_mode():
            for start in range(0, len(calibration), batch):
                observed(to_model_input(calibration[start : start + batch]))

    t0 = time.perf_counter()
    try:
        q = compress.quantize_static_fx(
            bench.model, example, calibrate, bench.tune(cfg.qat_steps, cfg.qat_lr)
        )
    except (RuntimeError, TypeError, NotImplementedError, torch.fx.proxy.TraceError) as err:
        bench.skip(STATIC, f"{bench.spec.name} does not quantize with FX graph mode: {err}")
    else:
        bench.add(
            STATIC,
            q,
            time.perf_counter() - t0,
            mode="qat" if cfg.qat_steps else "post-training (calibrated)",
            qat_steps=cfg.qat_steps,
            int8_kernels=compress.is_int8_graph(q),
            api="torch.ao.quantization.quantize_fx, x86 engine (PT2E moved to torchao)",
        )


def _distill_student(bench: _Bench, teacher: tuple[nn.Module, ModelSpec] | None) -> None:
    """A fresh model trained to imitate the teacher (kept too: its latency is timed as well)."""
    if teacher is None:
        bench.skip(
            DISTILLED,
            'off (optimize.distill_teacher: ""; docs/optimize.md, "Distillation", makes one)',
        )
        return
    cfg, seed = bench.cfg, bench.seed
    teacher_model, tspec = teacher
    torch.manual_seed(seed)
    student = bench.spec.build()  # a fresh model of the default configuration's architecture
    t0 = time.perf_counter()
    history = distill(
        student,
        teacher_model,
        bench.train,
        bench.train_cfg,
        cfg.distill_epochs,
        cfg.distill_temperature,
        cfg.distill_alpha,
        seed,
    )
    teacher_acc = bench.acc(teacher_model)
    bench.models[TEACHER] = teacher_model
    bench.add(
        DISTILLED,
        student.eval(),
        time.perf_counter() - t0,
        teacher=f"{tspec.name} width {tspec.width}",
        teacher_accuracy=teacher_acc,
        teacher_bytes=compress.size_report(teacher_model)["state_dict_bytes"],
        epochs=cfg.distill_epochs,
        temperature=cfg.distill_temperature,
        alpha=cfg.distill_alpha,
        **history,
    )


def _time_against_baseline(bench: _Bench, batch: int) -> dict[str, Any]:
    """Latency and size ratios to the baseline, timed together; returns the baseline's record."""
    x = to_model_input(bench.images[:batch])
    latency = compress.interleaved_latency(
        {BASELINE: bench.model, **bench.models},
        x,
        warmup=3,
        iterations=bench.cfg.latency_iterations,
    )
    baseline = {
        "accuracy": bench.base_acc,
        "latency_ms": latency[BASELINE],
        **compress.size_report(bench.model),
    }
    for name, record in bench.records.items():
        if name not in bench.models:
            continue
        record["latency_ms"] = latency[name]
        record["speedup"] = latency[BASELINE] / max(latency[name], 1e-9)
        record["state_dict_ratio"] = record["state_dict_bytes"] / baseline["state_dict_bytes"]
        record["deflated_ratio"] = record["deflated_bytes"] / baseline["deflated_bytes"]
    if TEACHER in latency:
        bench.records[DISTILLED]["teacher_latency_ms"] = latency[TEACHER]
    return baseline


def compress_candidates(
    model: nn.Module,
    spec: ModelSpec,
    *,
    test: tuple[np.ndarray, np.ndarray],
    train: Split,
    calibration: np.ndarray,
    cfg: OptimizeParams,
    train_cfg: TrainParams,
    eval_batch: int,
    seed: int,
    out_dir: Path,
    teacher: tuple[nn.Module, ModelSpec] | None,
) -> dict[str, Any]:
    """Every enabled technique as one record (accuracy, gate, latency, size) plus the baseline.

    ``model`` is the unmodified trained model (BN not folded); ``test`` the evaluation images and
    labels; ``train`` feeds fine-tuning, QAT and distillation; ``calibration`` (training images)
    sets static INT8 activation ranges; ``teacher`` (from :func:`load_teacher`) enables
    distillation; ``eval_batch`` is the batch for accuracy passes (large:
    per image, batch 500 costs a quarter of batch 64 on this CPU)."""
    images, labels = test
    batch = cfg.latency_batch_size
    base_acc = compress.accuracy_of(model, images, labels, eval_batch)
    bench = _Bench(model, spec, images, labels, train, cfg, train_cfg, eval_batch, seed, base_acc)
    _prune_unstructured(bench)
    _prune_channels(bench)
    _quantize_dynamic(bench)
    _quantize_static(bench, calibration, batch)
    _distill_student(bench, teacher)
    baseline = _time_against_baseline(bench, batch)
    records = bench.records
    write_kept(records, bench.models, out_dir, (spec.in_channels, spec.image_size, spec.image_size))
    return {
        "baseline": baseline,
        "latency_batch_size": batch,
        "candidates": records,
        "kept": [name for name, r in records.items() if r["kept"]],
    }


def write_kept(
    records: dict[str, dict[str, Any]],
    models: dict[str, nn.Module],
    out_dir: Path,
    input_shape: tuple[int, int, int],
) -> None:
    """Kept candidates as TorchScript (loads without this code, quantized ones included);
    a file from an earlier run whose candidate is not kept now is removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TECHNIQUES:
        path = out_dir / f"{name}.pt"
        record = records.get(name, {})
        if record.get("kept"):
            with warnings.catch_warnings():  # quantized graphs' scales are constants anyway
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                export_torchscript(models[name], path, input_shape)
            record["file"] = f"{out_dir.name}/{path.name}"
            record["file_bytes"] = path.stat().st_size
        else:
            path.unlink(missing_ok=True)

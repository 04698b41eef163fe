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

    def acc(candidate: nn.Module) -> float:
        return compress.accuracy_of(candidate, images, labels, eval_batch)

    base_acc = acc(model)
    records: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}

    def tune(steps: int, lr: float):
        if steps == 0:
            return None
        return lambda m: finetune(m, train, steps, lr, train_cfg.batch_size, seed)

    def add(name: str, candidate: nn.Module, seconds: float, **facts: Any) -> None:
        models[name] = candidate
        records[name] = {
            **compress.gate(base_acc, acc(candidate), cfg.max_accuracy_drop),
            "build_seconds": round(seconds, 2),
            **compress.size_report(candidate),
            **facts,
        }

    def skip(name: str, reason: str) -> None:
        records[name] = {"kept": False, "skipped": True, "reason": reason}

    if cfg.prune_sparsity > 0:
        t0 = time.perf_counter()
        pruned = compress.prune_unstructured(
            model, cfg.prune_sparsity, tune(cfg.finetune_steps, cfg.finetune_lr)
        )
        add(
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
        skip(UNSTRUCTURED, "off (optimize.prune_sparsity: 0)")

    if cfg.channel_prune_ratio > 0:
        t0 = time.perf_counter()
        slim, facts = compress.prune_channels(model, cfg.channel_prune_ratio)
        if facts["prunable_convs"] == 0:
            skip(STRUCTURED, f"{spec.name}: no conv whose channels can be removed")
        else:
            fit = tune(cfg.finetune_steps, cfg.finetune_lr)
            if fit is not None:
                fit(slim)
            add(
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
        skip(STRUCTURED, "off (optimize.channel_prune_ratio: 0)")

    if cfg.dynamic_quantization:
        t0 = time.perf_counter()
        dq = compress.quantize_dynamic_linear(model)
        quantized = sum(compress.is_dynamic_quantized(m) for m in dq.modules())
        add(
            DYNAMIC,
            dq,
            time.perf_counter() - t0,
            api="torch.ao.quantization.quantize_dynamic (deprecated in torch 2.14, works)",
            quantized_linear_layers=quantized,
        )
    else:
        skip(DYNAMIC, "off (optimize.dynamic_quantization: false)")

    if cfg.static_int8:
        example = to_model_input(calibration[:batch])

        def calibrate(observed: nn.Module) -> None:
            with torch.inference_mode():
                for start in range(0, len(calibration), batch):
                    observed(to_model_input(calibration[start : start + batch]))

        t0 = time.perf_counter()
        try:
            q = compress.quantize_static_fx(
                model, example, calibrate, tune(cfg.qat_steps, cfg.qat_lr)
            )
        except (RuntimeError, TypeError, NotImplementedError, torch.fx.proxy.TraceError) as err:
            skip(STATIC, f"{spec.name} does not quantize with FX graph mode: {err}")
        else:
            add(
                STATIC,
                q,
                time.perf_counter() - t0,
                mode="qat" if cfg.qat_steps else "post-training (calibrated)",
                qat_steps=cfg.qat_steps,
                int8_kernels=compress.is_int8_graph(q),
                api="torch.ao.quantization.quantize_fx, x86 engine (PT2E moved to torchao)",
            )
    else:
        skip(STATIC, "off (optimize.static_int8: false)")

    if teacher is not None:
        teacher_model, tspec = teacher
        torch.manual_seed(seed)
        student = spec.build()  # a fresh model of the default configuration's architecture
        t0 = time.perf_counter()
        history = distill(
            student,
            teacher_model,
            train,
            train_cfg,
            cfg.distill_epochs,
            cfg.distill_temperature,
            cfg.distill_alpha,
            seed,
        )
        teacher_acc = acc(teacher_model)
        models[TEACHER] = teacher_model
        add(
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
    else:
        skip(
            DISTILLED,
            'off (optimize.distill_teacher: ""; docs/optimize.md, "Distillation", makes one)',
        )

    x = to_model_input(images[:batch])
    latency = compress.interleaved_latency(
        {BASELINE: model, **models}, x, warmup=3, iterations=cfg.latency_iterations
    )
    baseline = {
        "accuracy": base_acc,
        "latency_ms": latency[BASELINE],
        **compress.size_report(model),
    }
    for name, record in records.items():
        if name not in models:
            continue
        record["latency_ms"] = latency[name]
        record["speedup"] = latency[BASELINE] / max(latency[name], 1e-9)
        record["state_dict_ratio"] = record["state_dict_bytes"] / baseline["state_dict_bytes"]
        record["deflated_ratio"] = record["deflated_bytes"] / baseline["deflated_bytes"]
    if TEACHER in latency:
        records[DISTILLED]["teacher_latency_ms"] = latency[TEACHER]
    write_kept(records, models, out_dir, (spec.in_channels, spec.image_size, spec.image_size))
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

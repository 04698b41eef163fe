"""Stage optimize: batch-norm folding and INT8 static quantization for the served model, and the
compression candidates of course module 7.1 (pruning, PyTorch quantization, distillation), each
kept only if it pays."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from imageclf.config import Params
from imageclf.data.store import load_dataset, stratified_fraction
from imageclf.deploy.candidates import compress_candidates, load_teacher, teacher_path
from imageclf.deploy.export import export_onnx
from imageclf.deploy.optimize import compare_onnx, measure_fold, quantize_static_int8
from imageclf.io import read_json, write_json
from imageclf.models.checkpoint import load_checkpoint, save_checkpoint
from imageclf.models.zoo import ServingGraph
from imageclf.paths import ProjectPaths
from imageclf.stage import main
from imageclf.tracking import flatten, log_to_run
from imageclf.training.engine import set_threads

# Where the optimize numbers live among the training run's MLflow metrics.
OPT_PREFIX = "optimize."


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Write models/model.optimized.pt, models/model.int8.onnx, the kept candidates under
    models/compressed/ and reports/optimize.json."""
    set_threads(params.train.threads)
    cfg = params.optimize
    teacher_file = teacher_path(cfg, paths.root)
    dataset = load_dataset(paths.dataset)
    model, spec, extra = load_checkpoint(paths.checkpoint)
    # A wrong teacher fails here, before any output is written.
    teacher = load_teacher(teacher_file, spec) if teacher_file else None
    test = dataset.test
    n_eval = min(cfg.eval_images, len(test))
    images, labels = test.images[:n_eval], test.labels[:n_eval]

    folded, fold = measure_fold(model, images, labels)
    fold["kept"] = fold["accuracy_before"] - fold["accuracy_after"] <= cfg.max_accuracy_drop
    save_checkpoint(
        paths.optimized_checkpoint,
        folded if fold["kept"] else model,
        replace(spec, bn_folded=bool(fold["kept"])),
        extra=extra,
    )

    # Calibrate on training images (never on the test images we judge accuracy with).
    calib_idx = stratified_fraction(
        dataset.train.labels, min(1.0, cfg.calibration_images / len(dataset.train)), params.seed
    )[: cfg.calibration_images]
    serving = ServingGraph(folded, params.tta_views).eval()  # the graph export serves
    fp32_path = paths.models / ".optimize-fp32.onnx"
    int8_path = paths.onnx_int8
    try:
        export_onnx(serving, fp32_path, dataset.image_shape, params.export.opset)
        quantize_static_int8(fp32_path, int8_path, dataset.train.images[calib_idx])
        quant = compare_onnx(fp32_path, int8_path, images, labels)
    finally:
        fp32_path.unlink(missing_ok=True)
    drop = quant["fp32_accuracy"] - quant["int8_accuracy"]
    quant["accuracy_drop"] = drop
    quant["kept"] = bool(drop <= cfg.max_accuracy_drop and quant["speedup"] > 1.0)
    quant["reason"] = (
        "kept: accuracy within tolerance and faster"
        if quant["kept"]
        else f"rejected: accuracy drop {drop:.4f} exceeds {cfg.max_accuracy_drop}"
        if drop > cfg.max_accuracy_drop
        else f"rejected: INT8 is not faster on this CPU (speedup {quant['speedup']:.2f}x)"
    )
    report = {
        "eval_images": n_eval,
        "calibration_images": len(calib_idx),
        "bn_fold": fold,
        "int8_static": quant,
        "fold_kept": bool(fold["kept"]),
        "int8_kept": quant["kept"],
        "int8_speedup": float(quant["speedup"]),
        "int8_accuracy_drop": float(np.round(drop, 6)),
    }
    report["compression"] = compress_candidates(
        model,
        spec,
        test=(images, labels),
        train=dataset.train,
        calibration=dataset.train.images[calib_idx],
        cfg=cfg,
        train_cfg=params.train,
        eval_batch=params.evaluate.batch_size,
        seed=params.seed,
        out_dir=paths.compressed_models,
        teacher=teacher,
    )
    write_json(paths.optimize_report, report)
    train_info = read_json(paths.train_report) if paths.train_report.is_file() else {}
    log_to_run(paths, train_info.get("mlflow_run_id"), flatten("", report), prefix=OPT_PREFIX)
    return report


if __name__ == "__main__":
    main(run)

"""Stage optimize: batch-norm folding and INT8 static quantization, each kept only if it pays."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from imageclf.config import Params
from imageclf.data.store import load_dataset, stratified_fraction
from imageclf.deploy.export import export_onnx
from imageclf.deploy.optimize import compare_onnx, measure_fold, quantize_static_int8
from imageclf.io import write_json
from imageclf.models.checkpoint import load_checkpoint, save_checkpoint
from imageclf.models.zoo import ServingGraph
from imageclf.paths import ProjectPaths
from imageclf.stage import main
from imageclf.training.engine import set_threads


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Write models/model.optimized.pt, models/model.int8.onnx and reports/optimize.json."""
    set_threads(params.train.threads)
    cfg = params.optimize
    dataset = load_dataset(paths.dataset)
    model, spec, extra = load_checkpoint(paths.checkpoint)
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
    serving = ServingGraph(folded, params.tta_flip).eval()  # the graph export serves
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
    write_json(paths.optimize_report, report)
    return report


if __name__ == "__main__":
    main(run)

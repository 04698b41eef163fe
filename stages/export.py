"""Stage export: ONNX with a dynamic batch axis, verified against PyTorch on real test images."""

from __future__ import annotations

import json
from typing import Any

from imageclf.checkpoint import load_serving_model
from imageclf.config import Params
from imageclf.data.store import load_dataset
from imageclf.export import export_onnx, verify_onnx
from imageclf.io import atomic_path, write_json
from imageclf.paths import ProjectPaths
from imageclf.stage import StageError, main


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Export models/model.optimized.pt to models/model.onnx; fail when outside tolerances."""
    cfg = params.export
    dataset = load_dataset(paths.dataset)
    serving, spec, source = load_serving_model(paths, params.evaluate.tta_flip)
    images = dataset.test.images[: cfg.compare_images]
    # Export to a temporary file first: a model that fails verification never replaces a good one.
    with atomic_path(paths.onnx, suffix=".onnx") as tmp:
        c, h, w = dataset.image_shape
        # The served model carries what a client needs to use it: no side files to lose.
        metadata = {
            "classes": json.dumps(list(spec.classes)),
            "input": json.dumps(
                {
                    "name": "images",
                    "layout": "NCHW",
                    "dtype": "float32",
                    "range": [0, 1],
                    "channels": c,
                    "height": h,
                    "width": w,
                }
            ),
            "output": "log_probs" if params.evaluate.tta_flip else "logits",
            "model": spec.name,
            "tta_flip": json.dumps(params.evaluate.tta_flip),
        }
        export_onnx(serving, tmp, dataset.image_shape, cfg.opset, metadata=metadata)
        check = verify_onnx(tmp, serving, images)
        problems = []
        if check["max_abs_diff"] > cfg.max_abs_diff:
            problems.append(
                f"max |ONNX - PyTorch| = {check['max_abs_diff']:.3g} exceeds "
                f"export.max_abs_diff {cfg.max_abs_diff}"
            )
        if check["argmax_agreement"] < cfg.min_argmax_agreement:
            problems.append(
                f"argmax agreement {check['argmax_agreement']:.4f} is below "
                f"export.min_argmax_agreement {cfg.min_argmax_agreement}"
            )
        if not check["dynamic_batch"]:
            problems.append(
                f"the batch axis was fixed to {check['input_shape'][0]} instead of staying dynamic"
            )
        if problems:
            raise StageError(
                "the ONNX export does not match PyTorch: "
                + "; ".join(problems)
                + f" (on {len(images)} test images). models/model.onnx was not "
                "replaced; check for ops ONNX Runtime computes differently."
            )
    report = {
        **check,
        "opset": cfg.opset,
        "source_checkpoint": source.name,
        "tta_flip": params.evaluate.tta_flip,
        "classes": list(spec.classes),
    }
    write_json(paths.reports / "export.json", report)
    return report


if __name__ == "__main__":
    main(run)

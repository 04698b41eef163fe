"""Stage export: ONNX with a dynamic batch axis (what is served) and TorchScript (for LibTorch),
both verified against PyTorch on real test images before either replaces the previous one."""

from __future__ import annotations

import json
from contextlib import ExitStack
from typing import Any

from imageclf.config import Params
from imageclf.data.store import load_dataset
from imageclf.deploy.export import export_onnx, export_torchscript, verify_onnx, verify_torchscript
from imageclf.errors import StageError
from imageclf.io import atomic_path, write_json
from imageclf.models.checkpoint import load_serving_model
from imageclf.paths import ProjectPaths
from imageclf.stage import main


def tolerance_problems(
    kind: str, check: dict[str, Any], max_abs_diff: float, min_agreement: float
) -> list[str]:
    """What about an export's agreement with PyTorch is outside the tolerances, in words."""
    problems = []
    if check["max_abs_diff"] > max_abs_diff:
        problems.append(
            f"max |{kind} - PyTorch| = {check['max_abs_diff']:.3g} exceeds "
            f"export.max_abs_diff {max_abs_diff}"
        )
    if check["argmax_agreement"] < min_agreement:
        problems.append(
            f"{kind} argmax agreement {check['argmax_agreement']:.4f} is below "
            f"export.min_argmax_agreement {min_agreement}"
        )
    return problems


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Export models/model.optimized.pt to models/model.onnx; fail when outside tolerances."""
    cfg = params.export
    dataset = load_dataset(paths.dataset)
    serving, spec, source = load_serving_model(paths, params.tta_views)
    images = dataset.test.images[: cfg.compare_images]
    # Export to temporary files first: a model that fails verification never replaces a good one.
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(paths.onnx, suffix=".onnx"))
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
                    # imageclf.data.transforms.prepare_image: how any image becomes this input
                    "resize": "shorter side to height, centre crop",
                }
            ),
            "output": "log_probs" if params.tta_flip else "logits",
            "model": spec.name,
            "tta_flip": json.dumps(params.tta_flip),
            "tta_views": str(params.tta_views),
        }
        export_onnx(serving, tmp, dataset.image_shape, cfg.opset, metadata=metadata)
        check = verify_onnx(tmp, serving, images)
        problems = tolerance_problems("ONNX", check, cfg.max_abs_diff, cfg.min_argmax_agreement)
        if not check["dynamic_batch"]:
            problems.append(
                f"the batch axis was fixed to {check['input_shape'][0]} instead of staying dynamic"
            )
        ts_tmp = stack.enter_context(atomic_path(paths.torchscript, suffix=".pt"))
        export_torchscript(serving, ts_tmp, dataset.image_shape)
        scripted = verify_torchscript(ts_tmp, serving, images)
        problems += tolerance_problems(
            "TorchScript", scripted, cfg.max_abs_diff, cfg.min_argmax_agreement
        )
        if not scripted["batch_1_matches"]:
            problems.append("TorchScript gives other outputs at batch size 1 than traced")
        if problems:
            raise StageError(
                "the export does not match PyTorch: "
                + "; ".join(problems)
                + f" (on {len(images)} test images). Neither models/model.onnx nor "
                "models/model.torchscript.pt was replaced; check for ops the runtime computes "
                "differently."
            )
    report = {
        **check,
        "opset": cfg.opset,
        "source_checkpoint": source.name,
        "tta_flip": params.tta_flip,
        "tta_views": params.tta_views,
        "classes": list(spec.classes),
        "torchscript": scripted,
    }
    write_json(paths.export_report, report)
    return report


if __name__ == "__main__":
    main(run)

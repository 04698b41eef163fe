"""Stage reference: the training-data summaries that monitoring compares production with, and
the few test images the web page offers as examples (both are registered with the model)."""

from __future__ import annotations

from typing import Any

import numpy as np

from imageclf.config import Params
from imageclf.data.store import load_dataset
from imageclf.deploy.inference import OnnxClassifier, pick_examples, save_examples
from imageclf.io import write_json
from imageclf.paths import ProjectPaths
from imageclf.stage import main
from monitoring.reference import build_reference, save_reference


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Write models/reference.npz from models/model.onnx over a sample of the training split."""
    dataset = load_dataset(paths.dataset)
    model = OnnxClassifier(paths.onnx)
    reference = build_reference(model, dataset.train, params.monitoring.reference_size, params.seed)
    save_reference(reference, paths.reference)
    test = dataset.test
    shown = pick_examples(test.labels, params.serving.examples, params.seed)
    save_examples(paths.examples, test.images[shown], test.labels[shown], model.classes)
    counts = np.bincount(reference["predicted"], minlength=len(model.classes))
    summary = {
        "images": len(reference["predicted"]),
        "examples": len(shown),
        "embedding_dim": int(reference["embeddings"].shape[1]),
        "mean_confidence": float(reference["confidence"].mean()),
        "train_accuracy_on_sample": float((reference["predicted"] == reference["labels"]).mean()),
        "predicted_share": {
            c: round(float(n / counts.sum()), 4) for c, n in zip(model.classes, counts, strict=True)
        },
    }
    write_json(paths.reference_report, summary)
    return summary


if __name__ == "__main__":
    main(run)

"""The reference the monitoring compares production with: the same summaries the service logs,
computed over a stratified sample of the training data through the exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from imageclf.data.store import Split, stratified_fraction
from imageclf.deploy.inference import OnnxClassifier
from monitoring.features import pixel_features


def build_reference(model: OnnxClassifier, train: Split, size: int, seed: int) -> dict[str, Any]:
    """pixels, embeddings, predicted and confidence for ``size`` training images."""
    index = stratified_fraction(train.labels, min(1.0, size / len(train)), seed)[:size]
    images = train.images[index]
    probs, embeddings = [], []
    for start in range(0, len(images), 512):
        p, e = model.predict(images[start : start + 512])
        probs.append(p)
        if e is None:
            raise ValueError("the exported model has no embedding output: rerun the export stage")
        embeddings.append(e)
    prob = np.concatenate(probs)
    return {
        "pixels": pixel_features(images),
        "embeddings": np.concatenate(embeddings),
        "predicted": prob.argmax(1),
        "confidence": prob.max(1),
        "labels": train.labels[index],
    }


def save_reference(reference: dict[str, Any], path: Path) -> None:
    from imageclf.io import write_with

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez(handle, **reference)

    write_with(path, write, suffix=".npz")


def load_reference(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"No monitoring reference at {path}: run `dvc repro reference`.")
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}

"""The compact input summary logged per prediction and computed over the training data.

NumPy only: the service computes it on the request path.
"""

from __future__ import annotations

import numpy as np

PIXEL_FEATURES = ("mean", "std", "min", "max", "p10", "p90", "dark_fraction")


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Per-image statistics of uint8 (N, H, W, C) images -> (N, 7) float32, in [0, 1]."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return np.stack(
        [
            flat.mean(1),
            flat.std(1),
            flat.min(1),
            flat.max(1),
            np.percentile(flat, 10, axis=1),
            np.percentile(flat, 90, axis=1),
            (flat < 0.05).mean(1),
        ],
        axis=1,
    ).astype(np.float32)

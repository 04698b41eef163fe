"""Seeding every random number generator a run draws from, in one call.

A base module (it imports only the standard library, NumPy and torch): the training loop, the
loader check, the profiler and the benchmarks all seed the same way without importing each other.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a generator for augmentation randomness."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)

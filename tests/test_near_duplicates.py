"""The near-duplicate rule on real images: different solar cells stay apart, copies are found.

ELPV (the ``elpv-dataset`` package) is the hard case: cells of one module share the layout, the
busbars and even process marks, so the old rule (pHash + 16x16 thumbnails) called hundreds of
different cells "the same image". Measurements of the whole set: ``benchmarks/near_duplicates.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.near_duplicates import TRANSFORMS, elpv_images, measure
from imageclf.data.quality import near_duplicate_pairs

pytest.importorskip("elpv_dataset")


@pytest.fixture(scope="module")
def cells() -> list:
    # Every 8th cell: 328 cells from every module type, neighbours of one module included.
    return elpv_images(step=8)


@pytest.fixture(scope="module")
def measured(cells: list) -> tuple[np.ndarray, np.ndarray]:
    hashes, thumbs, _ = measure(cells)
    return hashes, thumbs


def test_different_solar_cells_are_never_near_duplicates(measured: tuple) -> None:
    hashes, thumbs = measured
    pairs = near_duplicate_pairs(hashes, thumbs)
    assert len(pairs) == 0, f"{len(pairs)} pairs of different cells flagged: {pairs[:5].tolist()}"


def test_consecutive_cells_of_one_module_are_not_near_duplicates() -> None:
    # Cells 1546-1554 carry the same two process marks at the same places: the closest
    # different images in ELPV (thumbnail correlation up to 0.998); 2368-2370 are poly cells
    # of one ingot whose grain is the same (0.998 aligned and blurred, labels 0.67 and 0).
    cells = elpv_images(start=1545, stop=1554) + elpv_images(start=2367, stop=2370)
    hashes, thumbs, _ = measure(cells)
    assert near_duplicate_pairs(hashes, thumbs).tolist() == []


@pytest.mark.parametrize(
    "transform",
    [
        "jpeg q50",
        "half size",
        "crop 5% left",
        "crop 5% top",
        "brightness +10%",
        "brightness -10%",
        "saved as PNG",
    ],
)
def test_planted_copies_are_found(cells: list, measured: tuple, transform: str) -> None:
    sample = cells[::4]
    hashes, thumbs = measured
    c_hashes, c_thumbs, _ = measure([TRANSFORMS[transform](im) for im in sample])
    n = len(sample)
    pairs = near_duplicate_pairs(
        np.concatenate([hashes[::4], c_hashes]), np.concatenate([thumbs[::4], c_thumbs])
    )
    found = {tuple(p) for p in pairs.tolist()}
    recall = sum((i, n + i) in found for i in range(n)) / n
    assert recall >= 0.95, f"{transform}: {recall:.0%} of {n} copies found"
    assert all(j - i == n for i, j in found), "a copy was matched to another cell"

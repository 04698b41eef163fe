"""ELPV: real electroluminescence images of solar cells, read offline from an installed wheel.

The PyPI package ``elpv-dataset`` (Deitsch et al., Solar Energy 2019; data licence CC BY-NC-SA
4.0) ships 2,624 cells of 300×300 8-bit grey PNG in ``elpv_dataset/data/images/`` and
``elpv_dataset/data/labels.csv``: one line per image with its path, the probability that the
cell is defective as judged by experts (0, 1/3, 2/3 or 1) and the cell type (mono or poly).

It is the project's built-in real dataset (``data.name: elpv``): images nobody here made, with
published numbers to compare against (``docs/elpv.md``). Two tasks over the same images:

* ``4class``: the four defect probabilities as classes (57 / 11 / 4 / 27 % of the images);
* ``binary``: defective when the probability is at least 0.5 (the papers' functional/defective).

There is no official split; the literature uses a 75/25 split stratified by defect probability
and cell type, so this module draws one, seeded (``data.test_fraction``, ``seed``). The files go
through the same scan as any ImageFolder (:mod:`imageclf.data.scan`), so the quality gate and its
report treat them like a user's folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

# Defect probabilities as recorded in labels.csv (to 3 decimals) and the class names per task.
LEVELS = (0.0, 0.333, 0.667, 1.0)
CLASSES = {
    "4class": ["defect_000", "defect_033", "defect_067", "defect_100"],
    "binary": ["functional", "defective"],
}
PACKAGE = "elpv-dataset"


def data_root() -> Path:
    """The installed package's data folder (labels.csv, images/), found without importing it."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"data.name is elpv but the Python package {PACKAGE!r} is not installed: "
            f"`pip install {PACKAGE}` (a 91 MB wheel that holds the images), or `make setup`."
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (root / "labels.csv").is_file():
        raise FileNotFoundError(f"{root}/labels.csv is missing: reinstall {PACKAGE}.")
    return root


def read_labels(root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(relative image paths, defect probabilities, cell types) from ``labels.csv``."""
    paths, probs, types = [], [], []
    for n, line in enumerate((root / "labels.csv").read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"{root}/labels.csv line {n}: expected 3 fields, got {line!r}")
        paths.append(parts[0])
        probs.append(float(parts[1]))
        types.append(parts[2])
    return paths, np.asarray(probs), types


def labels_for(probs: np.ndarray, task: str) -> np.ndarray:
    """Class index of each image for ``task`` (see :data:`CLASSES`)."""
    if task == "binary":
        return (probs >= 0.5).astype(np.int64)
    level = np.abs(probs[:, None] - np.asarray(LEVELS)[None, :]).argmin(axis=1)
    return level.astype(np.int64)


def stratified_split(strata: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of test images: ``test_fraction`` of each stratum, seeded.

    The test split holds ``round(N * test_fraction)`` images in all (656 of ELPV's 2,624, the
    literature's count): each stratum gets its share rounded down, and the images left over go
    to the strata with the largest remainders.
    """
    rng = np.random.default_rng(seed)
    values, sizes = np.unique(strata, return_counts=True)
    ideal = sizes * test_fraction
    quota = np.floor(ideal).astype(int)
    left = round(len(strata) * test_fraction) - int(quota.sum())
    quota[np.argsort(-(ideal - quota), kind="stable")[:left]] += 1
    test = np.zeros(len(strata), dtype=bool)
    for value, k in zip(values, quota, strict=True):
        members = rng.permutation(np.flatnonzero(strata == value))
        test[members[:k]] = True
    return test


def listing(
    task: str, test_fraction: float, seed: int, root: Path | None = None
) -> tuple[Path, list[str], dict[str, list[tuple[Path, int]]]]:
    """(data folder, class names, each split's (file, label) list) for the ELPV ``task``.

    The split is stratified by defect probability and cell type (as in the literature) and is
    the same for both tasks with the same seed, so their results compare image for image.
    """
    root = root or data_root()
    paths, probs, types = read_labels(root)
    labels = labels_for(probs, task)
    levels = labels_for(probs, "4class")
    strata = np.asarray([f"{lv}-{t}" for lv, t in zip(levels, types, strict=True)])
    test = stratified_split(strata, test_fraction, seed)
    files: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for path, label, is_test in zip(paths, labels, test, strict=True):
        files["test" if is_test else "train"].append((root / path, int(label)))
    return root, CLASSES[task], files

"""ELPV, the built-in real dataset: the split the literature uses, both tasks, read offline."""

from __future__ import annotations

import numpy as np
import pytest

from imageclf.data import elpv


@pytest.fixture(scope="module")
def labels() -> tuple[list[str], np.ndarray, list[str]]:
    return elpv.read_labels(elpv.data_root())


def test_the_wheel_holds_the_published_counts(labels):
    paths, probs, types = labels
    assert len(paths) == 2624 and all((elpv.data_root() / p).is_file() for p in paths[:20])
    assert np.bincount(elpv.labels_for(probs, "4class")).tolist() == [1508, 295, 106, 715]
    assert np.bincount(elpv.labels_for(probs, "binary")).tolist() == [1508 + 295, 106 + 715]
    assert sorted(set(types)) == ["mono", "poly"]


def test_split_is_the_literatures_75_25_stratified_by_defect_and_cell_type(labels):
    paths, probs, types = labels
    root, classes, files = elpv.listing("4class", 0.25, seed=42)
    assert classes == elpv.CLASSES["4class"]
    assert (len(files["train"]), len(files["test"])) == (1968, 656)
    # Every stratum (defect level x cell type) is held out at 25%, to within one image.
    levels = elpv.labels_for(probs, "4class")
    by_path = {p: (lv, t) for p, lv, t in zip(paths, levels, types, strict=True)}
    for stratum in set(by_path.values()):
        total = sum(v == stratum for v in by_path.values())
        test = sum(by_path[str(f.relative_to(root))] == stratum for f, _ in files["test"])
        assert abs(test - total / 4) <= 1, (stratum, test, total)


def test_both_tasks_share_one_seeded_split():
    _, _, four = elpv.listing("4class", 0.25, seed=7)
    _, names, two = elpv.listing("binary", 0.25, seed=7)
    assert names == ["functional", "defective"]
    assert [f for f, _ in four["test"]] == [f for f, _ in two["test"]]
    # binary = defect probability >= 0.5, i.e. the two upper levels of the 4-class task
    assert all(b == int(a >= 2) for (_, a), (_, b) in zip(four["test"], two["test"], strict=True))
    _, _, again = elpv.listing("4class", 0.25, seed=7)
    _, _, other = elpv.listing("4class", 0.25, seed=8)
    assert again == four and other["test"] != four["test"]


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install elpv-dataset"):
        elpv.data_root()

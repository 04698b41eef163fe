"""The recipe benchmark's logic (what each recipe trains with, the table); speed and accuracy are
its output on real data (docs/recipes.md), never a test's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.recipes import (
    RECIPES,
    decodings,
    expected_level,
    params_for,
    table,
)
from imageclf.config import load_overrides
from tests.conftest import REPO


def test_baseline_is_the_plain_fine_tune_and_ablations_change_one_choice():
    base = params_for("elpv4", "baseline", 42, None)
    assert (base.data.name, base.data.elpv_task, base.data.image_size) == ("elpv", "4class", 96)
    assert (base.train.freeze_bn, base.train.freeze_epochs, base.train.layer_lr_decay) == (
        False, 0, 1.0,
    )  # fmt: skip
    assert base.train.augment == [{"translate": 8}] and base.train.class_balance == "none"
    frozen = params_for("elpv4", "freeze_bn", 42, None)
    assert frozen.train.freeze_bn and frozen.train.model_dump() == base.train.model_dump() | {
        "freeze_bn": True
    }


def test_a_configuration_recipe_is_the_shipped_file_on_the_benchmarks_dataset(tmp_path):
    photos = params_for("shift", "photos", 43, tmp_path)
    shipped = load_overrides(REPO / "configs" / "photos.yaml")
    assert photos.train.augment == shipped["train.augment"] and photos.seed == 43
    assert photos.data.imagefolder_root == str(tmp_path)  # the dataset's data.* still apply
    elpv = params_for("elpv2", "elpv_config", 42, None)
    assert (elpv.data.elpv_task, elpv.registry.model_name) == ("binary", "imageclf-elpv")
    with pytest.raises(SystemExit, match="shift-folder"):
        params_for("shift", "baseline", 42, None)
    assert all(k.startswith(("train.", "data.", "__")) for r in RECIPES.values() for k in r)


def test_table_gives_means_spreads_and_differences_from_the_baseline():
    rows = [
        {"dataset": "a", "recipe": "baseline", "seed": 1, "test_accuracy": 0.80},
        {"dataset": "a", "recipe": "x", "seed": 1, "test_accuracy": 0.84},
        {"dataset": "a", "recipe": "x", "seed": 2, "test_accuracy": 0.86},
        {"dataset": "b", "recipe": "baseline", "seed": 1, "test_accuracy": 0.50},
        {"dataset": "b", "recipe": "x", "seed": 1, "test_accuracy": 0.40},
    ]
    lines = table(rows).splitlines()
    assert lines[-1] == "| x | 85.0% ±1.0% (+5.0%) | 40.0% (-10.0%) | -2.50% |"
    assert Path(REPO / "docs" / "recipes.md").is_file()


def test_decodings_read_the_views_and_the_expected_level():
    # Two images, three ordered levels; the second is torn between levels 0 and 2.
    probs = np.array([[0.1, 0.8, 0.1], [0.45, 0.1, 0.45]])
    decoded = decodings(np.log(np.stack([probs] * 8)), ordered=True)
    assert decoded["argmax"].tolist() == [1, 0] and decoded["dihedral8"].tolist() == [1, 0]
    assert decoded["level"].tolist() == [1, 1]  # the expected level of 0 and 2 is 1
    assert expected_level(np.log(np.array([[0.1, 0.1, 0.8], [0.2, 0.2, 0.6]]))).tolist() == [2, 1]
    assert set(decodings(np.log(np.stack([probs] * 2)), ordered=False)) == {"argmax", "flip2"}

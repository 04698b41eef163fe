"""The Great Expectations suite passes good data and names what is wrong with bad data."""

from __future__ import annotations

import numpy as np
import pytest

from imageclf.config import load_params
from imageclf.data.store import Dataset, Split, load_dataset, write_dataset
from imageclf.data.validation import metadata_table, validate_dataset
from imageclf.errors import StageError
from imageclf.io import read_json
from stages import validate as validate_stage
from tests.conftest import REPO, synthetic_split, tiny_params

CFG = load_params(REPO / "params.yaml").validate_


def make_dataset(train: Split, test: Split) -> Dataset:
    meta = {"classes": ["a", "b", "c", "d"], "image_shape": list(train.images.shape[1:])}
    return Dataset(train, test, meta)


def test_metadata_table_has_one_row_per_image_and_flags_shared_images():
    train, test = synthetic_split(5, seed=1), synthetic_split(2, seed=2)
    test.images[0] = train.images[3]
    table = metadata_table(make_dataset(train, test))
    assert len(table) == len(train) + len(test)
    assert table["in_both_splits"].sum() == 2  # the pair, once in each split
    assert set(table.columns) >= {
        "label",
        "height",
        "pixel_min",
        "pixel_max",
        "sha1",
        "class_share",
    }


def test_good_dataset_passes_and_writes_data_docs(tmp_path):
    ds = make_dataset(synthetic_split(10, seed=1), synthetic_split(3, seed=2))
    outcome = validate_dataset(ds, CFG, tmp_path)
    assert outcome.success, outcome.failures
    assert outcome.summary["expectations"] >= 10
    assert outcome.data_docs is not None and outcome.data_docs.is_file()


def test_bad_dataset_fails_with_each_problem_named(tmp_path):
    train, test = synthetic_split(10, seed=1), synthetic_split(3, seed=2)
    test.images[0] = train.images[0]  # leak between splits
    train.labels[10:14] = 0  # imbalance (a: 14, b: 6): reported, never a failure
    train.labels[-1] = 7  # label outside the class set
    outcome = validate_dataset(make_dataset(train, test), CFG, tmp_path)
    assert not outcome.success
    text = "\n".join(outcome.failures)
    # Images without files are named by split and position, with their class.
    assert "train/test leakage" in text and "test[0] (a) is also in train" in text
    assert "train[0] (a)" in text
    assert "imbalance" not in text
    warned = "\n".join(outcome.warnings)
    assert "class imbalance in train" in warned and "b: 6 train images" in warned
    assert "column='label'" in text and "7" in text


def test_label_conflict_and_imbalance_remedy_for_arrays(tmp_path):
    train, test = synthetic_split(10, seed=1), synthetic_split(3, seed=2)
    train.images[12] = train.images[3]  # class b's image 2 is class a's image 3
    outcome = validate_dataset(make_dataset(train, test), CFG, tmp_path)
    text = "\n".join(outcome.failures)
    assert "label conflicts" in text
    assert "train[12] (b) is the same image (exact) as train[3] (a)" in text
    balanced = validate_dataset(
        make_dataset(synthetic_split(10, seed=1), test),
        CFG,
        tmp_path / "b",
        class_balance="weights",
    )
    assert balanced.success, balanced.failures


def test_validate_stage_keeps_last_good_report_on_failure(project):
    params = tiny_params()
    good = validate_stage.run(params, project)
    assert good["success"]
    report = (project.reports / "validate.json").read_bytes()
    ds = load_dataset(project.dataset)
    ds.test.images[:] = ds.train.images[: len(ds.test)]  # every test image leaks from train
    write_dataset(project.dataset, ds.train, ds.test, ds.meta)
    with pytest.raises(StageError, match="train/test leakage") as err:
        validate_stage.run(params, project)
    assert "validation-failed" in str(err.value)
    assert (project.reports / "validate.json").read_bytes() == report
    assert read_json(project.reports / "validation-failed" / "validate.json")["success"] is False
    assert np.all(ds.test.images == ds.train.images[: len(ds.test)])

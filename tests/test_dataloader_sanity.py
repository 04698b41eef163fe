"""dataloader_check's sanity run on shuffled labels: validation stays at chance on a sound
pipeline, and the stage fails when the labels reach the model another way.

What can such a leak be? With random training labels, nothing in the *data* can teach the true
classes (an image duplicated into val carries its random label, right 1/classes of the time). A
leak needs the pipeline: labels derived from something other than the label array (the image
order), or the label written into the input. The leaks below are such pipeline bugs, put into
the real loader (the one function every training batch passes through) with monkeypatch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imageclf.config import DataloaderCheckParams
from imageclf.data import loaders
from imageclf.data.store import Split, write_dataset
from imageclf.errors import StageError
from imageclf.io import read_json
from imageclf.models.zoo import build_model
from imageclf.training.debugging import LabelLeak, naming_p_value, shuffled_label_run
from tests.conftest import synthetic_split, tiny_params

CLASSES, SIZE = 10, 12


def ten_classes(n_per_class: int, seed: int) -> Split:
    """Class k: a bright 3x3 block in cell k of a 4x4 grid, on noise; sorted by class (as
    many datasets are stored), which is what a label-from-order bug relies on."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(CLASSES * n_per_class, SIZE, SIZE, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(CLASSES), n_per_class)
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 4)
        images[i, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3] = 255
    return Split(images, labels.astype(np.int64))


def check_cfg() -> DataloaderCheckParams:
    cfg = tiny_params().dataloader_check
    update = {"shuffled_steps": 40, "shuffled_batch_size": 32, "shuffled_train_images": 400}
    return cfg.model_copy(update={**update, "shuffled_val_images": 200})


def run_check(train: Split, val: Split) -> dict:
    torch.manual_seed(0)
    model = build_model("resnet_small", CLASSES, 1, 8, image_size=SIZE)
    return shuffled_label_run(model, train, val, CLASSES, check_cfg(), seed=0)


def break_labels_from_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader bug: labels computed from each image's position in a class-sorted split
    (position * classes // length), the label array it was given ignored."""
    original = loaders.InMemoryImages.__init__

    def buggy(self, split, augmentation=None, seed=0):
        original(self, split, augmentation, seed)
        n = len(self.labels)
        self.labels = torch.from_numpy(np.arange(n) * CLASSES // n)

    monkeypatch.setattr(loaders.InMemoryImages, "__init__", buggy)


@pytest.fixture
def labels_from_order(monkeypatch):
    break_labels_from_order(monkeypatch)


@pytest.fixture
def label_in_the_input(monkeypatch):
    """The preprocessing bug: each image gets its label burned in (pixel (0, label) set), from
    the label it travels with; the validation images were stamped the same way, with theirs."""
    original = loaders.InMemoryImages.__getitems__

    def buggy(self, batch):
        images, labels = original(self, batch)
        images[torch.arange(len(labels)), 0, 0, labels] = 1.0
        return images, labels

    monkeypatch.setattr(loaders.InMemoryImages, "__getitems__", buggy)


def stamped(split: Split) -> Split:
    images = split.images.copy()
    images[np.arange(len(split)), 0, split.labels, 0] = 255
    return Split(images, split.labels)


def test_a_sound_pipeline_stays_at_chance_and_passes():
    train, val = ten_classes(60, seed=1), ten_classes(20, seed=2)
    result = run_check(train, val)
    assert result["passed"] and result["testable"]
    assert result["p_value"] > 0.001
    assert result["val_accuracy_on_true_labels"] < 0.5  # far from what the task allows
    assert result["initial_loss"] > 2.0  # ~ln 10: it started from guessing


def test_labels_derived_from_the_image_order_fail_the_check(labels_from_order):
    train, val = ten_classes(60, seed=1), ten_classes(20, seed=2)
    with pytest.raises(LabelLeak, match=r"labels derived from the image order") as caught:
        run_check(train, val)
    assert "better than all but" in str(caught.value)


def test_labels_written_into_the_input_fail_the_check(label_in_the_input):
    train, val = ten_classes(60, seed=1), stamped(ten_classes(20, seed=2))
    with pytest.raises(LabelLeak, match="written into the input"):
        run_check(train, val)


def test_p_value_is_exact_for_few_classes_and_drawn_for_many():
    assert naming_p_value(np.diag([5, 5, 5]), 0.001, 0) == pytest.approx(1 / 6)  # 3! namings
    assert naming_p_value(np.full((3, 3), 2), 0.001, 0) == 1.0  # every naming ties
    p = naming_p_value(np.diag(np.full(10, 20)), 0.001, 0)
    assert 0 < p <= 1 / (100 / 0.001)  # only the identity scores 200; the draws never do


@pytest.fixture
def ten_class_project(project):
    write_dataset(
        project.dataset,
        ten_classes(40, seed=1),
        ten_classes(8, seed=2),
        {"name": "blocks", "classes": [f"c{k}" for k in range(CLASSES)], "source": {}},
    )
    return project


def stage_params():
    return tiny_params(
        dataloader_check={"shuffled_steps": 40, "shuffled_batch_size": 32},
        data={"val_fraction": 0.25},
    )


@pytest.mark.slow  # the stage twice (overfit, shuffled run, loader grid): ~20-90 s here
def test_stage_reports_the_shuffled_run_and_fails_on_a_leak(ten_class_project, monkeypatch):
    from stages import dataloader_check

    report = dataloader_check.run(stage_params(), ten_class_project)
    shuffled = report["shuffled_labels"]
    assert shuffled["passed"] and shuffled["val_images"] == 100  # train's own val split
    assert read_json(ten_class_project.loader_config) == report

    break_labels_from_order(monkeypatch)
    with pytest.raises(StageError, match="shuffled labels"):
        dataloader_check.run(stage_params(), ten_class_project)
    assert read_json(ten_class_project.loader_config) == report  # the good report stays


def test_too_few_classes_make_the_check_blind_and_it_says_so(caplog):
    """4! = 24 namings cannot reach p <= 0.001 in one run, whatever the model does."""
    train, val = synthetic_split(30, seed=1), synthetic_split(10, seed=2)
    torch.manual_seed(0)
    model = build_model("resnet_small", 4, 1, 8, image_size=12)
    result = shuffled_label_run(model, train, val, 4, check_cfg(), seed=0)
    assert result["testable"] is False and result["passed"] is True
    assert "cannot tell a leak" in caplog.text

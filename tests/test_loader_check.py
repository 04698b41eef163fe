"""dataloader_check at photo size: the grid with the augmentation policy, its cost, decoding."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imageclf.data.loader_check import (
    augmentation_cost,
    decode_cost,
    loader_grid,
    source_files,
    why_chosen,
)
from imageclf.data.loaders import LoaderSettings
from imageclf.data.store import FILE_TABLE
from imageclf.io import read_json
from tests.conftest import synthetic_split, tiny_params


def test_grid_measures_the_loader_with_the_policy_and_says_why():
    cfg = tiny_params().dataloader_check
    cfg = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"num_workers": [0, 1]})})
    split = synthetic_split(12, size=16, channels=3)
    policy = ["hflip", {"random_resized_crop": 0.5}, {"color_jitter": 0.2}]
    rows, chosen = loader_grid(split, 8, cfg, seed=0, augment=policy, balance=True)
    assert {r["num_workers"] for r in rows} == {0, 1}
    assert all(r["images_per_second"] > 0 for r in rows)
    sentence = why_chosen(rows, chosen)
    assert f"num_workers={chosen.num_workers}" in sentence and "images/s" in sentence


def test_why_chosen_names_the_faster_setting_it_passed_over():
    rows = [
        {**LoaderSettings(0).as_dict(), "images_per_second": 980.0},
        {**LoaderSettings(2).as_dict(), "images_per_second": 1000.0},
    ]
    sentence = why_chosen(rows, LoaderSettings(0))
    assert "within 5% of the fastest" in sentence and "num_workers=2" in sentence
    assert "was the fastest" in why_chosen(rows, LoaderSettings(2))


def test_augmentation_cost_is_measured_against_no_augmentation():
    split = synthetic_split(16, size=16, channels=3)
    cost = augmentation_cost(split, 16, 2, 0, [{"randaugment": 9}])
    assert cost["policy"] == [{"randaugment": 9}]
    # Both speeds measured, the cost is their difference per image (never negative, and no
    # claim about which was faster: that is the benchmark's to say, on a noisy machine).
    assert cost["images_per_second_without"] > 0 and cost["images_per_second_with"] > 0
    per_image = 1000 / cost["images_per_second_with"] - 1000 / cost["images_per_second_without"]
    assert cost["ms_per_image"] == pytest.approx(max(0.0, per_image), abs=1e-3)
    assert augmentation_cost(split, 16, 2, 0, [])["ms_per_image"] == 0.0


def photo_folder(root: Path) -> tuple[Path, dict]:
    """A folder dataset's source files and the file table download writes beside meta.json:
    two readable JPEGs per class, one bad file, one test file."""
    rows = []
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        for i in range(2):
            path = root / "train" / cls / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            rows.append({"path": f"train/{cls}/{i}.jpg", "split": "train", "problem": ""})
    (root / "train" / "cat" / "bad.jpg").write_bytes(b"not an image")
    rows.append({"path": "train/cat/bad.jpg", "split": "train", "problem": "not_image"})
    rows.append({"path": "test/cat/0.jpg", "split": "test", "problem": ""})
    dataset = root / "dataset"
    dataset.mkdir()
    with (dataset / FILE_TABLE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "split", "problem"])
        writer.writeheader()
        writer.writerows(rows)
    return dataset, {"source": {"imagefolder_root": str(root)}}


def test_decode_cost_times_readable_training_source_files(tmp_path: Path):
    dataset, meta = photo_folder(tmp_path)
    files = source_files(dataset, meta, limit=10)
    assert sorted(p.name for p in files) == ["0.jpg", "0.jpg", "1.jpg", "1.jpg"]
    assert all("train" in p.parts for p in files)
    assert len(source_files(dataset, meta, limit=2)) == 2
    cost = decode_cost(files, 32, 3)
    assert cost["files"] == 4 and cost["ms_per_image_median"] > 0
    assert cost["source_megapixels_mean"] == pytest.approx(0.12)
    assert cost["images_per_second_per_core"] > 0


def test_no_decode_cost_for_datasets_not_read_from_files(tmp_path: Path):
    assert source_files(tmp_path, {"source": {"files": ["train-images.gz"]}}, 10) == []
    assert decode_cost([], 28, 1)["files"] == 0


def test_stage_reports_choice_reason_augmentation_and_decoding(project):
    from stages import dataloader_check

    params = tiny_params()
    report = dataloader_check.run(params, project)
    assert report["overfit_passed"]
    assert report["chosen"] == LoaderSettings(0).as_dict()  # the tiny grid has one setting
    assert "was the fastest" in report["chosen_because"]
    assert report["augmentation"]["policy"] == params.train.augment
    assert report["decode"]["files"] == 0  # the project's dataset was not read from files
    assert read_json(project.loader_config) == report

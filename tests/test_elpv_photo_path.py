"""configs/elpv.yaml through the stages a photo run takes, on a small seeded subset of ELPV."""

from __future__ import annotations

import pytest

from imageclf.config import apply_overrides, load_overrides
from imageclf.io import read_json
from imageclf.onnx_runtime import onnx_metadata
from stages import download, evaluate, export, train, validate
from tests.conftest import REPO, tiny_params

pytestmark = pytest.mark.slow


def test_elpv_configuration_downloads_validates_trains_and_evaluates(project):
    """Real images nobody here made pass the gate unchanged (no false near duplicates, ordinary
    imbalance only reported), the pretrained path trains and scores every class, and the model
    exports with its 8-view test-time augmentation inside (what is served is what was scored)."""
    params = apply_overrides(tiny_params(), load_overrides(REPO / "configs" / "elpv.yaml"))
    params = apply_overrides(
        params,
        {
            "data.fraction": 0.1,  # ~197 train and 66 test cells, every class kept
            "data.image_size": 48,
            "train.epochs": 1,
            "train.batch_size": 32,
            "evaluate.top_losses": 4,
            "evaluate.inside_images": 1,
        },
    )
    report = download.run(params, project)
    assert (report["name"], report["num_classes"]) == ("elpv", 4)
    assert report["files_skipped"] == 0 and report["num_train"] > 150
    meta = read_json(project.dataset / "meta.json")
    assert meta["source"]["task"] == "4class" and meta["source"]["package"].startswith("elpv")

    checked = validate.run(params, project)
    assert checked["success"], checked["failures"]
    problems = checked["problems"]
    assert problems["label_conflict"] == 0 and problems["train_test_leak"] == 0, problems
    assert any("defect_067" in w for w in checked["warnings"])  # 4% of the cells: reported

    train.run(params, project)
    scored = evaluate.run(params, project)
    assert set(scored["per_class"]) == {"defect_000", "defect_033", "defect_067", "defect_100"}
    assert 0.0 <= scored["balanced_accuracy"] <= 1.0
    assert scored["tta_views"] == 8  # a cell is a cell in any of the square's orientations

    exported = export.run(params, project)
    assert exported["tta_views"] == 8 and exported["dynamic_batch"]
    assert exported["argmax_agreement"] >= params.export.min_argmax_agreement
    assert onnx_metadata(project.onnx)["tta_views"] == "8"

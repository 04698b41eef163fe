"""The training loop learns, checkpoints through its callback, and fails loudly on divergence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imageclf.data.loaders import LoaderSettings, make_loader
from imageclf.engine import predict_logits, train_model
from imageclf.loader_check import OverfitFailed, loader_grid, overfit_one_batch
from imageclf.models import build_model
from tests.conftest import synthetic_split, tiny_params


def test_training_learns_a_learnable_task():
    # Enough steps for BatchNorm's running statistics (used in eval mode) to settle.
    train, test = synthetic_split(60, seed=1), synthetic_split(10, seed=2)
    cfg = tiny_params(train={"epochs": 4, "width": 8, "lr": 0.1}).train
    torch.manual_seed(0)
    model = build_model(cfg.model, 4, 1, cfg.width)
    seen = []
    history = train_model(
        model,
        train,
        test,
        cfg,
        seed=0,
        progress=False,
        on_epoch_end=lambda m, *_: seen.append(m.epoch),
    )
    assert seen == [1, 2, 3, 4]
    assert history.final.val_accuracy >= 0.9
    accuracy = (predict_logits(model, test.images).argmax(1).numpy() == test.labels).mean()
    assert accuracy >= 0.9


def test_same_seed_same_weights():
    train = synthetic_split(10, seed=1)
    cfg = tiny_params().train
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(cfg.model, 4, 1, cfg.width)
        train_model(model, train, None, cfg, seed=3, progress=False)
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1])


def test_divergence_is_reported_not_silently_trained_through():
    train = synthetic_split(10, seed=1)
    cfg = tiny_params().train
    model = build_model(cfg.model, 4, 1, cfg.width)
    with torch.no_grad():
        model[1][-1].weight.fill_(float("nan"))  # what an exploding update leaves behind
    with pytest.raises(FloatingPointError, match=r"lower train\.lr"):
        train_model(model, train, None, cfg, seed=0, progress=False)


def test_loader_yields_whole_batches_in_contract():
    split = synthetic_split(5)
    images, labels = next(iter(make_loader(split, 7, shuffle=True, settings=LoaderSettings(1))))
    assert images.shape == (7, 1, 12, 12) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and float(images.max()) <= 1.0


def test_overfit_passes_on_real_model_and_fails_on_shuffled_labels():
    params = tiny_params()
    split = synthetic_split(8)
    torch.manual_seed(0)
    model = build_model("resnet_small", 4, 1, 8)
    assert overfit_one_batch(model, split, params.dataloader_check, seed=0)["passed"]
    cfg = params.dataloader_check.model_copy(update={"overfit_steps": 1})
    with pytest.raises(OverfitFailed, match="threshold"):
        overfit_one_batch(build_model("resnet_small", 4, 1, 8), split, cfg, seed=0)


def test_loader_grid_reports_each_setting_and_picks_one():
    cfg = tiny_params().dataloader_check.model_copy(
        update={
            "grid": tiny_params().dataloader_check.grid.model_copy(update={"num_workers": [0, 1]})
        }
    )
    rows, chosen = loader_grid(synthetic_split(20), 16, cfg, seed=0)
    assert {r["num_workers"] for r in rows} == {0, 1}
    assert all(r["images_per_second"] > 0 for r in rows)
    assert chosen.num_workers in (0, 1)
    assert np.isfinite([r["images_per_second"] for r in rows]).all()

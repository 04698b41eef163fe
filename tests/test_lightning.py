"""The Lightning adapter (course/lightning_adapter.py, course bonus B) trains the same
model on the same data as the engine, to the same accuracy, and writes a checkpoint the
evaluate stage reads."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from course.lightning_adapter import ImageDataModule, check_supported, fit
from imageclf.data.fashion_mnist import parse_idx
from imageclf.data.store import Dataset, Split
from imageclf.errors import StageError
from imageclf.models.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from imageclf.seeding import seed_everything
from imageclf.training.engine import predict_logits, train_model
from tests.conftest import FASHION_MNIST_DIR, tiny_params

TRAIN_IMAGES, TEST_IMAGES = 3000, 1000


def read_fashion(prefix: str, count: int) -> Split:
    def idx(kind: str, ndim: int) -> np.ndarray:
        blob = gzip.decompress(
            (FASHION_MNIST_DIR / f"{prefix}-{kind}-idx{ndim}-ubyte.gz").read_bytes()
        )
        return parse_idx(blob, ndim)[:count]

    return Split(idx("images", 3)[..., None].copy(), idx("labels", 1).astype(np.int64))


@pytest.fixture(scope="module")
def fashion_subset() -> Dataset:
    """The first images of Fashion-MNIST (about balanced over its 10 classes)."""
    classes = [f"c{i}" for i in range(10)]
    return Dataset(
        read_fashion("train", TRAIN_IMAGES), read_fashion("t10k", TEST_IMAGES), {"classes": classes}
    )


def params_for(model: str):
    return tiny_params(
        train={"model": model, "width": 8, "epochs": 2, "batch_size": 64, "lr": 0.05},
        data={"val_fraction": 0.1},
    )


def fresh_model(params, dataset: Dataset):
    spec = ModelSpec(
        params.train.model, params.train.width, 10, 1, 28, tuple(dataset.classes), 0.29, 0.35
    )
    seed_everything(params.seed)
    return spec, spec.build()


@pytest.mark.slow  # about 40 s on 2 busy cores: two trainings of 2 epochs on 2,700 images
def test_lightning_and_the_engine_reach_the_same_accuracy(fashion_subset, tmp_path):
    params = params_for("mlp")
    test = fashion_subset.test

    def accuracy(model) -> float:
        return float((predict_logits(model, test.images).argmax(1).numpy() == test.labels).mean())

    data = ImageDataModule(fashion_subset, params)
    data.setup("fit")
    _, engine_model = fresh_model(params, fashion_subset)
    train_model(
        engine_model,
        data.train_split,
        data.val_split,
        params.train,
        seed=params.seed,
        progress=False,
        device=torch.device("cpu"),
    )
    engine_accuracy = accuracy(engine_model)

    spec, lightning_model = fresh_model(params, fashion_subset)
    _, metrics = fit(
        lightning_model,
        ImageDataModule(fashion_subset, params),
        root=tmp_path,
        device=torch.device("cpu"),
    )
    lightning_accuracy = accuracy(lightning_model)
    assert not any(tmp_path.iterdir())  # no logs, no checkpoints, no progress files

    print(f"test accuracy: engine {engine_accuracy:.4f}, lightning {lightning_accuracy:.4f}")
    assert engine_accuracy > 0.7 and lightning_accuracy > 0.7  # chance: 0.1
    assert abs(engine_accuracy - lightning_accuracy) < 0.03, (engine_accuracy, lightning_accuracy)
    assert 0.0 < metrics["val_accuracy"] <= 1.0

    # What it trained is a checkpoint the evaluate stage loads like the train stage's.
    save_checkpoint(tmp_path / "model.pt", lightning_model, spec)
    loaded, loaded_spec, _ = load_checkpoint(tmp_path / "model.pt")
    assert loaded_spec == spec and accuracy(loaded) == lightning_accuracy


def test_settings_it_does_not_implement_are_refused(fashion_subset, tmp_path):
    params = params_for("mlp")
    params = params.model_copy(
        update={"train": params.train.model_copy(update={"ema_decay": 0.99})}
    )
    _, model = fresh_model(params, fashion_subset)
    with pytest.raises(StageError, match="ema_decay"):
        fit(model, ImageDataModule(fashion_subset, params), root=tmp_path)
    pair = params.train.model_copy(update={"ema_decay": 0.0, "ensemble": [{}, {"seed": 43}]})
    with pytest.raises(StageError, match=r"train\.ensemble"):
        check_supported(pair)

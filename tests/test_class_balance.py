"""train.class_balance: inverse-frequency loss weights, or a class-balanced sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imageclf.data.loaders import class_weights, loss_weights, make_loader
from imageclf.data.store import Split
from imageclf.models.zoo import build_model
from imageclf.training.engine import train_model
from tests.conftest import synthetic_split, tiny_params


def imbalanced_split(counts: tuple[int, ...] = (120, 30, 15, 5)) -> Split:
    """synthetic_split with ``counts[k]`` images of class k."""
    full = synthetic_split(max(counts), num_classes=len(counts), seed=2)
    keep = np.concatenate([np.flatnonzero(full.labels == k)[:n] for k, n in enumerate(counts)])
    return full.subset(keep)


def test_weights_are_inverse_frequencies_with_mean_one():
    labels = np.repeat([0, 1, 2], [100, 25, 50])
    weights = class_weights(labels, 4).numpy()  # class 3 has no image: weight 0
    assert weights[3] == 0
    assert weights[:3].mean() == pytest.approx(1.0)
    assert weights[1] / weights[0] == pytest.approx(4.0)
    assert weights[2] / weights[0] == pytest.approx(2.0)
    # Each class then weighs the same in the loss, however many images it has.
    counts = np.bincount(labels, minlength=4)
    assert np.allclose((counts * weights)[:3], (counts * weights)[0])


def test_square_root_weights_correct_half_as_hard():
    """class_weight_power 0.5 (configs/photos.yaml): the rare class's weight over the common
    one's is the square root of the full correction's; balanced labels give all ones."""
    labels = np.array([0] * 90 + [1] * 10)
    full, half = class_weights(labels, 2), class_weights(labels, 2, power=0.5)
    assert float(full[1] / full[0]) == pytest.approx(9.0)
    assert float(half[1] / half[0]) == pytest.approx(3.0)
    assert float(half.mean()) == pytest.approx(1.0)
    cfg = tiny_params(train={"class_balance": "weights", "class_weight_power": 0.5}).train
    assert torch.equal(loss_weights(cfg, np.array([0, 1, 2, 0, 1, 2]), 3), torch.ones(3))
    assert loss_weights(tiny_params().train, labels, 2) is None  # class_balance: none


def test_weights_refuse_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"0\.\.2"):
        class_weights(np.array([0, 1, 3]), 3)


def drawn_labels(split: Split, seed: int) -> np.ndarray:
    loader = make_loader(split, 32, shuffle=True, seed=seed, balance=True)
    return torch.cat([labels for _, labels in loader]).numpy()


def test_sampler_draws_roughly_balanced_epochs_of_the_same_length():
    split = imbalanced_split()  # 70% / 18% / 9% / 3%
    labels = drawn_labels(split, seed=0)
    assert len(labels) == len(split)  # an epoch is as long as the dataset
    shares = np.bincount(labels, minlength=4) / len(labels)
    assert np.all(np.abs(shares - 0.25) < 0.09), shares
    # Rare images are drawn more than once (with replacement); common ones not all of them.
    assert np.bincount(labels, minlength=4)[3] > 5
    assert np.array_equal(labels, drawn_labels(split, seed=0))  # seeded: reproducible
    assert not np.array_equal(labels, drawn_labels(split, seed=1))


def test_sampler_is_for_training_loaders_only():
    with pytest.raises(ValueError, match="shuffle"):
        make_loader(imbalanced_split(), 8, shuffle=False, balance=True)


@pytest.mark.parametrize("balance", ["weights", "sampler"])
def test_training_uses_the_class_balance(balance):
    """Each setting changes what is learned from the same start (so it is not ignored), and
    training still runs through the whole loop."""
    split = imbalanced_split((24, 6, 4, 2))
    trained = {}
    for option in ("none", balance):
        cfg = tiny_params(
            train={"class_balance": option, "batch_size": 8, "epochs": 1, "max_steps": 3}
        ).train
        torch.manual_seed(0)
        model = build_model("resnet_small", 4, 1, 8, image_size=12)
        history = train_model(model, split, split, cfg, seed=0, progress=False)
        assert np.isfinite(history.final.train_loss)
        trained[option] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(trained["none"], trained[balance])

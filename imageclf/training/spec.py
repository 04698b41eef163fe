"""Which model a training run builds: one definition for the train stage, the Lightning trainer
and the benchmarks, so that each of them trains the same model from the same ``train.*``."""

from __future__ import annotations

import numpy as np

from imageclf.config import TrainParams
from imageclf.data.store import channel_statistics
from imageclf.models.checkpoint import ModelSpec
from imageclf.models.zoo import model_contract


def pretrained_kind(cfg: TrainParams) -> str:
    """What the weights start from, as ModelSpec records it (never a path)."""
    if cfg.pretrained:
        return "imagenet" if cfg.pretrained == "imagenet" else "file"
    return "checkpoint" if cfg.init_from else ""


def training_spec(
    cfg: TrainParams, classes: list[str], image_shape: tuple[int, int, int], train: np.ndarray
) -> ModelSpec:
    """The spec of the model a training run builds (the train stage, the Lightning trainer and
    the time-to-accuracy benchmark alike), so all three train the same model from ``train.*``.

    The normalisation baked into the model is the training split's per-channel statistics, or,
    with ``train.pretrained``, the statistics the weights were trained with (new statistics
    would shift every input the pretrained first layer sees)."""
    if cfg.pretrained:
        contract = model_contract(cfg.model)
        assert contract.mean is not None and contract.std is not None
        mean, std = list(contract.mean), list(contract.std)
    else:
        mean, std = channel_statistics(train)
    c, h, _ = image_shape
    return ModelSpec(
        name=cfg.model,
        width=cfg.width,
        num_classes=len(classes),
        in_channels=c,
        image_size=h,
        classes=tuple(classes),
        mean=mean,
        std=std,
        pretrained=pretrained_kind(cfg),
    )

"""What a training run starts from: the validation split, the model's spec and its seeded initial
(or transferred) weights. One definition for the train stage, the Lightning trainer and the
benchmarks, so that each of them trains the same model from the same ``params``."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass

import numpy as np
from torch import nn

from imageclf.config import Params, TrainParams
from imageclf.data.store import Dataset, Split, channel_statistics, split_train_val
from imageclf.errors import InvalidInput, StageError
from imageclf.models.backbones import load_pretrained, pretrained_models
from imageclf.models.checkpoint import ModelSpec, load_pretrained_features
from imageclf.models.zoo import model_contract
from imageclf.paths import ProjectPaths
from imageclf.seeding import seed_everything
from imageclf.training.debugging import check_model_accepts

log = logging.getLogger(__name__)


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


def check_transfer_params(cfg: TrainParams) -> None:
    """Transfer settings that need starting weights, refused with what to set instead."""
    if cfg.pretrained and cfg.init_from:
        raise StageError(
            "train.pretrained and train.init_from both name starting weights: set one of them "
            'to "" (pretrained: ImageNet weights; init_from: a checkpoint of this project).'
        )
    if cfg.pretrained and cfg.model not in pretrained_models():
        raise StageError(
            f"train.pretrained is set, but {cfg.model} has no pretrained weights; models that "
            f'take them: {pretrained_models()} (train.model), or set train.pretrained: "".'
        )
    start = cfg.pretrained or cfg.init_from
    needs = []
    if cfg.freeze_epochs:
        needs.append("train.freeze_epochs")
    if cfg.transfer == "features":
        needs.append("train.transfer: features")
    if cfg.unfreeze == "gradual":
        needs.append("train.unfreeze: gradual")
    if cfg.frozen_groups:
        needs.append("train.frozen_groups")
    if needs and not start:
        raise StageError(
            f"{', '.join(needs)} needs train.init_from or train.pretrained (freezing random "
            "features learns nothing)."
        )


@dataclass
class PreparedRun:
    """Everything before a run's first step: its parameters, the model's spec, the model with
    its initial weights, and the training and validation splits."""

    params: Params
    spec: ModelSpec
    model: nn.Module
    train: Split
    val: Split


def prepare_run(params: Params, dataset: Dataset, paths: ProjectPaths) -> PreparedRun:
    """Split, statistics, seeded initial (or transferred) weights and a shape check, exactly as
    the train stage does it before training with ``params`` (``paths``: where ``train.init_from``
    and local pretrained weights are found). Bad settings raise a StageError saying what to set."""
    cfg = params.train
    train_idx, val_idx = split_train_val(
        dataset.train.labels, params.data.val_fraction, params.seed
    )
    train_split, val_split = dataset.train.subset(train_idx), dataset.train.subset(val_idx)
    _, h, _ = dataset.image_shape
    check_transfer_params(cfg)
    contract = model_contract(cfg.model)
    spec = training_spec(cfg, dataset.classes, dataset.image_shape, train_split.images)
    seed_everything(params.seed)  # the initial weights too, not only the data order
    try:
        model = spec.build()
    except InvalidInput as exc:  # e.g. an ImageNet backbone on grayscale data
        raise StageError(f"train.model: {exc}") from exc
    if cfg.pretrained:
        try:
            source = load_pretrained(model, cfg.model, cfg.pretrained, paths.root)
        except InvalidInput as exc:
            raise StageError(f"train.pretrained: {exc}") from exc
        log.info("pretrained %s weights from %s", cfg.model, source)
        if contract.size and abs(h - contract.size) / contract.size > 0.5:
            log.warning(
                "%s was pretrained at %d px and trains at %d px (data.image_size): fine-tuning "
                "adapts it, frozen features (train.transfer: features) suffer most.",
                cfg.model,
                contract.size,
                h,
            )
    elif cfg.init_from:
        start = paths.resolve(cfg.init_from)
        if not start.is_file():
            raise StageError(
                f"train.init_from: no file at {start}. Point it at a checkpoint this project "
                'wrote (a models/model.pt kept aside), or set it to "" to train from scratch.'
            )
        try:
            copied = load_pretrained_features(model, start)
        except InvalidInput as exc:  # the wrong architecture, width or channels: says which
            raise StageError(f"train.init_from: {exc}") from exc
        except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as exc:
            # not a checkpoint at all: what torch.load raises for a file it cannot read
            raise StageError(
                f"train.init_from: {start} is not a checkpoint this project wrote ({exc})."
            ) from exc
        log.info("transfer learning: %d feature tensors from %s", copied, start)
    # A model that disagrees with the data's shape fails here, naming the layer and the setting.
    check_model_accepts(model, dataset.image_shape)
    return PreparedRun(params, spec, model, train_split, val_split)

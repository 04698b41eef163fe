"""Transfer learning the way practitioners do it: layer groups, gradual unfreezing,
discriminative learning rates, frozen batch norm, and features computed once for a linear head.

Layer groups come from the model registry (``imageclf.models.zoo.register(groups=...)``; e.g. Lite0:
stem, seven block stages, head conv; ResNet: stem, layer1..4). Depth 0 is the classifier, depth 1
the group just below it, and so on down to the stem. With ``train.layer_lr_decay`` d, a group at
depth k learns at ``train.lr * d**k`` (fastai's discriminative learning rates: the early layers
hold generic features worth keeping). ``train.freeze_epochs`` trains only the classifier; then
``train.unfreeze: all`` trains everything, ``gradual`` adds one group per epoch from the top.

Batch norm (``train.freeze_bn``, for pretrained backbones): the backbone's BN layers stay in eval
mode for the whole run (running statistics are the ImageNet ones) and their affine parameters do
not learn. Small batches of a small dataset estimate statistics badly, and a fine-tuned BN that
drifts from the statistics the next layer was trained on costs accuracy; frozen, BN is a fixed
per-channel affine map, which is also what export folds. With ``freeze_bn: false`` BN layers of
learning groups train normally; a group that is still frozen is in eval mode either way, so its
statistics never move while its weights cannot follow.

A frozen group's parameters get ``requires_grad = False``, so autograd skips the backward pass
below the lowest learning group (most of the cost on a CPU). Under DistributedDataParallel the set
of parameters that need gradients must not change, so there they keep ``requires_grad`` and their
gradients are dropped after the backward pass instead (the optimizers skip a parameter without a
gradient).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from imageclf.config import TrainParams
from imageclf.data.transforms import to_model_input
from imageclf.errors import StageError

log = logging.getLogger(__name__)


def layer_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The model's layer groups from the top: ``[[classifier], top group, ..., stem]``.

    From the layout :func:`imageclf.models.zoo.build_model` records on the body; a module of the
    backbone in no group (none today) joins the lowest group, so every parameter has a depth."""
    body = model[-1]
    names = getattr(body, "layer_groups", None)
    if names is None:
        from imageclf.models.zoo import default_groups

        names = default_groups(body)
    groups = [[body.get_submodule(n) for n in group] for group in reversed(names)]
    groups = [[body[-1]], *groups]
    covered = {id(p) for group in groups for m in group for p in m.parameters()}
    rest = [m for m in body.children() if any(id(p) not in covered for p in m.parameters())]
    if rest and len(groups) > 1:
        groups[-1] += rest
    return groups


def batch_norms(modules: list[nn.Module]) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for module in modules for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@dataclass
class TransferPlan:
    """Which layer groups learn in which epoch, at which learning rate, and what BN does."""

    groups: list[list[nn.Module]]
    freeze_epochs: int
    unfreeze: str
    layer_lr_decay: float
    freeze_bn: bool
    features_only: bool = False
    frozen_groups: int = 0
    _params: list[list[nn.Parameter]] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def for_model(cls, model: nn.Module, cfg: TrainParams, pretrained: bool) -> TransferPlan:
        """``pretrained``: the backbone's weights were loaded (train.pretrained or
        train.init_from); frozen BN and feature extraction only make sense then."""
        groups = layer_groups(model)
        backbone = len(groups) - 1  # the classifier is groups[0]
        if pretrained and cfg.frozen_groups >= backbone:
            raise StageError(
                f"train.frozen_groups: {cfg.frozen_groups} would freeze all {backbone} layer "
                f"groups of {cfg.model}'s backbone: use at most {backbone - 1}, or train.transfer:"
                " features for a frozen backbone (its features are then computed once)."
            )
        return cls(
            groups=groups,
            freeze_epochs=cfg.freeze_epochs,
            unfreeze=cfg.unfreeze,
            layer_lr_decay=cfg.layer_lr_decay,
            freeze_bn=cfg.freeze_bn and pretrained,
            features_only=cfg.transfer == "features" and pretrained,
            frozen_groups=cfg.frozen_groups if pretrained else 0,
        )

    @staticmethod
    def needed(cfg: TrainParams, pretrained: bool) -> bool:
        """Whether a run differs from plain training (else the engine trains as it always did)."""
        return bool(
            cfg.freeze_epochs
            or cfg.layer_lr_decay < 1.0
            or (pretrained and (cfg.freeze_bn or cfg.transfer == "features"))
            or (pretrained and cfg.unfreeze == "gradual")
            or (pretrained and cfg.frozen_groups > 0)
        )

    def backbone_bn(self) -> list[nn.modules.batchnorm._BatchNorm]:
        return batch_norms([m for group in self.groups[1:] for m in group])

    def freeze_batch_norm(self) -> None:
        """Frozen BN: affine parameters never learn (so the optimizer never holds them)."""
        if self.freeze_bn:
            for bn in self.backbone_bn():
                for p in bn.parameters():
                    p.requires_grad_(False)

    def group_params(self) -> list[list[nn.Parameter]]:
        """Each group's learnable parameters (each parameter once, at its top-most depth)."""
        seen: set[int] = set()
        out = []
        for group in self.groups:
            params = []
            for module in group:
                for p in module.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
            out.append(params)
        return out

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups: per layer group, the weights with weight decay and the
        norm/bias parameters without (they only rescale), at ``lr * decay**depth``."""
        groups = []
        for depth, params in enumerate(self.group_params()):
            group_lr = lr * self.layer_lr_decay**depth
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            for chunk, wd in ((decay, weight_decay), (no_decay, 0.0)):
                if chunk:
                    groups.append(
                        {"params": chunk, "weight_decay": wd, "lr": group_lr, "depth": depth}
                    )
        return groups

    def learning_depth(self, epoch: int) -> int:
        """The deepest group that learns in ``epoch`` (1-based): 0 while only the classifier
        trains, then all at once or one more per epoch, never one of the ``frozen_groups``
        lowest."""
        if self.features_only or epoch <= self.freeze_epochs:
            return 0
        deepest = max(len(self.groups) - 1 - self.frozen_groups, 0)
        if self.unfreeze == "gradual":
            return min(epoch - self.freeze_epochs, deepest)
        return deepest

    def start_epoch(self, epoch: int, toggle_requires_grad: bool) -> list[nn.Parameter]:
        """Put each group in train or eval mode for ``epoch`` (after ``model.train()``) and
        return the parameters of frozen groups (their gradients are to be dropped when
        ``toggle_requires_grad`` is False, under DDP)."""
        depth = self.learning_depth(epoch)
        frozen_params: list[nn.Parameter] = []
        for d, (group, params) in enumerate(zip(self.groups, self._params, strict=True)):
            learning = d <= depth
            for module in group:
                module.train(learning)
            for p in params:
                if toggle_requires_grad:
                    p.requires_grad_(learning)
                elif not learning:
                    frozen_params.append(p)
        if self.freeze_bn:
            for bn in self.backbone_bn():
                bn.eval()
        log.info("epoch %d: layer groups 0..%d of %d learn", epoch, depth, len(self.groups) - 1)
        return frozen_params

    def prepare(self) -> None:
        """Freeze BN affine parameters and remember what the optimizer will hold: call once,
        before building the optimizer."""
        self.freeze_batch_norm()
        if self.features_only:  # only the classifier ever learns
            for group in self.groups[1:]:
                for module in group:
                    module.requires_grad_(False)
        self._params = self.group_params()

    def release(self) -> None:
        """After training: every parameter trainable again (what the model is, saved or
        trained further), every module back in train mode."""
        for group in self.groups:
            for module in group:
                module.requires_grad_(True)
                module.train()


@torch.inference_mode()
def extract_features(
    features: nn.Module, images: np.ndarray, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Penultimate-layer features of uint8 NHWC ``images`` (un-augmented), in eval mode, on the
    CPU as float32: computed once per run and reused by every epoch of the head's training.

    Kept in memory rather than cached on disk: they are small (4,000 images x 1,280 floats is
    20 MB), computing them is the one expensive step and happens once per run anyway, and a disk
    cache would need a key over weights, data and size to never serve stale features."""
    features.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size]).to(
            device, memory_format=torch.channels_last
        )
        out.append(features(x).float().flatten(1).cpu())
    return torch.cat(out) if out else torch.empty(0)

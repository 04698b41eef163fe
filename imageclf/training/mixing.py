"""Batch mixing (course module 3, regularization): MixUp blends two images and their labels,
CutMix pastes a patch of one image into another and mixes the labels by the patch's area.

Both come from ``torchvision.transforms.v2`` and act on a whole batch, so they run in the training
loop after the loader (not in its per-image transforms). Their targets are class probabilities,
which ``nn.CrossEntropyLoss`` takes directly: the soft-target loss, label smoothing included.
Their randomness is torch's global generator, which the resumable checkpoint saves.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from imageclf.config import TrainParams


class BatchMixer:
    """MixUp, CutMix, or a coin flip between them per batch, as ``train.*_alpha`` set them."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float) -> None:
        mixers: list[v2.Transform] = []
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not mixers:
            raise ValueError("BatchMixer needs mixup_alpha or cutmix_alpha above 0")
        self.num_classes = num_classes
        self.transform = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    @classmethod
    def from_params(cls, cfg: TrainParams, num_classes: int) -> BatchMixer | None:
        """The mixer ``cfg`` asks for, or None when both alphas are 0 (hard labels)."""
        if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
            return None
        return cls(num_classes, cfg.mixup_alpha, cfg.cutmix_alpha)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and (N, num_classes) float targets that sum to 1 per row."""
        mixed, targets = self.transform(images, labels)
        return mixed, targets


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indices for accuracy: the dominant class of soft targets, indices unchanged."""
    return targets.argmax(1) if targets.ndim == 2 else targets

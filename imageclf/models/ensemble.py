"""An ensemble of independently trained models as one ``nn.Module`` that keeps the model contract.

Averaging the predictions of models trained from other seeds (initial weights, data order,
augmentation) is the most dependable way to buy accuracy with more training compute: each
member errs on partly different images. Here the average is of log-probabilities (a normalised
geometric mean of the members' probabilities), and the ensemble is built so that everything
written for one model works on it unchanged:

    nn.Sequential(Identity, nn.Sequential(MemberFeatures, MemberHeads))

``split_head`` then gives (every member's penultimate features, concatenated) and (the members'
classifiers, averaged): the embedding monitoring compares is the members' embeddings side by
side, ``ServingGraph`` and ONNX export see one graph, and ``fold_batchnorm``, quantization and
pruning reach every member's layers. Each member keeps its own input normalisation (the
``Normalize`` buffers of its own training split).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imageclf.models.zoo import split_head


class MemberFeatures(nn.Module):
    """x -> each member's penultimate features (its Normalize included), concatenated."""

    def __init__(self, features: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([member(x) for member in self.members], dim=1)


class MemberHeads(nn.Module):
    """Concatenated features -> the mean of the members' log-probabilities.

    The result is used as logits (argmax, softmax and log_softmax of it are the ensemble's
    prediction and renormalised probabilities)."""

    def __init__(self, heads: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.sizes = [head.in_features for head in heads]
        # What code written for one model reads off its nn.Linear classifier.
        self.in_features = sum(self.sizes)
        self.out_features = heads[0].out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        parts = features.split(self.sizes, dim=1)
        scores = [head(part).log_softmax(1) for head, part in zip(self.heads, parts, strict=True)]
        return torch.stack(scores).mean(0)


def ensemble(models: Sequence[nn.Module]) -> nn.Sequential:
    """One model from two or more models built by ``build_model`` (the same architecture; their
    modules are shared, not copied: train or load them first, or load the ensemble's state)."""
    if len(models) < 2:
        raise ValueError(f"an ensemble needs two or more models, got {len(models)}")
    parts = [split_head(model) for model in models]
    heads = [head for _, head in parts]
    if not all(isinstance(head, nn.Linear) for head in heads):
        raise TypeError("ensemble members must end in an nn.Linear classifier")
    return nn.Sequential(
        nn.Identity(),
        nn.Sequential(MemberFeatures([f for f, _ in parts]), MemberHeads(heads)),
    )


def members_of(model: nn.Module) -> int:
    """How many members ``model`` averages: 1 for a plain model."""
    body = model[-1] if isinstance(model, nn.Sequential) and len(model) else None
    if isinstance(body, nn.Sequential) and body and isinstance(body[0], MemberFeatures):
        return len(body[0].members)
    return 1

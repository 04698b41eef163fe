"""Checkpoints as a state_dict plus what is needed to rebuild the model: never a pickled module.

A pickled ``nn.Module`` breaks when the code moves; a state_dict with its architecture's name and
hyper-parameters loads with ``weights_only=True`` (no arbitrary code runs on load).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imageclf.io import write_with
from imageclf.models import build_model, fold_batchnorm
from imageclf.paths import ProjectPaths


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides weights that defines a trained model."""

    name: str
    width: int
    num_classes: int
    in_channels: int
    image_size: int
    classes: tuple[str, ...]
    mean: float
    std: float
    # True when BatchNorm was folded into the convs (the optimize stage): the weights then
    # belong to the folded layout, so the architecture is built and folded before loading.
    bn_folded: bool = False

    def build(self) -> nn.Module:
        model = build_model(
            self.name,
            self.num_classes,
            self.in_channels,
            self.width,
            self.mean,
            self.std,
            image_size=self.image_size,
        )
        return fold_batchnorm(model) if self.bn_folded else model


def save_checkpoint(
    path: Path, model: nn.Module, spec: ModelSpec, extra: dict[str, Any] | None = None
) -> Path:
    state = {
        "spec": {**asdict(spec), "classes": list(spec.classes)},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    return write_with(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Rebuild the model in eval mode on the CPU; a clear error when the file is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}: run the train stage first (dvc repro train)."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    raw = state["spec"]
    spec = ModelSpec(**{**raw, "classes": tuple(raw["classes"])})
    model = spec.build()
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, spec, state.get("extra", {})


def load_serving_model(paths: ProjectPaths, tta_flip: bool) -> tuple[nn.Module, ModelSpec, Path]:
    """The model as it is exported and served: the optimized checkpoint when the optimize stage
    wrote one (else the trained one) as a :class:`ServingGraph` (scores with flip TTA when
    evaluation uses it, plus the embedding), so that what is served is what was evaluated."""
    from imageclf.models import ServingGraph

    source = (
        paths.optimized_checkpoint if paths.optimized_checkpoint.is_file() else paths.checkpoint
    )
    model, spec, _ = load_checkpoint(source)
    return ServingGraph(model, tta_flip).eval(), spec, source

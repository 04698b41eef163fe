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

from imageclf.errors import InvalidInput
from imageclf.io import archive_bytes, write_bytes
from imageclf.models.ensemble import ensemble
from imageclf.models.zoo import (
    build_model,
    check_channels,
    fold_batchnorm,
    model_contract,
    per_channel,
)
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
    # Per-channel input normalisation baked into the model (one float, from checkpoints written
    # before per-channel statistics, is repeated per channel).
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # True when BatchNorm was folded into the convs (the optimize stage): the weights then
    # belong to the folded layout, so the architecture is built and folded before loading.
    bn_folded: bool = False
    # What the weights started from: "" (random), "imagenet" (weights a package ships), "file"
    # (a local weights file) or "checkpoint" (train.init_from). Never a path: the checkpoint's
    # bytes must not depend on the machine.
    pretrained: str = ""
    # An ensemble of this many models of this architecture (imageclf.models.ensemble), trained
    # from other seeds (train.ensemble); 1: one model. The mean and std above are the first
    # member's: each member's own normalisation is in the weights (Normalize's buffers).
    members: int = 1

    def __post_init__(self) -> None:
        if self.members < 1:
            raise InvalidInput(f"a model has at least one member, not {self.members}")
        check_channels(self.name, self.in_channels)
        object.__setattr__(self, "mean", per_channel(self.mean, self.in_channels, "mean"))
        object.__setattr__(self, "std", per_channel(self.std, self.in_channels, "std"))
        object.__setattr__(self, "classes", tuple(self.classes))

    def build(self) -> nn.Module:
        if self.members > 1:
            model = ensemble([self.build_member() for _ in range(self.members)])
        else:
            model = self.build_member()
        return fold_batchnorm(model) if self.bn_folded else model

    def build_member(self) -> nn.Module:
        """One model of this architecture, unfolded (an ensemble's member before training)."""
        return build_model(
            self.name,
            self.num_classes,
            self.in_channels,
            self.width,
            self.mean,
            self.std,
            image_size=self.image_size,
        )

    def input_contract(self) -> dict[str, Any]:
        """The preprocessing this model expects, for export metadata and serving: the size and
        channels it was trained at, its normalisation (inside the graph), and the size and
        statistics its pretrained weights came with."""
        contract = model_contract(self.name)
        return {
            "size": self.image_size,
            "channels": self.in_channels,
            "color": "RGB" if self.in_channels == 3 else "L",
            "mean": list(self.mean),
            "std": list(self.std),
            "pretrained": self.pretrained,
            "pretrained_size": contract.size if self.pretrained else None,
        }


def save_checkpoint(
    path: Path, model: nn.Module, spec: ModelSpec, extra: dict[str, Any] | None = None
) -> Path:
    """Write the checkpoint atomically; the same weights, spec and ``extra`` give the same bytes.

    ``extra`` is part of the file (and of its DVC hash): keep it to facts about the model (the
    epoch), never run ids, timings or paths, which belong in reports and MLflow."""
    # A single model's spec is written without "members" (1 is the default): checkpoints of
    # one model keep the bytes, and the DVC hash, they had before ensembles existed.
    fields = {k: v for k, v in asdict(spec).items() if not (k == "members" and v == 1)}
    state = {
        "spec": {
            **fields,
            "classes": list(spec.classes),
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        # Derived from the spec; stored for readers without this code (a person, a service).
        "input_contract": spec.input_contract(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    return write_bytes(path, archive_bytes(lambda f: torch.save(state, f)))


def load_checkpoint(path: Path) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Rebuild the model in eval mode on the CPU; a clear error when the file is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}: run the train stage first (dvc repro train)."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    raw = state["spec"]
    spec = ModelSpec(**raw)  # float mean/std (older checkpoints) become per-channel
    model = spec.build()
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, spec, state.get("extra", {})


def load_serving_model(paths: ProjectPaths, views: int) -> tuple[nn.Module, ModelSpec, Path]:
    """The model as it is exported and served: the optimized checkpoint when the optimize stage
    wrote one (else the trained one) as a :class:`ServingGraph` (scores averaged over ``views``
    symmetric views when evaluation uses test-time augmentation, plus the embedding), so that
    what is served is what was evaluated."""
    from imageclf.models.zoo import ServingGraph

    source = (
        paths.optimized_checkpoint if paths.optimized_checkpoint.is_file() else paths.checkpoint
    )
    model, spec, _ = load_checkpoint(source)
    return ServingGraph(model, views).eval(), spec, source


def load_pretrained_features(model: nn.Module, path: Path) -> int:
    """Copy the feature layers of the checkpoint at ``path`` into ``model`` (built by
    ``build_model``): everything except the input normalisation, which belongs to the new
    dataset, and the classifier, which belongs to its classes. Returns the tensors copied.

    Transfer learning with what exists offline: a model this project trained on one dataset
    (Fashion-MNIST) starts another (your ImageFolder). A mismatch in architecture, width or
    input channels is an error that says which, not a silent partial load."""
    source, spec, _ = load_checkpoint(path)
    if spec.bn_folded:
        raise InvalidInput(
            f"{path} has batch norm folded (an optimize output): use models/model.pt."
        )
    if spec.members > 1:
        raise InvalidInput(
            f"{path} is an ensemble of {spec.members} models (train.ensemble): start from one "
            "model's checkpoint (a run without train.ensemble, or --save-models of one run)."
        )
    ours, theirs = model[-1], source[-1]  # nn.Sequential(Normalize, body): the bodies
    classifier = f"{list(ours._modules)[-1]}."
    target_keys = [k for k in ours.state_dict() if not k.startswith(classifier)]
    source_state = theirs.state_dict()
    missing = [k for k in target_keys if k not in source_state]
    wrong = [
        f"{k} {tuple(source_state[k].shape)} vs {tuple(ours.state_dict()[k].shape)}"
        for k in target_keys
        if k in source_state and source_state[k].shape != ours.state_dict()[k].shape
    ]
    if missing or wrong:
        problems = ([f"missing {missing[:3]}"] if missing else []) + wrong[:3]
        raise InvalidInput(
            f"{path} ({spec.name}, width {spec.width}, {spec.in_channels} channel(s)) does not "
            f"fit this model: {'; '.join(problems)}. Use the same train.model, train.width and "
            "image channels as the checkpoint."
        )
    ours.load_state_dict({k: source_state[k] for k in target_keys}, strict=False)
    return len(target_keys)

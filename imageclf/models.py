"""Model zoo: every architecture the project can train, behind one registry.

To add a model, write a function ``(num_classes, in_channels, width, image_size) -> nn.Module``
and decorate it with ``@register("name")``; ``params.yaml`` ``train.model: name`` then trains it
everywhere (DVC stage, Prefect flow, export, serving) with no other change.

Every model starts with :class:`Normalize`, so its input contract is the one of
``imageclf.transforms.to_model_input`` (float32 NCHW in [0, 1]) and an exported ONNX file needs
no side-channel knowledge of dataset statistics.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import torch
from torch import nn

from imageclf.stage import InvalidInput

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def deco(fn: ModelFactory) -> ModelFactory:
        _REGISTRY[name] = fn
        return fn

    return deco


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 1,
    width: int = 32,
    mean: float = 0.5,
    std: float = 0.5,
    image_size: int = 28,
) -> nn.Module:
    """Build a registered model with its input normalization baked in (``image_size``: the
    side of the square input, which position-aware models such as ``vit_tiny`` need)."""
    if name not in _REGISTRY:
        raise InvalidInput(
            f"Unknown model {name!r}; choose one of {available_models()} (params.yaml train.model)."
        )
    body = _REGISTRY[name](
        num_classes=num_classes, in_channels=in_channels, width=width, image_size=image_size
    )
    return nn.Sequential(Normalize(mean, std, in_channels), body)


class Normalize(nn.Module):
    """(x - mean) / std with the dataset's statistics as buffers (saved in the state_dict)."""

    def __init__(self, mean: float, std: float, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, channels, 1, 1), float(mean)))
        self.register_buffer("std", torch.full((1, channels, 1, 1), float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_bn(cin: int, cout: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """3x3 conv without bias (BatchNorm supplies it), BN, optional ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Two 3x3 convs with an identity shortcut (He et al., 2016), for equal in/out shapes."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(channels, channels), conv_bn(channels, channels, relu=False)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.body(x))


@register("simple_cnn")
def simple_cnn(
    num_classes: int, in_channels: int, width: int = 32, image_size: int = 28
) -> nn.Module:
    """The classic two-conv baseline (PyTorch's MNIST example shape): a reference point.

    The classifier's input size comes from ``image_size`` (two 2x2 poolings: ``size // 4`` per
    side), not from ``nn.LazyLinear``: a lazy layer has no weights until a first forward pass, so
    ``.to(memory_format=...)``, the optimizer, ``count_parameters`` and ``load_state_dict`` on a
    fresh model all fail or see nothing, and every caller would need a dry run first."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(2 * width * side * side, 128),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(128, num_classes),
    )


@register("resnet_small")
def resnet_small(
    num_classes: int, in_channels: int, width: int = 32, image_size: int = 28
) -> nn.Module:
    """A small ResNet sized for the FLOP budget of a 2-core CPU.

    Full resolution only for a cheap stem; the work happens at 1/2 and 1/4 resolution, where a
    residual block costs a quarter (then a sixteenth) of what it would at full size.
    """
    w = width
    return nn.Sequential(
        conv_bn(in_channels, w),
        conv_bn(w, 2 * w, stride=2),
        ResidualBlock(2 * w),
        conv_bn(2 * w, 4 * w, stride=2),
        ResidualBlock(4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


@register("vit_tiny")
def vit_tiny(
    num_classes: int, in_channels: int, width: int = 32, image_size: int = 28, patch: int = 4
) -> nn.Module:
    """A small vision transformer: 4x4 patches (49 tokens for 28x28), ``2 * width``-wide tokens,
    4 pre-norm blocks of 4-head self-attention and a GELU MLP, mean-pooled.

    Built from ``imageclf.layers`` (softmax, GELU, RMSNorm and attention written out). It has
    no convolutional prior (locality comes only from the patches and what attention learns),
    so expect it to need more epochs than ``resnet_small``: ``train.model: vit_tiny``."""
    from imageclf.layers import PatchEmbedding, TokenPool, TransformerBlock

    if image_size % patch:
        raise InvalidInput(
            f"vit_tiny needs an image size that is a multiple of its patch size {patch}, got "
            f"{image_size} (data.image_size)."
        )
    dim = 2 * width
    if dim % 4:
        raise InvalidInput(
            f"vit_tiny needs an even train.width (4 heads of 2 * width), got {width}."
        )
    tokens = (image_size // patch) ** 2
    return nn.Sequential(
        PatchEmbedding(in_channels, dim, patch, tokens),
        *(TransformerBlock(dim, heads=4) for _ in range(4)),
        TokenPool(dim),
        nn.Linear(dim, num_classes),
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class FlipTTA(nn.Module):
    """Test-time augmentation inside the graph: average log-probabilities of x and its mirror.

    Baked into the exported model so that what is served is exactly what was evaluated.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x).log_softmax(1) + self.model(x.flip(3)).log_softmax(1)) / 2


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return a copy with every Conv2d -> BatchNorm2d pair (inside a Sequential) folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()

    def visit(module: nn.Module) -> None:
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in itertools.pairwise(names):
                conv, bn = module._modules[first], module._modules[second]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    module._modules[first] = fuse_conv_bn_eval(conv, bn)
                    module._modules[second] = nn.Identity()
        for child in module.children():
            visit(child)

    visit(model)
    return model


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(features, classifier) of a model built by :func:`build_model`.

    The contract every registered architecture keeps: its last module is the classifier, so
    everything before it computes the penultimate features (the embedding monitoring uses).
    """
    if not (
        isinstance(model, nn.Sequential)
        and isinstance(model[-1], nn.Sequential)
        and len(model[-1]) >= 2
    ):
        raise TypeError("expected nn.Sequential(Normalize, nn.Sequential(..., classifier))")
    body = model[-1]
    return nn.Sequential(model[0], *list(body)[:-1]), body[-1]


class ServingGraph(nn.Module):
    """What gets exported: scores for the classes and the penultimate-layer embedding.

    Scores are logits, or with ``tta_flip`` the mean log-probabilities of the image and its
    mirror (so what is served is what was evaluated). The embedding is the un-mirrored image's,
    logged by the service for drift monitoring.
    """

    def __init__(self, model: nn.Module, tta_flip: bool) -> None:
        super().__init__()
        self.features, self.head = split_head(model)
        self.tta_flip = tta_flip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.features(x)
        scores = self.head(embedding)
        if self.tta_flip:
            mirrored = self.head(self.features(x.flip(3)))
            scores = (scores.log_softmax(1) + mirrored.log_softmax(1)) / 2
        return scores, embedding

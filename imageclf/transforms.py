"""Preprocessing shared by training, evaluation, export checks and serving.

The model itself normalizes (see ``imageclf.models.Normalize``), so its input contract is simple:
float32, shape (N, C, H, W), values in [0, 1]. Everything that feeds a model goes through
:func:`prepare_image` (one decoded image -> uint8 HWC array) and :func:`to_model_input`
(uint8 NHWC batch -> that contract). One function each, imported by every caller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # torch is imported lazily: the serving path needs only NumPy
    import torch


def prepare_image(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """Turn any decoded PIL image into the uint8 (size, size, channels) array the model expects.

    Orientation from EXIF is applied, transparency is flattened onto black (the background of
    Fashion-MNIST), colour is converted to the model's channel count, and the image is resized.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
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


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """:func:`to_model_array` as a torch tensor (training, evaluation): one implementation of
    the input contract for every caller, training and serving alike."""
    import torch

    if isinstance(images, torch.Tensor):
        images = images.numpy()  # uint8 CPU tensors share memory with the array: no copy
    return torch.from_numpy(to_model_array(images))


def random_augment(
    batch: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True
) -> torch.Tensor:
    """Random horizontal flip and random translation by up to ``pad`` pixels, on a whole batch.

    Done on the batch tensor, not per image in Python, because per-image transforms cost more
    than the forward pass of a small CNN on a CPU.
    """
    import torch

    n, _, h, w = batch.shape
    if flip:
        flip_mask = torch.rand(n, generator=generator) < 0.5
        batch = torch.where(flip_mask[:, None, None, None], batch.flip(3), batch)
    if pad > 0:
        padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
        rows = (torch.arange(h)[None, :] + dy)[:, None, :, None]
        cols = (torch.arange(w)[None, :] + dx)[:, None, None, :]
        n_idx = torch.arange(n)[:, None, None, None]
        c_idx = torch.arange(batch.shape[1])[None, :, None, None]
        batch = padded[n_idx, c_idx, rows, cols]
    return batch

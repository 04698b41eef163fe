"""What preprocessing and augmentation cost, through the project's own functions: a table.

- decoding + ``prepare_image`` of a 4000x3000 JPEG (a 12-megapixel phone photo), with Pillow's
  ``Image.draft`` (a lazy image, as ``prepare_image`` gets from ``Image.open``) against a full
  decode (the same image ``load()``-ed first, so draft cannot apply);
- the default policy ``[hflip, {translate: 2}]`` on a Fashion-MNIST-sized batch (256 x 28x28),
  as the training Dataset now applies it (uint8, in ``__getitems__``) against the loop of before
  (the float batch after ``to_model_input``);
- the photo policy of ``configs/photos.yaml`` at 96x96 RGB, per image, on one thread (what
  :class:`imageclf.data.transforms.Augmentation` uses) and on torch's default thread count.

    python -m benchmarks.preprocessing

Timings are the minimum over repeats (the machine is shared); no file is written.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from imageclf.data.loaders import InMemoryImages, NumberedBatch
from imageclf.data.store import Split
from imageclf.data.transforms import (
    build_augmentation,
    prepare_image,
    random_augment,
    to_model_input,
)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def phone_photo() -> bytes:
    """A 4000x3000 JPEG of a real photo (scikit-image's cat), upscaled, with sensor-like noise."""
    from skimage import data

    photo = Image.fromarray(data.chelsea()).resize((4000, 3000), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).normal(0, 6, (3000, 4000, 3))
    pixels = np.clip(np.asarray(photo) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def decode_rows(blob: bytes) -> list[str]:
    def drafted(size: int) -> np.ndarray:
        with Image.open(io.BytesIO(blob)) as image:
            return prepare_image(image, size, 3)

    def full(size: int) -> np.ndarray:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
            return prepare_image(image, size, 3)

    rows = []
    for size in (224, 96):
        t_full = best_of(lambda s=size: full(s), 5)
        t_draft = best_of(lambda s=size: drafted(s), 5)
        diff = np.abs(full(size).astype(int) - drafted(size).astype(int)).mean()
        rows.append(
            f"| 4000x3000 JPEG ({len(blob) / 1e6:.1f} MB) -> {size}² | {1000 * t_full:.0f} ms "
            f"| {1000 * t_draft:.0f} ms | {t_full / t_draft:.1f}x | mean diff {diff:.2f}/255 |"
        )
    return rows


def default_policy_row() -> str:
    rng = np.random.default_rng(0)
    split = Split(
        rng.integers(0, 256, (4096, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 4096)
    )
    indices = rng.permutation(4096)[:256]
    generator = torch.Generator().manual_seed(0)
    dataset = InMemoryImages(split, build_augmentation(["hflip", {"translate": 2}], 1, 28))

    def before() -> torch.Tensor:
        batch = to_model_input(torch.from_numpy(split.images)[torch.from_numpy(indices)])
        return random_augment(batch.contiguous(memory_format=torch.channels_last), generator)

    def now() -> torch.Tensor:
        images, _ = dataset.__getitems__(NumberedBatch(0, indices.tolist()))
        return images.contiguous(memory_format=torch.channels_last)

    t_before, t_now = best_of(before, 200), best_of(now, 200)
    return (
        f"| default policy, batch of 256 x 28² (fetch + augment) | {1000 * t_before:.2f} ms "
        f"(before: loop) | {1000 * t_now:.2f} ms (now: loader) | {t_before / t_now:.2f}x | |"
    )


def photo_policy_row() -> str:
    policy = ["hflip", {"random_resized_crop": 0.35}, {"color_jitter": 0.2}]
    augmentation = build_augmentation(policy, 3, 96)
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, (64, 3, 96, 96), dtype=np.uint8))
    generator = torch.Generator().manual_seed(0)
    t_one = best_of(lambda: augmentation(batch, generator), 5)
    per_image = augmentation.stages[-1]  # the torchvision steps, run image by image

    def default_threads() -> torch.Tensor:
        torch.manual_seed(0)
        return torch.stack([per_image.transform(image) for image in batch])

    t_default = best_of(default_threads, 5)
    return (
        f"| photos policy, 96² RGB, per image | {1000 * t_default / 64:.2f} ms "
        f"({torch.get_num_threads()} threads) | {1000 * t_one / 64:.2f} ms (1 thread) "
        f"| {t_default / t_one:.1f}x | |"
    )


def main() -> None:
    print("| what | before / full | now | speedup | |")
    print("|---|---:|---:|---:|---|")
    for row in decode_rows(phone_photo()):
        print(row)
    print(default_policy_row())
    print(photo_policy_row())


if __name__ == "__main__":
    main()

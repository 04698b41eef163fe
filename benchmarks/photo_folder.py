"""Write a photo-like RGB ImageFolder offline: ``<out>/train/<class>/*.jpg``, ``<out>/test/...``.

Each class is one of the real photos scikit-image ships (no download): a cat, coffee, an
astronaut, a rocket, a retina, ... Every image is a random crop of its class's photo at a varying
scale, position and aspect ratio, with colour jitter (hue included, so colour alone does not give
the class away), sometimes grayscale, blurred or mirrored, sometimes with a patch of another
class's photo pasted in, saved at a random size (64-240 px) and JPEG quality. Small crops of one
photo look unlike each other (sky, fur, a wall), so the task needs features, not a colour
histogram: it is what a few thousand photos of a real task look like to a CPU, offline.

    python -m benchmarks.photo_folder /tmp/photos --train-per-class 400 --test-per-class 100
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


def _gray_texture(loader: Callable[[], np.ndarray], tint: tuple[int, int, int]) -> np.ndarray:
    """A grayscale photo as RGB with a tint (the crops' hue jitter then varies it)."""
    gray = loader().astype(np.float32) / 255.0
    return (gray[..., None] * np.asarray(tint, np.float32)).clip(0, 255).astype(np.uint8)


def source_photos() -> dict[str, np.ndarray]:
    """The ten classes: photos bundled in scikit-image's wheel (RGB uint8 HxWx3)."""
    from skimage import data

    return {
        "astronaut": data.astronaut(),
        "brick": _gray_texture(data.brick, (230, 150, 120)),
        "cat": data.chelsea(),
        "coffee": data.coffee(),
        "gravel": _gray_texture(data.gravel, (200, 190, 170)),
        "hubble": data.hubble_deep_field(),
        "immunohistochemistry": data.immunohistochemistry(),
        "motorcycle": data.stereo_motorcycle()[0],
        "retina": data.retina(),
        "rocket": data.rocket(),
    }


def random_crop(photo: Image.Image, rng: np.random.Generator, min_scale: float) -> Image.Image:
    """A crop of ``min_scale``..0.6 of the photo's area, aspect 3:4..4:3, anywhere in it."""
    w, h = photo.size
    area = w * h * rng.uniform(min_scale, 0.6)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
    ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return photo.crop((x, y, x + cw, y + ch))


def jitter_hue(image: Image.Image, shift: float) -> Image.Image:
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(shift * 255)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def make_image(
    photos: list[Image.Image], label: int, rng: np.random.Generator, min_scale: float
) -> bytes:
    """One JPEG of class ``label``."""
    image = random_crop(photos[label], rng, min_scale)
    if rng.random() < 0.3:  # a patch of another class's photo: clutter, as in real photos
        other = photos[int(rng.choice([i for i in range(len(photos)) if i != label]))]
        patch = random_crop(other, rng, 0.01)
        side = max(8, int(min(image.size) * rng.uniform(0.15, 0.35)))
        patch = patch.resize((side, side))
        image.paste(patch, (int(rng.integers(0, image.width - side + 1)),
                            int(rng.integers(0, image.height - side + 1))))  # fmt: skip
    image = jitter_hue(image, rng.uniform(-0.08, 0.08))
    for enhance, low, high in (
        (ImageEnhance.Brightness, 0.65, 1.35),
        (ImageEnhance.Contrast, 0.65, 1.35),
        (ImageEnhance.Color, 0.5, 1.5),
    ):
        image = enhance(image).enhance(rng.uniform(low, high))
    if rng.random() < 0.15:
        image = image.convert("L").convert("RGB")
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = int(rng.integers(64, 241))
    aspect = rng.uniform(0.8, 1.25)
    image = image.resize((side, max(32, int(side * aspect))), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=int(rng.integers(55, 96)))
    return out.getvalue()


def write_photo_folder(
    out: Path,
    train_per_class: int = 400,
    test_per_class: int = 100,
    seed: int = 0,
    min_scale: float = 0.03,
) -> dict[str, int]:
    """Write the folder; returns the number of images per split. Same seed, same bytes."""
    named = source_photos()
    classes = sorted(named)
    photos = [Image.fromarray(named[c]).convert("RGB") for c in classes]
    counts = {}
    for split, per_class, offset in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        rng = np.random.default_rng([seed, offset])
        for label, name in enumerate(classes):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{i:05d}.jpg").write_bytes(make_image(photos, label, rng, min_scale))
        counts[split] = per_class * len(classes)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (train/ and test/ inside)")
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-scale", type=float, default=0.03, help="smallest crop area share")
    args = parser.parse_args()
    counts = write_photo_folder(
        args.out, args.train_per_class, args.test_per_class, args.seed, args.min_scale
    )
    print(f"wrote {counts['train']} train and {counts['test']} test images under {args.out}")


if __name__ == "__main__":
    main()

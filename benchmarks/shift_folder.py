"""Write a harder RGB ImageFolder with a domain shift between its splits, offline.

``<out>/train/<class>/*.{jpg,png}`` and ``<out>/test/...``: the classes are Fashion-MNIST's
items (by default eight: T-shirt, trouser, pullover, dress, sandal, sneaker, bag, ankle boot;
``--classes`` adds shirt and coat for a harder folder), each image one item pasted onto a
natural background. The item's 28x28 grey image is cut to its
bounding box, slightly rotated, upscaled with bicubic interpolation, coloured (a random colour,
sometimes close to the background's for low contrast, or a texture, shaded by the item's own
intensities) and alpha-blended (alpha from the item's intensity) onto a random crop of one of
scikit-image's shipped photos or textures (no download), tinted and hue-jittered. The item's
longer side is 40-90% of the canvas's shorter side (15-40% in 15% of the images), at a random
place; smaller pieces of other items (any class) lie around it as clutter and sometimes over it.
The canvas is 40-200 px on its longer side with an aspect ratio from 1:2 to 2:1, saved as JPEG
(quality 60-95) or PNG. The item always lies inside the canvas's centre square, which the
project's preprocessing keeps (shorter side resized, centre square cropped), so no label is cut
away. Items are never mirrored, so every recipe may use hflip (fashion items are symmetric).

What differs between the splits (the domain shift the test measures):

- backgrounds: train's come from astronaut, coffee, rocket, immunohistochemistry, brick, grass,
  camera, coins, moon and text; test's from chelsea (the cat), hubble_deep_field, retina,
  stereo_motorcycle, gravel, clock, page and cell, photos train never shows (textured items take
  their texture from their own split's photos too);
- items: train draws Fashion-MNIST's training items, test its t10k items (other garments);
- test's canvases are a little smaller (36-160 px instead of 40-200 px) and its JPEGs a little
  worse (quality 50-90 instead of 60-95), as a deployment camera might be.

Fashion-MNIST's IDX files are read from ``--fashion-dir`` (default: the project's fetched copy
under data/raw if it is there, else Debian's /usr/share/datasets/fashion-mnist), gzipped or not.

    python -m benchmarks.shift_folder /tmp/shift --train-per-class 150 --test-per-class 50
    python -m benchmarks.transfer /tmp/shift
"""

from __future__ import annotations

import argparse
import gzip
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from imageclf.data.fashion_mnist import CLASSES, parse_idx

REPO = Path(__file__).resolve().parents[1]
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

# Folder names of Fashion-MNIST's labels 0..9 (the ImageFolder sorts them by name).
FOLDERS = tuple(
    c.lower().replace("-", "").replace("/", "_").replace(" ", "_") for c in CLASSES
)  # tshirt_top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle_boot
# The default classes: all but shirt and coat, the items even a good model confuses with
# T-shirts and pullovers (--classes picks others, e.g. all ten for a harder folder).
DEFAULT_CLASSES = tuple(f for f in FOLDERS if f not in ("shirt", "coat"))

# Photos and textures bundled in scikit-image's wheel (none needs pooch or a download): the
# train split's backgrounds and the test split's, disjoint. A grey one is tinted per crop.
TRAIN_BACKGROUNDS = (
    "astronaut",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "brick",
    "grass",
    "camera",
    "coins",
    "moon",
    "text",
)
TEST_BACKGROUNDS = (
    "chelsea",
    "hubble_deep_field",
    "retina",
    "stereo_motorcycle",
    "gravel",
    "clock",
    "page",
    "cell",
)


@dataclass(frozen=True)
class SplitStyle:
    """What one split's images look like where the splits differ."""

    backgrounds: tuple[str, ...]
    items_file: str  # the IDX prefix whose items the split draws: "train" or "t10k"
    canvas: tuple[int, int]  # the canvas's longer side, smallest and largest
    jpeg_quality: tuple[int, int]


STYLES = {
    "train": SplitStyle(TRAIN_BACKGROUNDS, "train", (40, 200), (60, 95)),
    "test": SplitStyle(TEST_BACKGROUNDS, "t10k", (36, 160), (50, 90)),
}
# The item's longer side over the canvas's shorter side: small (15-35%) in 15% of the
# images, 40-90% in the others.
SMALL, SCALE = 0.15, (0.15, 0.4, 0.9)


def load_background(name: str) -> np.ndarray:
    """One of scikit-image's shipped images as uint8, HxWx3 (colour) or HxW (grey)."""
    from skimage import data

    image = data.stereo_motorcycle()[0] if name == "stereo_motorcycle" else getattr(data, name)()
    return np.ascontiguousarray(image[..., :3] if image.ndim == 3 else image).astype(np.uint8)


def default_fashion_dir() -> Path:
    project = REPO / "data" / "raw"
    return project if (project / "train-images-idx3-ubyte").is_file() else DEBIAN_FASHION


def read_idx(folder: Path, name: str, ndim: int) -> np.ndarray:
    """``folder/name`` (or ``name.gz``) decoded; the checks are the download stage's."""
    plain = folder / name
    if plain.is_file():
        return parse_idx(plain.read_bytes(), ndim, name)
    gz = folder / f"{name}.gz"
    if not gz.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST's {name}(.gz) is not in {folder}: install Debian's "
            "dataset-fashion-mnist, run the download stage, or pass --fashion-dir."
        )
    return parse_idx(gzip.decompress(gz.read_bytes()), ndim, name)


def load_items(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,) of ``train`` or ``t10k``."""
    images = read_idx(folder, f"{prefix}-images-idx3-ubyte", 3)
    labels = read_idx(folder, f"{prefix}-labels-idx1-ubyte", 1)
    return images, labels.astype(np.int64)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour (0..1) of random hue, saturation 0-1 and value 0.25-1."""
    hsv = np.array([[[rng.random(), rng.uniform(0, 1), rng.uniform(0.25, 1.0)]]])
    rgb = Image.fromarray((hsv * 255).astype(np.uint8), "HSV").convert("RGB")
    return np.asarray(rgb, np.float32)[0, 0] / 255.0


def background_crop(
    photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """A crop (3-60% of the photo's area) resized to ``size`` (w, h): float RGB 0..1."""
    h, w = photo.shape[:2]
    tw, th = size
    area = w * h * rng.uniform(0.03, 0.6)
    aspect = tw / th * rng.uniform(0.85, 1.15)
    cw = int(min(w, max(8, round(np.sqrt(area * aspect)))))
    ch = int(min(h, max(8, round(np.sqrt(area / aspect)))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = Image.fromarray(photo[y : y + ch, x : x + cw])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = crop.resize((tw, th), Image.Resampling.BILINEAR)
    if crop.mode == "L":  # a grey texture: tinted with a random colour
        tint = 0.35 + 0.65 * _random_colour(rng)
        grey = np.asarray(crop, np.float32)[..., None] / 255.0
        return np.clip(grey * tint / tint.max() * rng.uniform(0.8, 1.2), 0, 1)
    hsv = np.asarray(crop.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-0.1, 0.1) * 255)) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), np.float32) / 255.0


def render_item(
    item: np.ndarray,
    longer: int,
    rng: np.random.Generator,
    fill: Callable[[tuple[int, int]], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The item (28x28 uint8) cut to its box, rotated, upscaled so its longer side is ``longer``
    px: its RGB (h, w, 3) from ``fill`` shaded by the item's intensities, and its alpha (h, w)."""
    image = Image.fromarray(item)
    image = image.rotate(rng.uniform(-15, 15), Image.Resampling.BICUBIC, expand=True)
    box = image.point(lambda v: 255 if v > 12 else 0).getbbox() or (0, 0, *image.size)
    image = image.crop(box)
    w, h = image.size
    stretch = rng.uniform(0.85, 1.15)  # a slight change of the item's proportions
    w, h = w * stretch, h / stretch
    factor = longer / max(w, h)
    size = (max(2, round(w * factor)), max(2, round(h * factor)))
    value = np.asarray(image.resize(size, Image.Resampling.BICUBIC), np.float32) / 255.0
    shade = value.clip(0, 1) / max(float(value.max()), 0.05)  # a dark item is no fainter
    alpha = np.clip((shade - 0.05) * 6.0, 0, 1)
    rgb = fill(size) * (0.35 + 0.65 * shade[..., None])
    return rgb.clip(0, 1), alpha


def paste(canvas: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, x: int, y: int) -> None:
    """Alpha-blend ``rgb`` onto ``canvas`` at (x, y), clipped to the canvas, in place."""
    h, w = alpha.shape
    ch, cw = canvas.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, cw), min(y + h, ch)
    if x0 >= x1 or y0 >= y1:
        return
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
    region = canvas[y0:y1, x0:x1]
    region[:] = region * (1 - a) + rgb[y0 - y : y1 - y, x0 - x : x1 - x] * a


class ShiftRenderer:
    """Makes one split's images from its items and backgrounds."""

    def __init__(self, style: SplitStyle, items: np.ndarray, labels: np.ndarray) -> None:
        self.style = style
        self.items, self.labels = items, labels
        self.by_class = [np.flatnonzero(labels == c) for c in range(len(FOLDERS))]
        self.photos = [load_background(name) for name in style.backgrounds]

    def fill(self, rng: np.random.Generator, background: np.ndarray) -> Callable:
        """How the item is coloured: a texture, a colour near the background's, or any colour."""
        kind = rng.random()
        if kind < 0.15:
            photo = self.photos[int(rng.integers(len(self.photos)))]
            return lambda size: background_crop(photo, size, rng)
        if kind < 0.23:  # low contrast: close to the background's mean colour
            colour = background.reshape(-1, 3).mean(0) * rng.uniform(0.7, 1.4, 3)
        else:
            colour = _random_colour(rng)
        return lambda size: np.broadcast_to(colour.clip(0, 1), (size[1], size[0], 3))

    def image(self, index: int, rng: np.random.Generator) -> tuple[bytes, str]:
        """One encoded image of item ``index``; returns (bytes, suffix)."""
        style = self.style
        longer = int(rng.integers(style.canvas[0], style.canvas[1] + 1))
        ratio = _log_uniform(rng, 1.0, 2.0)
        shorter = max(20, round(longer / ratio))
        width, height = (longer, shorter) if rng.random() < 0.5 else (shorter, longer)
        photo = self.photos[int(rng.integers(len(self.photos)))]
        canvas = background_crop(photo, (width, height), rng)
        if rng.random() < 0.2:  # an out-of-focus background
            blurred = Image.fromarray((canvas * 255).astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(rng.uniform(1, 3))
            )
            canvas = np.asarray(blurred, np.float32) / 255.0
        canvas = np.ascontiguousarray(canvas, np.float32)

        low, mid, high = SCALE
        share = rng.uniform(low, mid) if rng.random() < SMALL else rng.uniform(mid, high)
        size = max(12, round(shorter * share))

        def clutter(count: int) -> None:  # pieces of random items (any class), smaller
            for _ in range(count):
                other = self.items[int(rng.integers(len(self.items)))]
                x0, y0 = int(rng.integers(0, 15)), int(rng.integers(0, 15))
                piece = other[
                    y0 : y0 + int(rng.integers(10, 16)), x0 : x0 + int(rng.integers(10, 16))
                ]
                if piece.max() < 40:
                    continue
                side = max(4, round(size * rng.uniform(0.2, 0.5)))
                rgb, alpha = render_item(piece, side, rng, self.fill(rng, canvas))
                paste(canvas, rgb, alpha, int(rng.integers(-side // 3, width - side // 2)),
                      int(rng.integers(-side // 3, height - side // 2)))  # fmt: skip

        clutter(int(rng.choice([0, 0, 0, 1, 2])))
        rgb, alpha = render_item(self.items[index], size, rng, self.fill(rng, canvas))
        h, w = alpha.shape
        # Inside the centre square (the part the project's preprocessing keeps).
        left, top = (width - shorter) // 2, (height - shorter) // 2
        x = left + int(rng.integers(0, max(1, shorter - w + 1)))
        y = top + int(rng.integers(0, max(1, shorter - h + 1)))
        paste(canvas, rgb, alpha, x, y)
        if rng.random() < 0.2:  # a piece over the item: occlusion
            clutter(1)
        out = Image.fromarray((canvas * 255).round().astype(np.uint8))
        for enhance, low, high in (
            (ImageEnhance.Brightness, 0.7, 1.3),
            (ImageEnhance.Contrast, 0.6, 1.3),
            (ImageEnhance.Color, 0.6, 1.4),
        ):
            out = enhance(out).enhance(rng.uniform(low, high))
        if rng.random() < 0.1:
            out = out.convert("L").convert("RGB")
        if rng.random() < 0.2:
            out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
        buffer = io.BytesIO()
        if rng.random() < 0.25:
            out.save(buffer, "PNG")
            return buffer.getvalue(), ".png"
        out.save(buffer, "JPEG", quality=int(rng.integers(style.jpeg_quality[0],
                                                          style.jpeg_quality[1] + 1)))  # fmt: skip
        return buffer.getvalue(), ".jpg"


def write_shift_folder(
    out: Path,
    train_per_class: int = 150,
    test_per_class: int = 50,
    seed: int = 0,
    fashion_dir: Path | None = None,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
) -> dict[str, int]:
    """Write the folder of ``classes`` (names in :data:`FOLDERS`); returns the number of
    images per split. Same seed, same bytes."""
    fashion_dir = fashion_dir or default_fashion_dir()
    unknown = sorted(set(classes) - set(FOLDERS))
    if unknown:
        raise ValueError(f"unknown classes {unknown}: pick from {list(FOLDERS)}")
    counts = {}
    for offset, (split, per_class) in enumerate(
        (("train", train_per_class), ("test", test_per_class))
    ):
        style = STYLES[split]
        renderer = ShiftRenderer(style, *load_items(fashion_dir, style.items_file))
        rng = np.random.default_rng([seed, offset])
        for name in classes:
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            pool = renderer.by_class[FOLDERS.index(name)]
            chosen = rng.choice(pool, size=per_class, replace=per_class > len(pool))
            for i, index in enumerate(chosen):
                blob, suffix = renderer.image(int(index), rng)
                (folder / f"{i:05d}{suffix}").write_bytes(blob)
        counts[split] = per_class * len(classes)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (train/ and test/ inside)")
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fashion-dir", type=Path, default=None, help="folder of Fashion-MNIST's IDX files"
    )
    parser.add_argument(
        "--classes",
        nargs="+",
        default=list(DEFAULT_CLASSES),
        help=f"class folders to write, from {', '.join(FOLDERS)} (default: all but shirt, coat)",
    )
    args = parser.parse_args()
    counts = write_shift_folder(
        args.out,
        args.train_per_class,
        args.test_per_class,
        args.seed,
        args.fashion_dir,
        tuple(args.classes),
    )
    print(f"wrote {counts['train']} train and {counts['test']} test images under {args.out}")


if __name__ == "__main__":
    main()

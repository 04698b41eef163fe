"""The near-duplicate rule of the data-quality gate, measured as a classifier.

    python -m benchmarks.near_duplicates [--out reports/near_duplicates.json] [--pairs-png P]

False positives: pairs flagged among images that are all different (the 2,624 ELPV solar cells,
a Fashion-MNIST subset). Recall: planted copies of real images (ELPV cells, Fashion-MNIST,
scikit-image's photos) under each transform, each found or not among its originals; the
target (recall_target) is ELPV and the photos, Fashion-MNIST's 28x28 images are reported apart.
Both go through the gate's own code: :func:`imageclf.data.scan._quality_measures` on the decoded
image and :func:`imageclf.data.quality.near_duplicate_pairs`. The old rule (pHash within 10
bits and 16x16 thumbnails within 12 grey levels) is measured beside it, from the same decode.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from imageclf.data import quality
from imageclf.data.fashion_mnist import parse_idx
from imageclf.data.scan import _quality_measures

FASHION = Path("/usr/share/datasets/fashion-mnist")
OLD_HAMMING, OLD_MEAN_ABS_DIFF, OLD_SIDE = 10, 12.0, 16


def elpv_images(step: int = 1, start: int = 0, stop: int | None = None) -> list[Image.Image]:
    """ELPV's solar cells (``[start:stop:step]`` by name), decoded, from the installed package."""
    import elpv_dataset

    folder = Path(elpv_dataset.__file__).parent / "data" / "images"
    out = []
    for path in sorted(folder.glob("*.png"))[start:stop:step]:
        with Image.open(path) as img:
            out.append(img.copy())
    return out


def fashion_images(n: int) -> list[Image.Image]:
    blob = gzip.decompress((FASHION / "train-images-idx3-ubyte.gz").read_bytes())
    return [Image.fromarray(a) for a in parse_idx(blob, 3, "train images")[:n]]


def photos() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee")]


def _reopen(img: Image.Image, fmt: str, **kw: object) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kw)
    out = Image.open(io.BytesIO(buffer.getvalue()))
    out.load()
    return out


def _crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    box = (round(w * left), round(h * top), w - round(w * right), h - round(h * bottom))
    return img.crop(box)


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg q50": lambda im: _reopen(im.convert("RGB") if im.mode != "L" else im, "JPEG", quality=50),
    "half size": lambda im: im.resize(
        (max(1, im.width // 2), max(1, im.height // 2)), Image.Resampling.BILINEAR
    ),
    "crop 2.5% each side": lambda im: _crop(im, 0.025, 0.025, 0.025, 0.025),
    "crop 5% left": lambda im: _crop(im, 0.05, 0, 0, 0),
    "crop 5% top": lambda im: _crop(im, 0, 0.05, 0, 0),
    "crop 5% left and top": lambda im: _crop(im, 0.05, 0.05, 0, 0),
    "crop 2% left, 3% bottom": lambda im: _crop(im, 0.02, 0, 0, 0.03),
    "brightness +10%": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    "brightness -10%": lambda im: ImageEnhance.Brightness(im).enhance(0.9),
    "saved as PNG": lambda im: _reopen(im, "PNG"),
}


def measure(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pHashes, the gate's thumbnails, and the old rule's 16x16 thumbnails."""
    hashes, thumbs, old = [], [], []
    for img in images:
        facts = _quality_measures(img)
        hashes.append(int(str(facts["phash"]), 16))
        thumbs.append(facts["thumb"])
        small = img.convert("RGB")
        small.thumbnail((128, 128), Image.Resampling.BILINEAR, reducing_gap=2.0)
        old.append(np.asarray(small.convert("L").resize((OLD_SIDE, OLD_SIDE)), dtype=np.uint8))
    return np.asarray(hashes, dtype=np.uint64), np.stack(thumbs), np.stack(old)


def old_pairs(hashes: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
    """The rule before issue 23: pHash within 10 bits and 16x16 thumbnails within 12 levels."""
    i, j = np.triu_indices(len(hashes), 1)
    close = np.bitwise_count(hashes[i] ^ hashes[j]) <= OLD_HAMMING
    i, j = i[close], j[close]
    flat = thumbs.reshape(len(thumbs), -1).astype(np.int16)
    near = np.abs(flat[i] - flat[j]).mean(axis=1) <= OLD_MEAN_ABS_DIFF
    return np.stack([i[near], j[near]], axis=1)


def false_positives(images: list[Image.Image]) -> dict[str, object]:
    hashes, thumbs, old = measure(images)
    start = time.perf_counter()
    new = quality.near_duplicate_pairs(hashes, thumbs)
    seconds = time.perf_counter() - start
    return {
        "images": len(images),
        "new_pairs": new.tolist(),
        "old_pairs": len(old_pairs(hashes, old)),
        "pair_seconds": round(seconds, 2),
    }


def recall(images: list[Image.Image], name: str) -> dict[str, dict[str, float]]:
    base = measure(images)
    n = len(images)
    out = {}
    for label, transform in TRANSFORMS.items():
        copies = measure([transform(im) for im in images])
        both = [np.concatenate([b, c]) for b, c in zip(base, copies, strict=True)]
        found_new = {tuple(p) for p in quality.near_duplicate_pairs(both[0], both[1]).tolist()}
        found_old = {tuple(p) for p in old_pairs(both[0], both[2]).tolist()}
        out[label] = {
            "copies": n,
            "new": sum((i, n + i) in found_new for i in range(n)) / n,
            "old": sum((i, n + i) in found_old for i in range(n)) / n,
        }
        print(f"  {name}: {label}: new {out[label]['new']:.1%} old {out[label]['old']:.1%}")
    return out


def side_by_side(images: list[Image.Image], pairs: list, path: Path, top: int = 6) -> None:
    rows = []
    for i, j in pairs[:top]:
        a = images[i].convert("L").resize((200, 200))
        b = images[j].convert("L").resize((200, 200))
        rows.append(np.hstack([np.asarray(a), np.full((200, 8), 255, np.uint8), np.asarray(b)]))
    if rows:
        Image.fromarray(np.vstack(rows)).save(path)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the measurements as JSON here")
    parser.add_argument("--pairs-png", type=Path, help="save the top flagged pairs side by side")
    parser.add_argument("--fashion", type=int, default=5000, help="Fashion-MNIST train images")
    parser.add_argument("--step", type=int, default=8, help="plant copies of every n-th cell")
    args = parser.parse_args(argv)

    elpv = elpv_images()
    fashion = fashion_images(args.fashion)
    fp = {"elpv": false_positives(elpv), "fashion_mnist": false_positives(fashion)}
    if args.pairs_png:
        side_by_side(elpv, fp["elpv"]["new_pairs"], args.pairs_png)
        side_by_side(
            fashion, fp["fashion_mnist"]["new_pairs"], args.pairs_png.with_suffix(".fashion.png")
        )
    sets = {"elpv": elpv[:: args.step], "fashion_mnist": fashion[:500], "photos": photos()}
    rec = {name: recall(images, name) for name, images in sets.items()}
    # The target: copies of real images (ELPV cells, photos). 28x28 Fashion-MNIST apart: its
    # half-size copy is 14x14 and a q50 JPEG rewrites most of its pixels.
    target = ("elpv", "photos")
    total = {}
    for label in TRANSFORMS:
        copies = sum(rec[s][label]["copies"] for s in target)
        total[label] = {
            rule: sum(rec[s][label][rule] * rec[s][label]["copies"] for s in target) / copies
            for rule in ("new", "old")
        }
    result = {"false_positives": fp, "recall": rec, "recall_target": total}

    print(f"\n{'measure':34s} {'old rule':>10s} {'new rule':>10s}")
    for name, f in fp.items():
        what = f"flagged pairs, {name} ({f['images']})"
        print(
            f"{what:34s} {f['old_pairs']:>10d} {len(f['new_pairs']):>10d}   ({f['pair_seconds']} s)"
        )
    for label, r in total.items():
        per = ", ".join(f"{s} {rec[s][label]['new']:.0%}" for s in target)
        fm = rec["fashion_mnist"][label]
        print(
            f"{'recall, ' + label:34s} {r['old']:>10.1%} {r['new']:>10.1%}   ({per}; "
            f"fashion_mnist old {fm['old']:.0%} new {fm['new']:.0%})"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

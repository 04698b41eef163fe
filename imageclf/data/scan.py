"""One pass over every file of an ImageFolder: decode once, record every fact the gate needs.

Decoding is the expensive part of a folder dataset, so each file is opened exactly once, in a
process pool over the cores, and that one decode gives both the array the store keeps
(through the shared :func:`imageclf.data.transforms.prepare_image`) and the facts the quality
gate judges later (size, pixel hash, perceptual hash, blur and brightness). A file that cannot
be used is not an exception that stops the run: it becomes a row saying what is wrong with it,
so one run lists every bad file.

Perceptual hash: ``imagehash.phash`` (CleanVision's own near-duplicate hash), computed here on the
image already decoded. CleanVision's ``Imagelab`` was tried first: it runs with pandas 3 here, but
it reads every file twice more on its own (9.4 s for 1,000 ~300-pixel JPEGs on 2 idle cores, for
hashes and properties alone; this whole pass, store arrays included, took 6.7 s on one core of
a machine under load), and it calls images near duplicates only when their 64-bit hashes are
identical, which misses resized or recompressed copies a few bits apart and, as a pHash ignores
brightness, groups different images of one layout (see :mod:`imageclf.data.quality`). Blur and
darkness use CleanVision's own per-image measures (``BlurrinessProperty``,
``BrightnessProperty``) on a 128-pixel copy of this decode, and its thresholds, with no second
read.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imageclf.data.store import (
    FILE_TABLE,
    FILE_THUMBS,
    IMAGE_SUFFIXES,
    Split,
    SplitWriter,
    dataset_draft,
    exceeds_budget,
    finish_dataset,
    stratified_fraction,
)
from imageclf.data.transforms import prepare_image
from imageclf.errors import InvalidInput, StageError

# Decoders allowed (EPS/PS would call Ghostscript). Phones' MPO files open through "JPEG".
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
# Pillow's own limit: larger images are decompression bombs, refused before decoding pixels.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
# Side of the grey thumbnail kept per file (4 KiB): near duplicates are looked for and confirmed
# on it (imageclf.data.quality: aligned for crops, then blurred by 2 of its pixels; at 64 pixels
# the marks and grain that tell ELPV's neighbouring cells apart still show).
THUMB_SIDE = 64
# Below this many files a pool costs more to start than it saves.
_SERIAL_BELOW = 48

# The kinds of bad file, in the order a report lists them.
BAD_KINDS = ("empty", "not_image", "unknown_suffix", "truncated", "unreadable", "bomb")


@dataclass(frozen=True)
class FileTask:
    """One file to read: where it is, which split and class it belongs to, the output size."""

    path: str
    split: str
    label: int
    size: int
    channels: int
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class FileFacts:
    """What one decode found; ``problem`` is one of :data:`BAD_KINDS` or ``""`` when usable."""

    path: str
    split: str
    label: int
    problem: str = ""
    detail: str = ""
    bytes: int = 0
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    pixel_sha1: str = ""
    phash: str = ""
    blurriness: float = float("nan")
    blurriness_grayscale_std: float = float("nan")
    brightness_perc_99: float = float("nan")
    thumb: np.ndarray | None = field(default=None, repr=False)
    array: np.ndarray | None = field(default=None, repr=False)

    def row(self) -> dict[str, object]:
        """The facts as a table row (no arrays)."""
        return {k: v for k, v in vars(self).items() if k not in ("thumb", "array")}


def _looks_like_text(blob: bytes) -> bool:
    try:
        blob[:2048].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _classify_error(exc: BaseException) -> tuple[str, str]:
    """(kind, detail) of a decode failure: truncated files say so, the rest are unreadable."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = str(exc).lower()
    if "truncat" in lowered or isinstance(exc, EOFError) or "premature end" in lowered:
        return "truncated", text
    return "unreadable", text


def _quality_measures(image: Image.Image) -> dict[str, object]:
    """pHash, grey thumbnail, and CleanVision's blur and brightness measures of one image."""
    import imagehash
    from cleanvision.issue_managers.image_property import (
        BlurrinessProperty,
        BrightnessProperty,
    )

    small = image.convert("RGB")
    small.thumbnail((128, 128), Image.Resampling.BILINEAR, reducing_gap=2.0)
    blur = BlurrinessProperty().calculate(small)
    bright = BrightnessProperty("dark").calculate(small)
    thumb = np.asarray(
        small.convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR),
        dtype=np.uint8,
    )
    return {
        "phash": str(imagehash.phash(small)),
        "blurriness": float(blur["blurriness"]),
        "blurriness_grayscale_std": float(blur["blurriness_grayscale_std"]),
        "brightness_perc_99": float(bright["brightness_perc_99"]),
        "thumb": thumb,
    }


def inspect_file(task: FileTask) -> FileFacts:
    """Decode one file once; never raises for a bad file, it says what is wrong instead."""
    facts = FileFacts(task.path, task.split, task.label)
    path = Path(task.path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        facts.problem, facts.detail = (
            "unknown_suffix",
            f"suffix {path.suffix or '(none)'!r} is not one of {sorted(IMAGE_SUFFIXES)}",
        )
        return facts
    try:
        blob = path.read_bytes()
    except OSError as exc:
        facts.problem, facts.detail = "unreadable", f"cannot read the file: {exc}"
        return facts
    facts.bytes = len(blob)
    if not blob:
        facts.problem, facts.detail = "empty", "the file is empty (0 bytes)"
        return facts
    try:
        with Image.open(io.BytesIO(blob), formats=FORMATS) as img:
            facts.format, facts.mode = img.format or "", img.mode
            facts.width, facts.height = img.size
            if img.width * img.height > task.max_pixels:
                facts.problem = "bomb"
                facts.detail = (
                    f"{img.width}x{img.height} pixels is over the limit of {task.max_pixels} "
                    "(a decompression bomb, or a photo far larger than training needs)"
                )
                return facts
            if img.format == "JPEG":
                # Decode at 1/2, 1/4 or 1/8 scale when the file is far larger than the store
                # and the checks need (never below 512 px, nor below the model's size): a
                # 12-megapixel phone photo took 36 ms instead of 270 ms here, at 96 px.
                side = max(4 * task.size, 512)
                img.draft(img.mode, (side, side))
            img.load()
            pixels = np.asarray(img)
            facts.pixel_sha1 = hashlib.sha1(
                f"{img.mode}{img.size}".encode() + pixels.tobytes()
            ).hexdigest()
            for key, value in _quality_measures(img).items():
                setattr(facts, key, value)
            facts.array = prepare_image(img, task.size, task.channels)
    except Image.DecompressionBombError as exc:
        facts.problem, facts.detail = "bomb", f"DecompressionBombError: {exc}"
    except Image.UnidentifiedImageError:
        facts.problem = "not_image"
        facts.detail = "not an image Pillow can read" + (
            " (its content is text)" if _looks_like_text(blob) else ""
        )
    except (
        Exception
    ) as exc:  # a corrupt file raises OSError, SyntaxError, ValueError, struct.error...
        facts.problem, facts.detail = _classify_error(exc)
    if facts.problem:
        facts.array = facts.thumb = None
    return facts


def list_imagefolder(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Classes (sorted folder names of ``root/train``) and each split's (file, label) list.

    Every non-hidden file under a class folder is listed, whatever its suffix, so files with
    unknown suffixes are reported instead of silently ignored.
    """
    files: dict[str, list[tuple[Path, int]]] = {}
    classes: list[str] = []
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ImageFolder split {folder} does not exist: expected {root}/train/<class>/ "
                f"and {root}/test/<class>/ image files."
            )
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name[0] != ".")
        if not names:
            raise InvalidInput(
                f"{folder} has no class folders: expected {folder}/<class>/<image files>."
            )
        if split == "train":
            classes = names
        elif names != classes:
            raise InvalidInput(
                f"train and test class folders differ: {classes} vs {names}; every class "
                "needs a folder in both splits."
            )
        files[split] = [
            (path, label)
            for label, name in enumerate(names)
            for path in sorted((folder / name).rglob("*"))
            if path.is_file()
            and not any(part[0] == "." for part in path.relative_to(folder / name).parts)
        ]
        if not files[split]:
            raise InvalidInput(f"{folder} holds no files under its class folders.")
    return classes, files


def worker_count() -> int:
    """Cores this process may use (a container's CPU set, not the host's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def scan(tasks: Sequence[FileTask], workers: int | None = None) -> Iterator[FileFacts]:
    """:func:`inspect_file` over ``tasks``, in order, spread over ``workers`` processes."""
    workers = worker_count() if workers is None else workers
    if workers <= 1 or len(tasks) < _SERIAL_BELOW:
        yield from map(inspect_file, tasks)
        return
    chunk = max(1, min(32, len(tasks) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(inspect_file, tasks, chunksize=chunk)


def describe_bad(rows: list[dict[str, object]]) -> str:
    """Every bad file on its own line: path, class, what is wrong."""
    return "\n".join(
        f"  - {r['path']} (class {r['class']}): {str(r['problem']).replace('_', ' ')}: "
        f"{r['detail']}"
        for r in rows
    )


def _file_tasks(
    files: dict[str, list[tuple[Path, int]]],
    size: int,
    channels: int,
    fraction: float,
    seed: int,
    max_pixels: int,
) -> list[FileTask]:
    """The files to decode: a stratified ``fraction`` of each split, train first, in list order."""
    tasks: list[FileTask] = []
    for split in ("train", "test"):
        labels = np.asarray([label for _, label in files[split]], dtype=np.int64)
        for i in stratified_fraction(labels, fraction, seed):
            path, label = files[split][i]
            tasks.append(FileTask(str(path), split, label, size, channels, max_pixels))
    return tasks


def _decode_into(
    writers: dict[str, SplitWriter],
    tasks: list[FileTask],
    workers: int | None,
    root: Path,
    classes: list[str],
) -> tuple[list[dict[str, object]], np.ndarray]:
    """The one decoding pass: images to their split's writer, a row and a thumbnail per file."""
    rows: list[dict[str, object]] = []
    thumbs = np.zeros((len(tasks), THUMB_SIDE, THUMB_SIDE), dtype=np.uint8)
    for n, facts in enumerate(scan(tasks, workers)):
        row = facts.row()
        row["path"] = Path(facts.path).relative_to(root).as_posix()
        row["class"] = classes[facts.label]
        row["index"] = -1
        if not facts.problem:
            assert facts.array is not None and facts.thumb is not None
            row["index"] = len(writers[facts.split])
            writers[facts.split].add(facts.array, facts.label)
            thumbs[n] = facts.thumb
        rows.append(row)
    return rows, thumbs


def _bad_files(
    rows: list[dict[str, object]], root: Path, on_bad_file: str
) -> list[dict[str, object]]:
    """The unusable files' rows; with on_bad_file "fail", one error that names all of them."""
    bad = [r for r in rows if r["problem"]]
    if bad and on_bad_file == "fail":
        raise StageError(
            f"{len(bad)} of {len(rows)} files under {root} cannot be used as images "
            f"(data.on_bad_file is fail):\n{describe_bad(bad)}\nFix or remove them, or "
            "set data.on_bad_file: skip to leave them out (they are listed in the data "
            "quality report)."
        )
    return bad


def _finish_splits(
    writers: dict[str, SplitWriter],
    rows: list[dict[str, object]],
    bad: list[dict[str, object]],
    root: Path,
) -> dict[str, Split]:
    """Each split's images; a split left with none is an error listing its bad files."""
    splits: dict[str, Split] = {}
    for split, writer in writers.items():
        splits[split] = writer.finish()
        if len(splits[split]) == 0:
            listed_bad = describe_bad([r for r in bad if r["split"] == split])
            raise InvalidInput(
                f"{root / split} has no readable image among its "
                f"{sum(r['split'] == split for r in rows)} files:\n{listed_bad}"
            )
    return splits


def _quality_summary(
    rows: list[dict[str, object]],
    bad: list[dict[str, object]],
    seconds: float,
    workers: int | None,
    on_disk: bool,
) -> dict[str, object]:
    """The pass in numbers for the meta: files used and skipped (by kind), time and workers."""
    kinds = {kind: sum(r["problem"] == kind for r in bad) for kind in BAD_KINDS}
    return {
        "files_scanned": len(rows),
        "files_used": len(rows) - len(bad),
        "files_skipped": len(bad),
        **{f"skipped_{k}": v for k, v in kinds.items()},
        "decode_seconds": round(seconds, 2),
        "decode_workers": workers or worker_count(),
        "images_on_disk": on_disk,
    }


def build_imagefolder_dataset(
    root: Path,
    dest: Path,
    *,
    size: int,
    channels: int,
    fraction: float,
    seed: int,
    on_bad_file: str,
    ram_budget_mb: float,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    listed: tuple[list[str], dict[str, list[tuple[Path, int]]]] | None = None,
    source: dict[str, object] | None = None,
) -> dict[str, object]:
    """Read ``root/{train,test}/<class>/*`` in one pass into the dataset folder ``dest``.

    ``listed`` (class names, each split's (file, label) list, files under ``root``) replaces the
    folder layout for datasets that come with a label file instead (:mod:`imageclf.data.elpv`);
    ``source`` adds to the provenance recorded in the meta (its ``name`` names the dataset).
    Every listed file is decoded once (``fraction`` picks a stratified share of them first).
    Bad files are skipped and recorded (``on_bad_file="skip"``) or make this raise one error
    naming all of them (``"fail"``); either way ``dest`` is replaced only on success. Returns
    the dataset's meta, which records the skipped files and a summary of the pass.
    """
    import time

    import pandas as pd

    classes, files = listed or list_imagefolder(root)
    tasks = _file_tasks(files, size, channels, fraction, seed, max_pixels)
    shape = (size, size, channels)
    on_disk = exceeds_budget(len(tasks), shape, ram_budget_mb)
    started = time.perf_counter()
    with dataset_draft(dest) as tmp:
        writers = {
            split: SplitWriter(tmp, split, sum(t.split == split for t in tasks), shape, on_disk)
            for split in ("train", "test")
        }
        rows, thumbs = _decode_into(writers, tasks, workers, root, classes)
        seconds = time.perf_counter() - started
        bad = _bad_files(rows, root, on_bad_file)
        splits = _finish_splits(writers, rows, bad, root)
        pd.DataFrame(rows).to_csv(tmp / FILE_TABLE, index=False)
        np.save(tmp / FILE_THUMBS, thumbs)
        skipped = [{k: r[k] for k in ("path", "split", "class", "problem", "detail")} for r in bad]
        extra = {
            "name": str((source or {}).get("name", "imagefolder")),
            "classes": classes,
            "fraction": fraction,
            "source": {"imagefolder_root": str(root), **(source or {})},
            "skipped_files": skipped,
            "quality": _quality_summary(rows, bad, seconds, workers, on_disk),
        }
        meta = finish_dataset(
            tmp, splits["train"], splits["test"], extra, "mmap" if on_disk else "memory"
        )
    return meta

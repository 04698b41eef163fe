"""The data-quality findings of a dataset: every problem, named by file and class.

Works on what ``download`` recorded (``files.csv``: one row per source file, from the one decode
of :mod:`imageclf.data.scan`) or, for datasets without files (Fashion-MNIST), on the stored
arrays. The result is two tables a person can read and Great Expectations can check
(:mod:`imageclf.data.validation`): one row per file with a text column per kind of problem (empty
when the file is fine), and one row per class and split with its count and share. A problem's
text names the file, its class and the other files involved, so a failed expectation says what
is wrong instead of "211 rows failed".

Near duplicates: each image is compared with its :data:`NEAR_NEIGHBOURS` nearest others by a
16×16 key of its 64×64 grey thumbnail, one of them cropped in a few ways (:func:`candidate_pairs`),
and with the images whose pHash is within :data:`NEAR_HAMMING` bits. A candidate whose keys
correlate at least :data:`NEAR_MIN_KEY` is aligned for crops of up to :data:`NEAR_MAX_CROP` per
side to a fraction of a pixel, both thumbnails blurred by :data:`NEAR_BLUR` pixels and made
zero-mean and unit-variance (brightness and contrast do not count); it is a near duplicate when
they correlate at least :data:`NEAR_MIN_CORRELATION`. Exact duplicates (same pixel SHA-1) are
found apart from this. Measured (``python -m benchmarks.near_duplicates``,
docs/near-duplicates.md): among ELPV's 2,624 different solar cells the old rule (pHash within 10
bits and 16×16 thumbnails within 12 grey levels) flagged 4,597 pairs and this one 0. The
closest different cells, neighbours of one module or poly cells cut from one ingot (same grain),
correlate up to 0.9982 so measured, hence the strict threshold; a JPEG q50, half-size, 5%-crop
or ±10%-brightness copy of a cell or a photo is found 96-100% of the time. Not found: crops
between the tried ones (2% left and 3% bottom: a few percent) and half-size copies of 28×28
images (Fashion-MNIST: enlarged from 14 pixels, the copy's thumbnail is far blurrier than its
original's, and a blur that evened this out would join similar garments too).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imageclf.data.store import FILE_TABLE, FILE_THUMBS, Dataset

NEAR_HAMMING = 12
# Each image is compared with this many nearest others (and its pHash candidates).
NEAR_NEIGHBOURS = 8
# Candidates are near duplicates when their aligned, blurred thumbnails correlate this much
# (see the module docstring and docs/near-duplicates.md for the measurements).
NEAR_MIN_CORRELATION = 0.9985
# Candidates are aligned only when their keys (:func:`_keys`) correlate this much: every
# JPEG q50, half-size, 5%-crop and brightness copy measured is above 0.982.
NEAR_MIN_KEY = 0.98
# Gaussian blur (sigma, in pixels of the 64-pixel thumbnail) before the comparison.
NEAR_BLUR = 2.0
NEAR_MAX_CROP = 0.06
NEAR_CROP_STEP = 0.015
_FINE_STEP = 0.003
_PROFILE_SIDE = 32
_EDGE = 2
_KEY_SIDE = 16
# Crops (left, right, top, bottom) tried on one image of each pair when looking for candidates:
# a crop within about 1% of one of these is found (measured: 5% left, top, both, 2.5% and 4% each
# side 95-100%; 2% left and 3% bottom 3%, between these it falls below NEAR_MIN_KEY).
_VIRTUAL_CROPS = (
    (0.0, 0.0, 0.0, 0.0),
    (0.05, 0.0, 0.0, 0.0),
    (0.0, 0.05, 0.0, 0.0),
    (0.0, 0.0, 0.05, 0.0),
    (0.0, 0.0, 0.0, 0.05),
    (0.025, 0.025, 0.025, 0.025),
    (0.05, 0.0, 0.05, 0.0),
    (0.0, 0.05, 0.05, 0.0),
    (0.05, 0.0, 0.0, 0.05),
    (0.0, 0.05, 0.0, 0.05),
    (0.04, 0.04, 0.04, 0.04),
)
# Text columns of the per-file table, each one kind of problem; the first ones fail the gate.
PROBLEM_COLUMNS = (
    "label_conflict",
    "train_test_leak",
    "duplicate",
    "bad_file",
    "tiny",
    "odd_aspect",
    "blurry",
    "dark",
)
# Text columns of the per-class table.
CLASS_COLUMNS = ("imbalance", "test_imbalance", "too_few")
# CleanVision's default thresholds for its blur and darkness scores (Imagelab's defaults).
BLURRY = {"threshold": 0.29, "normalizing_factor": 0.01, "color_threshold": 0.18}
DARK_THRESHOLD = 0.32


@dataclass
class DuplicateGroup:
    """Files showing the same image: exactly (same decoded pixels) or nearly."""

    kind: str  # "exact" or "near"
    members: list[dict[str, Any]]  # file, split, class

    @property
    def classes(self) -> list[str]:
        return sorted({m["class"] for m in self.members})

    @property
    def splits(self) -> set[str]:
        return {m["split"] for m in self.members}

    @property
    def conflict(self) -> bool:
        return len(self.classes) > 1

    @property
    def leak(self) -> bool:
        return self.splits == {"train", "test"}


@dataclass
class Findings:
    """Every problem found: per-file and per-class tables, duplicate groups, counts."""

    files: pd.DataFrame
    classes: pd.DataFrame
    groups: list[DuplicateGroup] = field(default_factory=list)
    root: Path | None = None

    def counts(self) -> dict[str, int]:
        """How many files have each kind of problem, and how many classes are imbalanced."""
        out = {col: int(self.files[col].notna().sum()) for col in PROBLEM_COLUMNS}
        out["duplicate_groups"] = len(self.groups)
        out["label_conflict_groups"] = sum(g.conflict for g in self.groups)
        out["imbalanced_classes"] = int(self.classes["imbalance"].notna().sum())
        out["imbalanced_test_classes"] = int(self.classes["test_imbalance"].notna().sum())
        out["too_few_images"] = int(self.classes["too_few"].notna().sum())
        out["files"] = len(self.files)
        return out


def _name(row: dict[str, Any]) -> str:
    return f"{row['file']} ({row['class']})"


def _union_find_groups(n: int, pairs: np.ndarray) -> list[list[int]]:
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _interpolation(lo: np.ndarray, hi: np.ndarray, n_out: int, n_in: int) -> np.ndarray:
    """(k, n_out, n_in) linear-interpolation matrices sampling the span ``[lo, hi]`` (fractions
    of an axis of ``n_in`` pixels) at ``n_out`` evenly spaced pixel centres."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    u = lo[:, None] + (np.arange(n_out) + 0.5) / n_out * (hi - lo)[:, None]
    x = np.clip(u * n_in - 0.5, 0, n_in - 1)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (x - i0).astype(np.float32)
    m = np.zeros((len(lo), n_out, n_in), dtype=np.float32)
    k, j = np.indices(i0.shape)
    # Each (k, j) has one i0 and one i1 (equal only at the clipped end, where w is 0): no
    # repeated index within one assignment, so plain fancy indexing is exact (np.add.at is slow).
    m[k, j, i1] = w
    m[k, j, i0] += 1 - w
    return m


def _spans(x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, ...]:
    """Where the common part of two images lies on one axis, in each image's own fractions,
    when the second image shows the span ``[x0, x1]`` of the first (a crop when inside)."""
    lo, hi = np.maximum(0.0, x0), np.minimum(1.0, x1)
    return lo, hi, (lo - x0) / (x1 - x0), (hi - x0) / (x1 - x0)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows with zero mean and unit length (brightness and contrast no longer matter)."""
    x = x - x.mean(axis=-1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _windows(step: float, span: float) -> np.ndarray:
    """(k, 2) windows ``[x0, x1]`` moving each end of an axis by up to ``span``, by ``step``."""
    offsets = np.round(np.arange(-span, span + 1e-9, step), 6)
    return np.array([(a, 1.0 + b) for a in offsets for b in offsets])


_COARSE = _windows(NEAR_CROP_STEP, NEAR_MAX_CROP)
# Refinement around the coarse window: a 1.5% step is a pixel of a 64-pixel thumbnail, and
# a pixel of misalignment costs busbars and grain more correlation than a JPEG q50 copy does.
_FINE = _windows(_FINE_STEP, NEAR_CROP_STEP * 0.6) - np.array([0.0, 1.0])


def _profile_scores(pa: np.ndarray, pb: np.ndarray, windows: np.ndarray, side: int) -> np.ndarray:
    """(n, k) correlations of profiles ``pa[i]`` and ``pb[i]`` over the common part of each of
    pair i's ``windows[i]`` (n, k, 2), each part resampled to ``side`` points."""
    lo, hi, blo, bhi = _spans(windows[..., 0], windows[..., 1])
    ra, rb = _sample(pa, lo, hi, side), _sample(pb, blo, bhi, side)
    return np.einsum("nkj,nkj->nk", _unit(ra), _unit(rb))


def _sample(p: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_out: int) -> np.ndarray:
    """(n, k, n_out) linear samples of profiles ``p`` (n, m) over the spans ``[lo, hi]`` (n or
    1, k): what :func:`_interpolation` does, by indexing (no matrix per window)."""
    m = p.shape[1]
    lo, hi = lo.astype(np.float32), hi.astype(np.float32)
    u = lo[..., None] + (np.arange(n_out, dtype=np.float32) + 0.5) / n_out * (hi - lo)[..., None]
    x = np.clip(u * m - 0.5, 0, m - 1)
    i0 = np.floor(x).astype(np.int64)
    w = (x - i0).astype(np.float32)
    flat, at = p.ravel(), np.arange(len(p))[:, None, None] * m + i0  # np.take: fast gathers
    return flat.take(at) * (1 - w) + flat.take(np.minimum(at + 1, at - i0 + m - 1)) * w


def _align_axis(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """(n, 2) window ``[x0, x1]`` of ``pa``'s axis that ``pb`` shows, from the profiles: the
    best of a coarse grid (:data:`NEAR_CROP_STEP`), then of a fine one around it."""
    n = len(pa)
    coarse = _profile_scores(pa, pb, _COARSE[None], _PROFILE_SIDE)
    fine = _COARSE[coarse.argmax(axis=1)][:, None, :] + _FINE[None]
    return fine[np.arange(n), _profile_scores(pa, pb, fine, pa.shape[1]).argmax(axis=1)]


def _resample(a: np.ndarray, wx: np.ndarray | None, wy: np.ndarray | None) -> np.ndarray:
    """Thumbnails ``a`` (n, side, side) resampled to the x and y spans (n, 2) given (or kept)."""
    side = a.shape[1]
    if wy is not None:
        a = _interpolation(wy[:, 0], wy[:, 1], side, side) @ a
    if wx is not None:
        a = a @ _interpolation(wx[:, 0], wx[:, 1], side, side).transpose(0, 2, 1)
    return a


def _align(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
    """The common part of each pair, on each image: x and y spans (n, 2) of ``a`` and ``b``.

    Each axis is aligned from row or column means; then x again on the rows the pair shares
    and y on the columns it shares (a crop at the top changes the column means of a cell with
    cut corners, enough to misplace x by a pixel otherwise).
    """
    wx, wy = (
        _align_axis(a.mean(axis=1), b.mean(axis=1)),
        _align_axis(a.mean(axis=2), b.mean(axis=2)),
    )
    ly, hy, bly, bhy = _spans(wy[:, 0], wy[:, 1])
    ya, yb = np.stack([ly, hy], 1), np.stack([bly, bhy], 1)
    wx = _align_axis(_resample(a, None, ya).mean(axis=1), _resample(b, None, yb).mean(axis=1))
    lx, hx, blx, bhx = _spans(wx[:, 0], wx[:, 1])
    xa, xb = np.stack([lx, hx], 1), np.stack([blx, bhx], 1)
    wy = _align_axis(_resample(a, xa, None).mean(axis=2), _resample(b, xb, None).mean(axis=2))
    ly, hy, bly, bhy = _spans(wy[:, 0], wy[:, 1])
    return xa, np.stack([ly, hy], 1), xb, np.stack([bly, bhy], 1)


def _blur_matrix(side: int, sigma: float) -> np.ndarray:
    """(side, side) Gaussian blur along one axis, rows summing to 1 (edges renormalised)."""
    d = np.arange(side)[:, None] - np.arange(side)[None, :]
    g = np.exp(-0.5 * (d / sigma) ** 2)
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def thumb_correlation(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Correlation of grey thumbnails ``first[i]`` and ``second[i]`` once aligned and blurred.

    The pair is aligned for crops of up to :data:`NEAR_MAX_CROP` per side (to a fraction of a
    pixel, :func:`_align`), the common part of each resampled to the full side, both blurred
    by :data:`NEAR_BLUR` pixels (JPEG blocks, resampling and the last bit of misalignment are
    finer than that; the busbars, marks and grain that tell ELPV's cells apart are not) and
    compared whole, edges left out, zero-mean and unit-variance.
    """
    a, b = first.astype(np.float32), second.astype(np.float32)
    n, side = a.shape[:2]
    xa, ya, xb, yb = _align(a, b)
    g = _blur_matrix(side, NEAR_BLUR)
    m = _EDGE
    wa = (g @ _resample(a, xa, ya) @ g.T)[:, m:-m, m:-m].reshape(n, -1)
    wb = (g @ _resample(b, xb, yb) @ g.T)[:, m:-m, m:-m].reshape(n, -1)
    return np.einsum("ij,ij->i", _unit(wa), _unit(wb))


def _keys(thumbs: np.ndarray, crop: tuple[float, float, float, float]) -> np.ndarray:
    """(n, KEY²) unit vectors of the ``crop`` (left, right, top, bottom fractions) of each
    thumbnail, as :data:`_KEY_SIDE`² block means (coarse: a few pixels of shift do not count)."""
    n, side = thumbs.shape[:2]
    left, right, top, bottom = crop
    wx = np.broadcast_to([left, 1.0 - right], (n, 2))
    wy = np.broadcast_to([top, 1.0 - bottom], (n, 2))
    a = _resample(thumbs.astype(np.float32), wx, wy)
    f = side // _KEY_SIDE
    return _unit(a.reshape(n, _KEY_SIDE, f, _KEY_SIDE, f).mean(axis=(2, 4)).reshape(n, -1))


def candidate_pairs(thumbs: np.ndarray, k: int = NEAR_NEIGHBOURS) -> np.ndarray:
    """(m, 2) sorted index pairs: each image with its ``k`` nearest others, exactly (chunked
    matrix products: 11 N² comparisons of 256-long keys; 3 s for ELPV's 2,624 images on two
    busy cores, and N² grows: 100,000 images would take tens of minutes).

    Nearest by the best cosine over :data:`_VIRTUAL_CROPS` of one image against the other
    whole: a crop of a cell shifts its busbars and moves its borders, which puts its original
    behind hundreds of other cells of the same layout in a plain comparison (and a pHash: only
    64-72% of 5% crops are within 10 bits of their original).
    """
    n = len(thumbs)
    base = _keys(thumbs, (0.0, 0.0, 0.0, 0.0))
    crops = [_keys(thumbs, c) for c in _VIRTUAL_CROPS]
    k = min(k, n - 1)
    found = []
    for start in range(0, n, 512):
        rows = np.arange(start, min(start + 512, n))
        scores = np.max([c[rows] @ base.T for c in crops], axis=0)
        scores[np.arange(len(rows)), rows] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        found.append(np.stack([np.repeat(rows, k), top.ravel()], axis=1))
    pairs = np.sort(np.concatenate(found), axis=1)
    return np.unique(pairs, axis=0)


def _hash_candidates(hashes: np.ndarray) -> np.ndarray:
    """(m, 2) pairs of 64-bit hashes at most :data:`NEAR_HAMMING` bits apart, by banding: such
    hashes agree exactly on one of ``NEAR_HAMMING + 1`` bands (pigeonhole)."""
    n = len(hashes)
    bands = NEAR_HAMMING + 1
    width = -(-64 // bands)
    found: set[tuple[int, int]] = set()
    for b in range(bands):
        key = (hashes >> np.uint64(b * width)) & np.uint64((1 << width) - 1)
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        offset = 1
        while offset < n:
            same = sorted_key[offset:] == sorted_key[:-offset]
            if not same.any():
                break
            a, c = order[:-offset][same], order[offset:][same]
            close = np.bitwise_count(hashes[a] ^ hashes[c]) <= NEAR_HAMMING
            low, high = np.minimum(a, c)[close], np.maximum(a, c)[close]
            found.update(zip(low.tolist(), high.tolist(), strict=True))
            offset += 1
    return np.asarray(sorted(found), dtype=np.int64).reshape(-1, 2)


def near_duplicate_pairs(hashes: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
    """(k, 2) index pairs of near duplicates among images with 64-bit ``hashes`` and grey
    ``thumbs``.

    Candidates: each image's :data:`NEAR_NEIGHBOURS` nearest thumbnails
    (:func:`candidate_pairs`, which finds crops) and pHashes within :data:`NEAR_HAMMING` bits.
    Those whose keys correlate at least :data:`NEAR_MIN_KEY` are near duplicates when
    :func:`thumb_correlation` is at least
    :data:`NEAR_MIN_CORRELATION`.
    """
    if len(hashes) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    both = np.concatenate([candidate_pairs(thumbs), _hash_candidates(hashes)])
    candidates = np.unique(both, axis=0)
    # The alignment is the costly part (about 10 ms a pair): only close keys are worth it.
    keys = [_keys(thumbs, c) for c in _VIRTUAL_CROPS]
    i, j = candidates[:, 0], candidates[:, 1]
    close = np.max(
        [(c[i] * keys[0][j]).sum(axis=1) for c in keys]
        + [(c[j] * keys[0][i]).sum(axis=1) for c in keys],
        axis=0,
    )
    candidates = candidates[close >= NEAR_MIN_KEY]
    keep = np.zeros(len(candidates), dtype=bool)
    for start in range(0, len(candidates), 512):
        chunk = candidates[start : start + 512]
        keep[start : start + 512] = (
            thumb_correlation(thumbs[chunk[:, 0]], thumbs[chunk[:, 1]]) >= NEAR_MIN_CORRELATION
        )
    return candidates[keep]


def _files_from_arrays(dataset: Dataset) -> tuple[pd.DataFrame, np.ndarray | None]:
    """A per-image table for datasets without source files (named ``train[12]``)."""
    frames = []
    for split_name, split in (("train", dataset.train), ("test", dataset.test)):
        hashes = [
            hashlib.sha1(np.ascontiguousarray(split.images[i]).tobytes()).hexdigest()
            for i in range(len(split))
        ]
        frames.append(
            pd.DataFrame(
                {
                    "file": [f"{split_name}[{i}]" for i in range(len(split))],
                    "split": split_name,
                    "label": split.labels,
                    "pixel_sha1": hashes,
                    "problem": "",
                    "detail": "",
                    "index": np.arange(len(split)),
                }
            )
        )
    table = pd.concat(frames, ignore_index=True)
    names = dataset.classes
    table["class"] = [names[k] if 0 <= k < len(names) else f"label {k}" for k in table["label"]]
    return table, None


def read_file_table(folder: Path) -> tuple[pd.DataFrame, np.ndarray] | None:
    """``files.csv`` and its thumbnails, or None for datasets read from arrays."""
    if not (folder / FILE_TABLE).is_file():
        return None
    table = pd.read_csv(
        folder / FILE_TABLE,
        keep_default_na=False,
        na_values=[""],
        dtype={"problem": str, "detail": str, "phash": str, "pixel_sha1": str, "path": str},
    )
    table = table.rename(columns={"path": "file"})
    table["problem"] = table["problem"].fillna("")
    table["detail"] = table["detail"].fillna("")
    return table, np.load(folder / FILE_THUMBS)


def _duplicate_groups(table: pd.DataFrame, thumbs: np.ndarray | None, near: bool) -> list:
    ok = np.flatnonzero((table["problem"] == "").to_numpy())
    pairs = []
    sha = table["pixel_sha1"].to_numpy()[ok]
    order = np.argsort(sha, kind="stable")
    same = sha[order][1:] == sha[order][:-1]
    pairs.append(np.stack([order[:-1][same], order[1:][same]], axis=1))
    if near and thumbs is not None and "phash" in table:
        hashes = np.asarray([int(h, 16) for h in table["phash"].to_numpy()[ok]], dtype=np.uint64)
        pairs.append(near_duplicate_pairs(hashes, thumbs[ok]))
    local = _union_find_groups(len(ok), np.concatenate(pairs))
    groups = []
    records = table.iloc[ok][["file", "split", "class", "pixel_sha1"]].to_dict("records")
    for members in local:
        rows = [records[i] for i in members]
        kind = "exact" if len({r["pixel_sha1"] for r in rows}) == 1 else "near"
        rows = [
            {k: r[k] for k in ("file", "split", "class")} | {"row": int(ok[i])}
            for r, i in zip(rows, members, strict=True)
        ]
        groups.append(DuplicateGroup(kind, rows))
    return groups


def _class_table(table: pd.DataFrame, classes: list[str], cfg: Any) -> pd.DataFrame:
    used = table[table["problem"] == ""]
    k = len(classes)
    rows = []
    for split in ("train", "test"):
        counts = used.loc[used["split"] == split, "class"].value_counts()
        n = int(counts.sum())
        for name in classes:
            count = int(counts.get(name, 0))
            share = count / n if n else 0.0
            imbalance = too_few = None
            ratio = share * k
            limit = cfg.max_class_share_ratio
            if n and not 1 / limit <= ratio <= limit:
                imbalance = (
                    f"{name}: {count} {split} image{'' if count == 1 else 's'}, {share:.1%} of "
                    f"{split}, {ratio:.1f}x the uniform {1 / k:.1%} "
                    f"({'under' if ratio < 1 else 'over'}-represented)"
                )
            # Too small to learn from (train) or to measure (test): the one class problem that
            # fails the gate, so it says what it needs.
            need = getattr(cfg, f"min_{split}_images_per_class")
            if count < need:
                too_few = (
                    f"{name}: {count} {split} image{'' if count == 1 else 's'}, needs at least "
                    f"{need} to be {'learned' if split == 'train' else 'tested'} "
                    f"(validate.min_{split}_images_per_class)"
                )
            rows.append(
                {
                    "split": split,
                    "class": name,
                    "count": count,
                    "share": share,
                    "expected_share": 1 / k,
                    # Both are warnings: train.class_balance corrects train imbalance, and
                    # evaluate's balanced accuracy sees through test imbalance.
                    "imbalance": imbalance if split == "train" else None,
                    "test_imbalance": imbalance if split == "test" else None,
                    "too_few": too_few,
                }
            )
    return pd.DataFrame(rows)


def _cleanvision_flags(table: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """CleanVision's blurry and dark verdicts from the raw measures ``scan`` recorded."""
    from cleanvision.issue_managers.image_property import BlurrinessProperty, BrightnessProperty

    index = table.index[table["problem"] == ""]
    raw = table.loc[index, ["blurriness", "blurriness_grayscale_std", "brightness_perc_99"]]
    blur = BlurrinessProperty().get_scores(
        raw,
        "blurry",
        normalizing_factor=BLURRY["normalizing_factor"],
        color_threshold=BLURRY["color_threshold"],
    )["blurry_score"]
    dark = BrightnessProperty("dark").get_scores(raw, "dark")["dark_score"]
    return blur[blur < BLURRY["threshold"]], dark[dark < DARK_THRESHOLD]


def assess(dataset: Dataset, folder: Path | None, cfg: Any) -> Findings:
    """Every problem of the dataset in ``folder`` under the thresholds of ``cfg``
    (:class:`imageclf.config.ValidateParams`)."""
    recorded = read_file_table(folder) if folder is not None else None
    if recorded is None:
        table, thumbs = _files_from_arrays(dataset)
        root = None
    else:
        table, thumbs = recorded
        source = dataset.meta.get("source", {}).get("imagefolder_root")
        root = Path(source) if source else None
    for col in PROBLEM_COLUMNS:
        table[col] = pd.Series([None] * len(table), dtype=object)
    groups = _duplicate_groups(table, thumbs, cfg.near_duplicates)
    for group in groups:
        names = [_name(m) for m in group.members]
        for m in group.members:
            others = ", ".join(n for n in names if n != _name(m))
            if group.conflict:
                table.at[m["row"], "label_conflict"] = (
                    f"{_name(m)} is the same image ({group.kind}) as {others}: one image, "
                    f"{len(group.classes)} labels ({', '.join(group.classes)})"
                )
            if group.leak and m["split"] == "test":
                in_train = ", ".join(_name(o) for o in group.members if o["split"] == "train")
                table.at[m["row"], "train_test_leak"] = (
                    f"{_name(m)} is also in train ({group.kind} duplicate): {in_train}"
                )
        seen: dict[str, str] = {}
        for m in group.members:
            if m["split"] in seen:
                table.at[m["row"], "duplicate"] = (
                    f"{_name(m)} is {'an' if group.kind == 'exact' else 'a'} {group.kind} "
                    f"duplicate of {seen[m['split']]}"
                )
            else:
                seen[m["split"]] = _name(m)
    bad = table["problem"] != ""
    table.loc[bad, "bad_file"] = [
        f"{f} ({c}): {p.replace('_', ' ')}: {d}"
        for f, c, p, d in table.loc[bad, ["file", "class", "problem", "detail"]].itertuples(
            index=False
        )
    ]
    if recorded is not None:
        ok = table[~bad]
        short = ok[["width", "height"]].min(axis=1)
        ratio = ok[["width", "height"]].max(axis=1) / short.clip(lower=1)
        for i in ok.index[short < cfg.min_image_side]:
            table.at[i, "tiny"] = (
                f"{_name(table.loc[i])}: {table.at[i, 'width']}x{table.at[i, 'height']} pixels, "
                f"shorter side under validate.min_image_side ({cfg.min_image_side})"
            )
        for i in ok.index[ratio > cfg.max_aspect_ratio]:
            table.at[i, "odd_aspect"] = (
                f"{_name(table.loc[i])}: {table.at[i, 'width']}x{table.at[i, 'height']} pixels, "
                f"aspect ratio {ratio[i]:.1f} over validate.max_aspect_ratio "
                f"({cfg.max_aspect_ratio})"
            )
        blurry, dark = _cleanvision_flags(table)
        for i, score in blurry.items():
            table.at[i, "blurry"] = f"{_name(table.loc[i])}: blurry (CleanVision score {score:.2f})"
        for i, score in dark.items():
            table.at[i, "dark"] = f"{_name(table.loc[i])}: dark (CleanVision score {score:.2f})"
    classes = _class_table(table, dataset.classes, cfg)
    return Findings(table, classes, groups, root)

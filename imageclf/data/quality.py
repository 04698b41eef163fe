"""The data-quality findings of a dataset: every problem, named by file and class.

Works on what ``download`` recorded (``files.csv``: one row per source file, from the one decode
of :mod:`imageclf.data.scan`) or, for datasets without files (Fashion-MNIST), on the stored
arrays. The result is two tables a person can read and Great Expectations can check
(:mod:`imageclf.data.validation`): one row per file with a text column per kind of problem (empty
when the file is fine), and one row per class and split with its count and share. A problem's
text names the file, its class and the other files involved, so a failed expectation says what
is wrong instead of "211 rows failed".

Near duplicates: two images whose 64-bit pHashes differ in at most :data:`NEAR_HAMMING` bits
(the candidates) and whose 64×64 grey thumbnails, made zero-mean and unit-variance (brightness
and contrast do not count) and aligned for crops of up to :data:`NEAR_MAX_CROP` per side,
correlate at least :data:`NEAR_MIN_CORRELATION`. Exact duplicates (same pixel SHA-1) are found
apart from this. Measured (``python -m benchmarks.near_duplicates``, docs/near-duplicates.md):
among ELPV's 2,624 different solar cells the old rule (pHash within 10 bits and
16×16 thumbnails within 12 grey levels) flagged 4,597 pairs and this one 0; among 5,000
Fashion-MNIST images 2,421 and 1. Neighbouring cells of one ELPV module correlate up to 0.998
(same busbars, same process marks), hence the strict threshold. Copies found: JPEG q50 98% and
half size 100% of ELPV cells and of scikit-image's photos, brightness ±10% 95-100%, a re-saved
PNG 100%. Not found: most 2.5-5% crops (the aligned correlation of a crop is 0.95-0.99, below
that of different neighbouring cells), and JPEG q50 or halved copies of 28×28 images.
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
# Candidates closer than NEAR_HAMMING are near duplicates when their grey thumbnails, aligned for
# crops, correlate at least this much (see the module docstring for the measurements).
NEAR_MIN_CORRELATION = 0.999
# Candidates must correlate this much before alignment is tried (it is the expensive part).
NEAR_MIN_PROFILE = 0.99
NEAR_MAX_CROP = 0.06
NEAR_CROP_STEP = 0.015
_PROFILE_SIDE = 24
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
    np.add.at(m, (k, j, i0), 1 - w)
    np.add.at(m, (k, j, i1), w)
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


_OFFSETS = np.round(np.arange(-NEAR_MAX_CROP, NEAR_MAX_CROP + 1e-9, NEAR_CROP_STEP), 6)
# Every window of the search, on one axis: the second image shows [x0, x1] of the first.
_WINDOWS = np.array([(a, 1.0 + b) for a in _OFFSETS for b in _OFFSETS])


def thumb_correlation(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The best correlation of grey thumbnails ``first[i]`` and ``second[i]`` over small crops.

    Each axis is aligned on its own from the pair's row and column means (a crop of up to
    :data:`NEAR_MAX_CROP` of the side, on either side, of either image, in steps of
    :data:`NEAR_CROP_STEP`); the common part of both thumbnails is then resampled and
    compared whole. Returns the larger of that and the plain, unaligned correlation.
    """
    a = first.astype(np.float32)
    b = second.astype(np.float32)
    n, side = a.shape[0], a.shape[1]
    plain = np.einsum("ij,ij->i", _unit(a.reshape(n, -1)), _unit(b.reshape(n, -1)))
    lo, hi, blo, bhi = _spans(_WINDOWS[:, 0], _WINDOWS[:, 1])
    short = _PROFILE_SIDE
    grid_a = _interpolation(lo, hi, short, side).reshape(-1, side)
    grid_b = _interpolation(blo, bhi, short, side).reshape(-1, side)
    best, score = [], np.ones(n, dtype=np.float32)
    for axis in (1, 2):  # column means align x, row means align y
        pa = (a.mean(axis=axis) @ grid_a.T).reshape(n, len(_WINDOWS), short)
        pb = (b.mean(axis=axis) @ grid_b.T).reshape(n, len(_WINDOWS), short)
        scores = np.einsum("nkj,nkj->nk", _unit(pa), _unit(pb))
        best.append(scores.argmax(axis=1))
        score = np.minimum(score, scores.max(axis=1))
    # Only pairs whose row and column means match after alignment are worth resampling.
    todo = np.flatnonzero((plain < NEAR_MIN_CORRELATION) & (score >= NEAR_MIN_PROFILE))
    aligned = np.full(n, -1.0, dtype=np.float32)
    if len(todo):
        kx, ky = best[0][todo], best[1][todo]
        lx, hx, blx, bhx = _spans(_WINDOWS[kx, 0], _WINDOWS[kx, 1])
        ly, hy, bly, bhy = _spans(_WINDOWS[ky, 0], _WINDOWS[ky, 1])
        wa = _interpolation(ly, hy, side, side) @ a[todo]
        wa = wa @ _interpolation(lx, hx, side, side).transpose(0, 2, 1)
        wb = _interpolation(bly, bhy, side, side) @ b[todo]
        wb = wb @ _interpolation(blx, bhx, side, side).transpose(0, 2, 1)
        m = len(todo)
        aligned[todo] = np.einsum("ij,ij->i", _unit(wa.reshape(m, -1)), _unit(wb.reshape(m, -1)))
    return np.maximum(plain, aligned)


def near_duplicate_pairs(hashes: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
    """(k, 2) index pairs of near duplicates among 64-bit ``hashes`` with grey ``thumbs``.

    Candidates come from banding: two hashes at most :data:`NEAR_HAMMING` bits apart agree
    exactly on at least one of ``NEAR_HAMMING + 1`` bands (pigeonhole), so only images sharing
    a band value are compared, not all N² pairs. A candidate is a near duplicate when
    :func:`thumb_correlation` is at least :data:`NEAR_MIN_CORRELATION`.
    """
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
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
    candidates = np.asarray(sorted(found), dtype=np.int64).reshape(-1, 2)
    keep = np.zeros(len(candidates), dtype=bool)
    for start in range(0, len(candidates), 1024):
        chunk = candidates[start : start + 1024]
        keep[start : start + 1024] = (
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

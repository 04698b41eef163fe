"""The data-quality findings of a dataset: every problem, named by file and class.

Works on what ``download`` recorded (``files.csv``: one row per source file, from the one decode
of :mod:`imageclf.data.scan`) or, for datasets without files (Fashion-MNIST), on the stored
arrays. The result is two tables a person can read and Great Expectations can check
(:mod:`imageclf.data.validation`): one row per file with a text column per kind of problem (empty
when the file is fine), and one row per class and split with its count and share. A problem's
text names the file, its class and the other files involved, so a failed expectation says what
is wrong instead of "211 rows failed".

Near duplicates: two images whose 64-bit pHashes differ in at most :data:`NEAR_HAMMING` bits and
whose 16×16 grey thumbnails differ by at most :data:`NEAR_MEAN_ABS_DIFF` grey levels on average.
A pHash ignores brightness and contrast, so the thumbnail check keeps different images of one
layout apart. Measured: a halved, JPEG-recompressed photo differs from its original by 0 bits
and 0.2-0.6 grey levels, different photos by 30+ bits and 45+ levels; small, smooth images are
less stable (a resized 96x72 synthetic picture moved 8 bits), hence the 10-bit allowance.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imageclf.data.store import FILE_TABLE, FILE_THUMBS, Dataset

NEAR_HAMMING = 10
NEAR_MEAN_ABS_DIFF = 12.0
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


def near_duplicate_pairs(hashes: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
    """(k, 2) index pairs of near duplicates among 64-bit ``hashes`` with grey ``thumbs``.

    Candidates come from banding: two hashes at most :data:`NEAR_HAMMING` bits apart agree
    exactly on at least one of ``NEAR_HAMMING + 1`` bands (pigeonhole), so only images sharing
    a band value are compared, not all N² pairs.
    """
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    bands = NEAR_HAMMING + 1
    width = -(-64 // bands)
    found: set[tuple[int, int]] = set()
    flat = thumbs.reshape(n, -1).astype(np.int16)
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
            a, c = a[close], c[close]
            mad = np.abs(flat[a] - flat[c]).mean(axis=1)
            for i, j in zip(
                a[mad <= NEAR_MEAN_ABS_DIFF], c[mad <= NEAR_MEAN_ABS_DIFF], strict=True
            ):
                found.add((min(int(i), int(j)), max(int(i), int(j))))
            offset += 1
    return np.asarray(sorted(found), dtype=np.int64).reshape(-1, 2)


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
            if n and abs(share - 1 / k) > cfg.max_class_share_deviation:
                imbalance = (
                    f"{name}: {count} {split} images, {share:.1%} of {split}, expected about "
                    f"{1 / k:.0%} ({'under' if share < 1 / k else 'over'}-represented)"
                )
            if count < cfg.min_images_per_class:
                too_few = (
                    f"{name}: {count} {split} images, fewer than "
                    f"validate.min_images_per_class ({cfg.min_images_per_class})"
                )
            rows.append(
                {
                    "split": split,
                    "class": name,
                    "count": count,
                    "share": share,
                    "expected_share": 1 / k,
                    # Train imbalance biases the model; test imbalance only the plain accuracy
                    # (evaluate reports balanced accuracy), so the two are judged apart.
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

"""Which transfer-learning recipe: candidates against a plain fine-tune, on data of different kinds.

A recipe is a set of ``train.*``/``data.*`` overrides over ``configs/photos.yaml``. Every recipe
trains on every dataset named, for every seed, in one invocation (the machine's speed varies
between sessions, so only numbers from one invocation compare), through the project's own code:
the download stage reads the data (the same scan, preprocessing and split as ``make photos``),
``prepare_run`` + ``train_model`` train as the train stage does, and the test split scores it.

The baseline is the plain fine-tune of issue 23: EfficientNet-Lite0 from ImageNet, every layer
and its batch norm training, random shifts as the only augmentation, AdamW + OneCycle, label
smoothing 0.1, batch 64, 8 epochs. Each other recipe changes one or a few of its choices, so the
table says what each choice is worth on each kind of data.

    python -m benchmarks.recipes --datasets elpv4 elpv2 --recipes baseline photos \\
        --seeds 42 43 --out reports/recipes.jsonl
    python -m benchmarks.recipes --table reports/recipes.jsonl   # the table of a finished run

Results are appended to ``--out`` one JSON line per run as they finish (a long run that is
stopped keeps what it measured, and ``--resume`` skips the runs already there).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imageclf.config import (
    Params,
    apply_overrides,
    load_overrides,
    load_params,
    parse_assignments,
)
from imageclf.data.store import Dataset, load_dataset
from imageclf.data.transforms import symmetric_images
from imageclf.evaluation.metrics import classification_report
from imageclf.paths import ProjectPaths
from imageclf.training.engine import predict_logits, set_threads, train_model
from imageclf.training.spec import prepare_run
from stages import download

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "configs" / "photos.yaml"

# The datasets, as data.* overrides (a folder dataset takes its folder from --shift-folder).
DATASETS: dict[str, dict[str, Any]] = {
    "elpv4": {"data.name": "elpv", "data.elpv_task": "4class"},
    "elpv2": {"data.name": "elpv", "data.elpv_task": "binary"},
    "shift": {"data.name": "imagefolder"},
    "fmnist_rgb": {"data.name": "fashion_mnist", "data.fraction": 0.05},
}
# The plain fine-tune every recipe is compared with.
BASELINE: dict[str, Any] = {
    "train.freeze_bn": False,
    "train.freeze_epochs": 0,
    "train.layer_lr_decay": 1.0,
    "train.augment": [{"translate": 8}],
    "train.lr": 0.002,
    "train.label_smoothing": 0.1,
    "train.epochs": 8,
    "train.batch_size": 64,
    "train.class_balance": "none",
}


def cells_recipe(size: int, epochs: int, translate: int) -> dict[str, Any]:
    """A recipe for images with no up or down (solar cells): all 8 orientations of the square,
    at ``size`` for ``epochs``, with shifts of up to ``translate`` pixels."""
    return {
        "data.image_size": size,
        "train.epochs": epochs,
        "train.augment": ["hflip", "vflip", "rot90", {"translate": translate}],
    }


# Candidates: overrides on top of the baseline, or a shipped configuration file unchanged
# ("__config__", applied over configs/photos.yaml; the dataset's data.* overrides still apply).
RECIPES: dict[str, dict[str, Any]] = {
    "baseline": {},
    "photos": {"__config__": "configs/photos.yaml"},
    "elpv_config": {"__config__": "configs/elpv.yaml"},
    "dihedral": {"train.augment": ["hflip", "vflip", "rot90", {"translate": 8}]},
    "freeze_bn": {"train.freeze_bn": True},
    "layer_lr_decay": {"train.layer_lr_decay": 0.7},
    "head_epoch": {"train.freeze_epochs": 1},
    "hflip": {"train.augment": ["hflip", {"translate": 8}]},
    "rrc35": {"train.augment": [{"random_resized_crop": 0.35}]},
    "rrc70": {"train.augment": [{"random_resized_crop": 0.7}]},
    "weights": {"train.class_balance": "weights"},
    "sqrt_weights": {"train.class_balance": "weights", "train.class_weight_power": 0.5},
    "res128": {"data.image_size": 128},
    "res160": {"data.image_size": 160},
    # ELPV's candidates: the cell's eight orientations, more pixels, longer.
    "cells128": cells_recipe(128, 12, 8),
    "cells128x24": cells_recipe(128, 24, 8),
    "cells160": cells_recipe(160, 16, 10),
    "cells160x12": cells_recipe(160, 12, 10),
    "cells192": cells_recipe(192, 12, 12),
    "cells224": cells_recipe(224, 9, 14),
}


def params_for(dataset: str, recipe: str, seed: int, shift_folder: Path | None) -> Params:
    """params.yaml + configs/photos.yaml + the dataset's and the recipe's overrides."""
    params = apply_overrides(load_params(ProjectPaths(REPO).params), load_overrides(PHOTOS))
    changes = RECIPES[recipe]
    if "__config__" in changes:
        params = apply_overrides(params, load_overrides(REPO / changes["__config__"]))
    overrides: dict[str, Any] = {"seed": seed, "train.threads": 0, **DATASETS[dataset]}
    if dataset == "shift":
        if shift_folder is None:
            raise SystemExit("the shift dataset needs --shift-folder (benchmarks.shift_folder)")
        overrides["data.imagefolder_root"] = str(shift_folder)
    if "__config__" not in changes:
        overrides |= BASELINE | changes
    return apply_overrides(params, overrides)


def read_data(params: Params, cache: dict[tuple, Dataset], workdir: Path) -> Dataset:
    """The dataset through the download stage, once per (source, size, seed)."""
    cfg = params.data
    key = (cfg.name, cfg.elpv_task, cfg.imagefolder_root, cfg.image_size, cfg.fraction, params.seed)
    if key not in cache:
        paths = ProjectPaths(workdir / f"data{len(cache)}")
        paths.root.mkdir(parents=True, exist_ok=True)
        download.run(params, paths)
        cache[key] = load_dataset(paths.dataset)
    return cache[key]


def view_log_probs(model: torch.nn.Module, images: np.ndarray, views: int) -> np.ndarray:
    """Log-probabilities (views, N, classes) of the first ``views`` dihedral views."""
    out = [
        torch.log_softmax(predict_logits(model, v, batch_size=128), 1).numpy()
        for v in symmetric_images(images, views)
    ]
    return np.stack(out)


def expected_level(log_probs: np.ndarray) -> np.ndarray:
    """The class nearest the expected class index: for ordered levels (ELPV's 0, 1/3, 2/3, 1)
    this decodes as a regressor of the level would (Deitsch et al. round the regressed
    probability), where argmax ignores the order."""
    probs = np.exp(log_probs)
    return np.rint(probs @ np.arange(probs.shape[1])).astype(int)


def decodings(log_probs: np.ndarray, ordered: bool) -> dict[str, np.ndarray]:
    """Predictions from the same model read several ways: the image alone, with its mirror
    image, with all eight symmetric views (mean log-probability), and, for ordered classes,
    by the expected level."""
    out = {"argmax": log_probs[0].argmax(1)}
    if len(log_probs) >= 2:
        out["flip2"] = log_probs[:2].mean(0).argmax(1)
    if len(log_probs) == 8:
        out["dihedral8"] = log_probs.mean(0).argmax(1)
    if ordered:
        out["level"] = expected_level(log_probs[0])
        if len(log_probs) == 8:
            out["level_dihedral8"] = expected_level(log_probs.mean(0))
    return out


def train_and_score(
    dataset: Dataset, params: Params, views: int = 1, save: Path | None = None
) -> dict[str, Any]:
    """Train as the train stage does; test accuracy, balanced accuracy, per-class recall, and
    the same for every decoding of the test predictions (``views`` dihedral views); ``save``
    keeps the test and validation log-probabilities (.npz) for later analysis."""
    prepared = prepare_run(params, dataset, ProjectPaths(REPO))
    history = train_model(
        prepared.model,
        prepared.train,
        prepared.val,
        params.train,
        seed=params.seed,
        progress=False,
    )
    test = view_log_probs(prepared.model, dataset.test.images, views)
    ordered = params.data.name == "elpv" and params.data.elpv_task == "4class"
    scored = {
        name: classification_report(dataset.test.labels, pred, dataset.classes)
        for name, pred in decodings(test, ordered).items()
    }
    if save is not None:
        val = prepared.val
        save.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            save,
            test=test,
            test_labels=dataset.test.labels,
            val=view_log_probs(prepared.model, val.images, views) if len(val) else test[:0],
            val_labels=val.labels,
        )
    report = scored["argmax"]
    return {
        "test_accuracy": round(report["test_accuracy"], 4),
        "balanced_accuracy": round(report["balanced_accuracy"], 4),
        "recall": {k: round(v["recall"], 4) for k, v in report["per_class"].items()},
        "decodings": {
            name: [round(r["test_accuracy"], 4), round(r["balanced_accuracy"], 4)]
            for name, r in scored.items()
        },
        "epochs": len(history.epochs),
        "train_images": len(prepared.train),
        "seconds": round(history.seconds, 1),
    }


def table(rows: list[dict[str, Any]], metric: str = "test_accuracy") -> str:
    """Markdown: one row per recipe, one column per dataset (``metric``'s mean over seeds, ± half
    the spread when several), each recipe's difference from the baseline, and the mean over
    datasets."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    cell: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        cell.setdefault((r["recipe"], r["dataset"]), []).append(r[metric])
    base = {d: np.mean(cell[("baseline", d)]) for d in datasets if ("baseline", d) in cell}
    lines = [
        f"{metric}:",
        "",
        "| recipe | " + " | ".join(datasets) + " | mean Δ vs baseline |",
        "|---|" + "---:|" * (len(datasets) + 1),
    ]
    for recipe in recipes:
        parts, deltas = [], []
        for d in datasets:
            acc = cell.get((recipe, d))
            if not acc:
                parts.append("")
                continue
            mean = float(np.mean(acc))
            text = f"{mean:.1%}" + (f" ±{(max(acc) - min(acc)) / 2:.1%}" if len(acc) > 1 else "")
            if d in base and recipe != "baseline":
                deltas.append(mean - base[d])
                text += f" ({mean - base[d]:+.1%})"
            parts.append(text)
        mean_delta = f"{np.mean(deltas):+.2%}" if deltas else ""
        lines.append(f"| {recipe} | " + " | ".join(parts) + f" | {mean_delta} |")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--recipes", nargs="+", default=["baseline", "photos"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--shift-folder", type=Path, default=None)
    parser.add_argument(
        "--data-seed", type=int, default=42, help="the seed of the data's split (ELPV's test set)"
    )
    parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE for every run")
    parser.add_argument("--out", type=Path, default=Path("reports/recipes.jsonl"))
    parser.add_argument("--resume", action="store_true", help="skip runs already in --out")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--table", type=Path, default=None, help="print the table of a JSONL")
    parser.add_argument(
        "--views",
        type=int,
        default=1,
        choices=[1, 2, 8],
        help="test-time views to score (2: + the mirror image; 8: the square's symmetries)",
    )
    parser.add_argument(
        "--save-logits", type=Path, default=None, help="a folder for each run's log-probabilities"
    )
    args = parser.parse_args()
    if args.table:
        rows = read_rows(args.table)
        print(table(rows) + "\n\n" + table(rows, "balanced_accuracy"))
        return
    unknown = set(args.recipes) - set(RECIPES)
    if unknown:
        parser.error(f"unknown recipes {sorted(unknown)}; known: {sorted(RECIPES)}")
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    torch.set_num_interop_threads(1)
    extra = parse_assignments(args.set)
    # A run with --set is another recipe: its rows must not be averaged into the plain one's.
    suffix = "[" + ",".join(args.set) + "]" if args.set else ""
    done = read_rows(args.out) if args.resume and args.out.is_file() else []
    seen = {(r["dataset"], r["recipe"], r["seed"]) for r in done}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cache: dict[tuple, Dataset] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            for recipe in args.recipes:
                for seed in args.seeds:
                    if (dataset, recipe + suffix, seed) in seen:
                        continue
                    params = apply_overrides(
                        params_for(dataset, recipe, seed, args.shift_folder), extra
                    )
                    # One split for every seed: seeds vary the training, not the test images.
                    split = apply_overrides(params, {"seed": args.data_seed})
                    data = read_data(split, cache, Path(tmp))
                    started = time.perf_counter()
                    row = {"dataset": dataset, "recipe": recipe + suffix, "seed": seed}
                    save = (
                        args.save_logits / f"{dataset}-{recipe}{suffix}-{seed}.npz"
                        if args.save_logits
                        else None
                    )
                    scored = train_and_score(data, params, args.views, save)
                    row |= {"size": params.data.image_size, **scored}
                    row["wall_seconds"] = round(time.perf_counter() - started, 1)
                    print(json.dumps(row), flush=True)
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    done.append(row)
    print(table(done) + "\n\n" + table(done, "balanced_accuracy"))


if __name__ == "__main__":
    main()

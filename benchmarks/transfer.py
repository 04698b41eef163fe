"""Pretrained against from scratch, in the same run, on the same photo folder: a table.

Three ways to learn a folder of RGB photos on a CPU, through the project's own functions (the
download stage's folder reader, ``training_spec``, ``load_pretrained``, ``train_model``):

- EfficientNet-Lite0, ImageNet weights, fine-tuned at 96 px with the photo configuration
  (``configs/photos.yaml``: AdamW + OneCycle, a head-only epoch, discriminative LRs, frozen BN);
- ``resnet_small`` from scratch at 64 px (the zoo's from-scratch model for photos, the same
  augmentation);
- a linear probe: Lite0's frozen ImageNet features (computed once), a new linear head.

    python -m benchmarks.photo_folder /tmp/photos --train-per-class 400 --test-per-class 100
    python -m benchmarks.transfer /tmp/photos

``benchmarks/shift_folder.py`` writes a harder folder for ranking recipes (Fashion-MNIST items on
cluttered photo backgrounds, a domain shift between train and test): pass that folder instead.

Prints a markdown table of test accuracy and training seconds (data reading excluded).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from imageclf.config import Params, apply_overrides, load_overrides, load_params
from imageclf.data.store import Dataset, load_dataset
from imageclf.paths import ProjectPaths
from imageclf.training.engine import predict_logits, set_threads, train_model
from imageclf.training.spec import prepare_run
from stages import download

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "configs" / "photos.yaml"


def photo_params(folder: Path, size: int, overrides: dict[str, Any]) -> Params:
    """params.yaml with the photo configuration, this folder and size, and ``overrides``."""
    params = apply_overrides(load_params(ProjectPaths(REPO).params), load_overrides(PHOTOS))
    return apply_overrides(
        params,
        {
            "data.imagefolder_root": str(folder),
            "data.image_size": size,
            "train.threads": 0,
            **overrides,
        },
    )


def read_folder(params: Params, workdir: Path) -> Dataset:
    """The folder through the download stage (its reader, preprocessing and quality pass)."""
    paths = ProjectPaths(workdir / f"size{params.data.image_size}")
    paths.root.mkdir(parents=True, exist_ok=True)
    download.run(params, paths)
    return load_dataset(paths.dataset)


def train_and_test(name: str, dataset: Dataset, params: Params) -> dict[str, Any]:
    """Train as the train stage would (per-channel statistics or the weights' own, the val
    split) and return the test accuracy and training seconds."""
    prepared = prepare_run(params, dataset, ProjectPaths(REPO))
    model, train_split = prepared.model, prepared.train
    history = train_model(
        model, train_split, prepared.val, params.train, seed=params.seed, progress=False
    )
    logits = predict_logits(model, dataset.test.images, batch_size=128)
    accuracy = float((logits.argmax(1).numpy() == dataset.test.labels).mean())
    return {
        "method": name,
        "size": prepared.spec.image_size,
        "epochs": len(history.epochs),
        "train_images": len(train_split),
        "test_accuracy": accuracy,
        "seconds": history.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="ImageFolder with train/ and test/")
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--scratch-epochs", type=int, default=12)
    parser.add_argument("--probe-epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument(
        "--only", nargs="*", default=["finetune", "scratch", "probe"], help="methods to run"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    torch.set_num_interop_threads(1)
    finetune = photo_params(args.folder, 96, {"train.epochs": args.finetune_epochs})
    runs = {
        "finetune": (
            "EfficientNet-Lite0 fine-tuned at 96², AdamW + OneCycle (configs/photos.yaml)",
            finetune,
        ),
        "scratch": (
            "resnet_small from scratch at 64², AdamW + OneCycle",
            photo_params(
                args.folder,
                64,
                {
                    "train.model": "resnet_small",
                    "train.width": 32,
                    "train.pretrained": "",
                    "train.freeze_epochs": 0,
                    "train.layer_lr_decay": 1.0,
                    "train.lr": 0.004,
                    "train.epochs": args.scratch_epochs,
                },
            ),
        ),
        "probe": (
            "frozen-feature linear probe (Lite0 ImageNet features at 96², computed once)",
            photo_params(
                args.folder,
                96,
                {
                    "train.transfer": "features",
                    "train.freeze_epochs": 0,
                    "train.lr": 0.01,
                    "train.epochs": args.probe_epochs,
                },
            ),
        ),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        datasets: dict[int, Dataset] = {}
        for key in args.only:
            label, params = runs[key]
            size = params.data.image_size
            if size not in datasets:
                t0 = time.perf_counter()
                datasets[size] = read_folder(params, Path(tmp))
                print(f"read {args.folder} at {size}px in {time.perf_counter() - t0:.0f} s")
            row = train_and_test(label, datasets[size], params)
            print(row, flush=True)
            rows.append(row)
    print("\n| method | train images | epochs | test accuracy | training time |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['train_images']} | {r['epochs']} | "
            f"{r['test_accuracy']:.1%} | {r['seconds']:.0f} s |"
        )


if __name__ == "__main__":
    main()

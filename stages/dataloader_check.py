"""Stage dataloader_check: overfit one batch, train briefly on shuffled labels (validation must
stay at chance), then pick the fastest loader setting for train (measured with train's
augmentation and class balance), and time decoding a source file."""

from __future__ import annotations

from typing import Any

from imageclf.config import Params
from imageclf.data.loader_check import (
    OverfitFailed,
    augmentation_cost,
    decode_cost,
    loader_grid,
    overfit_one_batch,
    source_files,
    why_chosen,
)
from imageclf.data.store import load_dataset, split_train_val
from imageclf.errors import StageError
from imageclf.io import write_json
from imageclf.models.zoo import build_model
from imageclf.paths import ProjectPaths
from imageclf.seeding import seed_everything
from imageclf.stage import main
from imageclf.training.debugging import shuffled_label_run


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Write reports/dataloader_check.json: the overfit result, the grid, the chosen setting."""
    dataset = load_dataset(paths.dataset)
    cfg = params.dataloader_check
    c, h, _ = dataset.image_shape
    seed_everything(params.seed)
    model = build_model(
        params.train.model, dataset.num_classes, c, params.train.width, image_size=h
    )
    try:
        overfit = overfit_one_batch(model, dataset.train, cfg, params.seed)
    except OverfitFailed as exc:
        raise StageError(str(exc)) from exc
    train_cfg = params.train
    # A fresh model of the same kind, on train's own train/val split (LabelLeak fails the stage).
    seed_everything(params.seed)
    fresh = build_model(train_cfg.model, dataset.num_classes, c, train_cfg.width, image_size=h)
    train_idx, val_idx = split_train_val(
        dataset.train.labels, params.data.val_fraction, params.seed
    )
    shuffled = shuffled_label_run(
        fresh,
        dataset.train.subset(train_idx),
        dataset.train.subset(val_idx) if len(val_idx) else dataset.test,
        dataset.num_classes,
        cfg,
        params.seed,
        train_cfg.augment,
    )
    balance = train_cfg.class_balance == "sampler"
    rows, chosen = loader_grid(
        dataset.train, train_cfg.batch_size, cfg, params.seed, train_cfg.augment, balance
    )
    files = source_files(paths.dataset, dataset.meta, cfg.decode_images)
    report = {
        "overfit_initial_loss": overfit["initial_loss"],
        "overfit_final_loss": overfit["final_loss"],
        "overfit_passed": overfit["passed"],
        "shuffled_labels": shuffled,
        "best_images_per_second": max(r["images_per_second"] for r in rows),
        "chosen": chosen.as_dict(),
        "chosen_because": why_chosen(rows, chosen),
        "grid": rows,
        "image_shape": list(dataset.train.images.shape[1:]),
        "storage": dataset.meta.get("storage", "memory"),
        "augmentation": augmentation_cost(
            dataset.train,
            train_cfg.batch_size,
            cfg.throughput_batches,
            params.seed,
            train_cfg.augment,
            balance,
        ),
        "decode": decode_cost(files, h, c),
        "overfit_curve": [{"step": i, "loss": loss} for i, loss in enumerate(overfit["curve"])],
    }
    write_json(paths.loader_config, report)
    return report


if __name__ == "__main__":
    main(run)

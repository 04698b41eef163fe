"""Stage dataloader_check: overfit one batch, then pick the fastest loader setting for train
(measured with train's augmentation and class balance), and time decoding a source file."""

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
from imageclf.data.store import load_dataset
from imageclf.io import write_json
from imageclf.models.zoo import build_model
from imageclf.paths import ProjectPaths
from imageclf.stage import StageError, main
from imageclf.training.engine import seed_everything


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
    balance = train_cfg.class_balance == "sampler"
    rows, chosen = loader_grid(
        dataset.train, train_cfg.batch_size, cfg, params.seed, train_cfg.augment, balance
    )
    files = source_files(paths.dataset, dataset.meta, cfg.decode_images)
    report = {
        "overfit_initial_loss": overfit["initial_loss"],
        "overfit_final_loss": overfit["final_loss"],
        "overfit_passed": overfit["passed"],
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

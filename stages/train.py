"""Stage train: train the model named in params.train, checkpoint every epoch, log to MLflow.

``torchrun --standalone --nproc_per_node N -m stages.train`` trains the same way with DDP over N
processes (see imageclf.distributed); rank 0 does all the logging and writing.
"""

from __future__ import annotations

import logging
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from imageclf import distributed
from imageclf.checkpoint import ModelSpec, load_pretrained_features, save_checkpoint
from imageclf.config import Params
from imageclf.data.loaders import load_loader_settings
from imageclf.data.store import load_dataset, split_train_val
from imageclf.engine import EpochMetrics, seed_everything, set_threads, train_model
from imageclf.io import write_json
from imageclf.models import count_parameters
from imageclf.paths import ProjectPaths
from imageclf.stage import InvalidInput, StageError, main
from imageclf.tracking import experiment_tags, flatten, git_commit, params_hash, setup_mlflow

log = logging.getLogger(__name__)


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Train, write models/model.pt and reports/train.json, and return the final metrics."""

    joined = distributed.init_from_env()
    try:
        return _run(params, paths)
    finally:
        if joined:
            distributed.shutdown()


def _run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    import mlflow

    cfg = params.train
    set_threads(cfg.threads)
    dataset = load_dataset(paths.dataset)
    train_idx, val_idx = split_train_val(
        dataset.train.labels, params.data.val_fraction, params.seed
    )
    train_split, val_split = dataset.train.subset(train_idx), dataset.train.subset(val_idx)
    pixels = train_split.images.astype(np.float32) / 255.0
    c, h, _ = dataset.image_shape
    spec = ModelSpec(
        name=cfg.model,
        width=cfg.width,
        num_classes=dataset.num_classes,
        in_channels=c,
        image_size=h,
        classes=tuple(dataset.classes),
        mean=float(pixels.mean()),
        std=float(pixels.std() or 1.0),
    )
    del pixels
    seed_everything(params.seed)  # the initial weights too, not only the data order
    model = spec.build()
    if cfg.init_from:
        source = paths.resolve(cfg.init_from)
        if not source.is_file():
            raise StageError(
                f"train.init_from: no file at {source}. Point it at a checkpoint this project "
                'wrote (a models/model.pt kept aside), or set it to "" to train from scratch.'
            )
        try:
            copied = load_pretrained_features(model, source)
        except InvalidInput as exc:  # the wrong architecture, width or channels: says which
            raise StageError(f"train.init_from: {exc}") from exc
        except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as exc:
            # not a checkpoint at all: what torch.load raises for a file it cannot read
            raise StageError(
                f"train.init_from: {source} is not a checkpoint this project wrote ({exc})."
            ) from exc
        log.info("transfer learning: %d feature tensors from %s", copied, source)
    elif cfg.freeze_epochs:
        raise StageError(
            "train.freeze_epochs needs train.init_from (freezing random features learns nothing)."
        )
    loader = load_loader_settings(paths.loader_config)
    if not distributed.is_main():  # a DDP worker: train its shard, leave the records to rank 0
        train_model(model, train_split, val_split, cfg, seed=params.seed, loader=loader)
        return {"rank": distributed.rank()}
    setup_mlflow(paths, cfg.mlflow_experiment)
    history_rows: list[dict[str, Any]] = []
    with (
        mlflow.start_run(run_name=f"{cfg.model}-w{cfg.width}-e{cfg.epochs}") as active,
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.set_tags(
            {
                "git_commit": git_commit(paths.root),
                "data_train_hash": dataset.meta["train_hash"],
                "data_test_hash": dataset.meta["test_hash"],
                "params_hash": params_hash(params),
                "stage": "train",
                # Set by `dvc exp run` and by the Prefect flow's experiment workspace.
                **experiment_tags(),
            }
        )
        mlflow.log_params(
            {
                k: v
                for k, v in flatten("", params.model_dump(by_alias=True)).items()
                if k.split(".")[0] in ("train", "data", "seed") and k != "data.sources"
            }
        )
        mlflow.log_params({"loader." + k: v for k, v in loader.as_dict().items()})
        mlflow.log_param("world_size", distributed.world_size())

        def on_epoch_end(metrics: EpochMetrics, model_: Any, _opt: Any) -> None:
            row = metrics.as_dict()
            history_rows.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=metrics.epoch)
            # models/model.pt is replaced only when training completes; a crash leaves the last
            # good model in place and the latest epoch in models/checkpoints/last.pt.
            save_checkpoint(
                paths.last_checkpoint,
                model_,
                spec,
                extra={"epoch": metrics.epoch},
            )
            epoch_copy = Path(tmp) / f"epoch_{metrics.epoch:03d}.pt"
            save_checkpoint(epoch_copy, model_, spec, extra={"epoch": metrics.epoch})
            mlflow.log_artifact(str(epoch_copy), artifact_path="checkpoints")

        history = train_model(
            model,
            train_split,
            val_split,
            cfg,
            seed=params.seed,
            loader=loader,
            on_epoch_end=on_epoch_end,
        )
        final = history.final
        save_checkpoint(paths.checkpoint, model, spec, extra={"epoch": final.epoch})
        result = {
            "model": cfg.model,
            "parameters": count_parameters(model),
            "epochs": len(history.epochs),
            "train_seconds": history.seconds,
            "train_loss": final.train_loss,
            "train_accuracy": final.train_accuracy,
            "val_accuracy": final.val_accuracy if final.val_accuracy is not None else -1.0,
            "images_per_second": float(np.mean([e.images_per_second for e in history.epochs])),
            "mlflow_run_id": active.info.run_id,
            "world_size": distributed.world_size(),
        }
        mlflow.log_metrics({"train_seconds": history.seconds, "parameters": result["parameters"]})
    write_json(paths.train_history, history_rows)
    write_json(paths.train_report, result)
    return result


if __name__ == "__main__":
    main(run)

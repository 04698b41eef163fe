"""PyTorch Lightning as an alternative trainer (course bonus B), for the same model and data.

:class:`ImageClassifier` (a ``LightningModule``) wraps a zoo model with the engine's own
optimizer parameter groups and per-step LR schedule (:func:`~imageclf.training.engine.
make_optimizer`, :func:`~imageclf.training.engine.make_scheduler`), loss and batch mixing;
:class:`ImageDataModule` (a ``LightningDataModule``) serves the same train/val split through the
same loaders and augmentation (:func:`~imageclf.data.loaders.make_loader`). What Lightning adds
is the loop: precision, gradient accumulation and clipping, early stopping and device placement
become Trainer arguments instead of code. What it costs: exact resume and the engine's
observers (TensorBoard, gradient flow) are the engine's, and EMA and transfer learning are not
wired here (refused with a message).

    python -m course.lightning_adapter [--params params.yaml]

trains ``train.model`` from params.yaml and writes ``models/model.pt`` with
:func:`~imageclf.models.checkpoint.save_checkpoint`, so ``dvc repro evaluate`` (or
``python -m stages.evaluate``) reads it like the train stage's.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from imageclf.config import Params, TrainParams
from imageclf.data.loaders import LoaderSettings, load_loader_settings, loss_weights, make_loader
from imageclf.data.store import Dataset, Split, load_dataset, split_train_val
from imageclf.errors import StageError
from imageclf.models.checkpoint import save_checkpoint
from imageclf.models.zoo import split_head
from imageclf.paths import ProjectPaths
from imageclf.seeding import seed_everything
from imageclf.training.engine import (
    autocast_dtype,
    check_finite,
    make_optimizer,
    make_scheduler,
    mix_batch,
    optimizer_steps,
    select_device,
)
from imageclf.training.mixing import BatchMixer, hard_labels
from imageclf.training.spec import prepare_run

log = logging.getLogger(__name__)
# train.precision as the autocast dtype the engine picks -> Lightning's name for it.
LIGHTNING_PRECISION = {None: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}


def check_supported(cfg: TrainParams) -> None:
    """Settings this trainer does not implement, refused rather than silently ignored."""
    unsupported = []
    if cfg.ema_decay > 0:
        unsupported.append("train.ema_decay > 0 (EMA)")
    if cfg.pretrained or cfg.init_from or cfg.freeze_epochs or cfg.transfer == "features":
        unsupported.append("transfer learning (train.pretrained, init_from, freeze_epochs)")
    if cfg.ensemble:
        unsupported.append("train.ensemble (one model per member)")
    if unsupported:
        raise StageError(
            f"The Lightning trainer does not implement {'; '.join(unsupported)}: use the train "
            "stage (python -m stages.train), or turn them off."
        )


class ImageDataModule(L.LightningDataModule):
    """The train stage's data: the same stratified train/val split of the stored dataset and
    the same loaders (augmentation per batch, seeded by the run seed and the batch number)."""

    def __init__(
        self,
        dataset: Dataset | Path,
        params: Params,
        settings: LoaderSettings | None = None,
    ) -> None:
        super().__init__()
        self.source = dataset
        self.params = params
        self.settings = settings
        self.train_split: Split | None = None
        self.val_split: Split | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_split is not None:
            return
        dataset = self.source if isinstance(self.source, Dataset) else load_dataset(self.source)
        train_idx, val_idx = split_train_val(
            dataset.train.labels, self.params.data.val_fraction, self.params.seed
        )
        self.train_split = dataset.train.subset(train_idx)
        self.val_split = dataset.train.subset(val_idx)

    def train_dataloader(self) -> DataLoader:
        cfg, split = self.params.train, self.train_split
        assert split is not None, "setup() first"
        return make_loader(
            split,
            cfg.batch_size,
            shuffle=True,
            seed=self.params.seed,
            settings=self.settings,
            drop_last=len(split) > cfg.batch_size,
            augment=cfg.augment,
            balance=cfg.class_balance == "sampler",
        )

    def val_dataloader(self) -> DataLoader | list[Any]:
        if self.val_split is None or not len(self.val_split):
            return []
        return make_loader(
            self.val_split, self.params.train.batch_size, shuffle=False, settings=self.settings
        )


class ImageClassifier(L.LightningModule):
    """A zoo model trained as the engine trains it: same parameter groups, schedule (stepped
    per optimizer step), loss with label smoothing and class weights, mixup/CutMix."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainParams,
        total_steps: int,
        seed: int,
        class_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.total_steps = total_steps
        self.seed = seed
        self.criterion = nn.CrossEntropyLoss(
            weight=class_weight, label_smoothing=cfg.label_smoothing
        )
        num_classes = split_head(model)[1].out_features
        self.mixer = (
            BatchMixer.from_params(cfg, num_classes)
            if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
            else None
        )
        self.batches_seen = 0  # the batch number mixing is seeded with, as in the engine

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        images, labels = batch
        images = images.contiguous(memory_format=torch.channels_last)
        targets = labels
        if self.mixer is not None:
            images, targets = mix_batch(self.mixer, images, labels, self.seed, self.batches_seen)
        self.batches_seen += 1
        logits = self.model(images)
        loss = self.criterion(logits, targets)
        check_finite(loss, self.current_epoch + 1, self.global_step)
        correct = (logits.argmax(1) == hard_labels(targets)).float().mean()
        size = len(labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=size)
        self.log("train_accuracy", correct, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
        images, labels = batch
        logits = self.model(images.contiguous(memory_format=torch.channels_last))
        size = len(labels)
        self.log("val_loss", self.criterion(logits, labels), on_epoch=True, batch_size=size)
        correct = (logits.argmax(1) == labels).float().mean()
        self.log("val_accuracy", correct, on_epoch=True, prog_bar=True, batch_size=size)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = make_optimizer(self.model, self.cfg)
        scheduler = make_scheduler(optimizer, self.cfg, self.total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }


def fit(
    model: nn.Module,
    data: ImageDataModule,
    *,
    root: Path,
    device: torch.device | None = None,
    progress: bool = False,
) -> tuple[ImageClassifier, dict[str, float]]:
    """Train ``model`` in place with a Lightning Trainer writing only under ``root``; return
    the module and the final epoch's logged metrics."""
    params = data.params
    cfg = params.train
    check_supported(cfg)
    device = device or select_device()
    precision = LIGHTNING_PRECISION[autocast_dtype(cfg.precision, device)]
    data.setup("fit")
    assert data.train_split is not None
    seed_everything(params.seed)  # dropout's draws, as the engine's train_model seeds them
    batches = len(data.train_dataloader())
    total_steps = optimizer_steps(batches, cfg)
    num_classes = split_head(model)[1].out_features
    weight = loss_weights(cfg, data.train_split.labels, num_classes)
    module = ImageClassifier(model, cfg, total_steps, params.seed, weight)
    model.to(memory_format=torch.channels_last)
    callbacks: list[L.Callback] = []
    has_val = data.val_split is not None and len(data.val_split) > 0
    if cfg.early_stopping_patience > 0 and has_val:
        callbacks.append(
            L.pytorch.callbacks.EarlyStopping(
                "val_accuracy",
                min_delta=cfg.early_stopping_min_delta,
                patience=cfg.early_stopping_patience,
                mode="max",
            )
        )
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=cfg.epochs,
        max_steps=total_steps,
        precision=precision,
        accumulate_grad_batches=cfg.accumulate_steps,
        gradient_clip_val=cfg.grad_clip_norm or None,
        gradient_clip_algorithm="norm",
        detect_anomaly=cfg.detect_anomaly,
        callbacks=callbacks,
        default_root_dir=root,
        logger=False,  # MLflow and TensorBoard belong to the train stage
        enable_checkpointing=False,  # the checkpoint is save_checkpoint's, written by the caller
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the loader's own sampler decides the order
        deterministic=False,
    )
    trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    model.eval()
    return module, metrics


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Train ``train.model`` with Lightning and write ``models/model.pt`` (what evaluate reads)."""
    cfg = params.train
    check_supported(cfg)
    dataset = load_dataset(paths.dataset)
    # The split, the spec and the seeded initial weights, as the train stage makes them.
    prepared = prepare_run(params, dataset, paths)
    model, spec = prepared.model, prepared.spec
    data = ImageDataModule(dataset, params, load_loader_settings(paths.loader_config))
    data.train_split, data.val_split = prepared.train, prepared.val
    with tempfile.TemporaryDirectory() as scratch:  # Lightning's default_root_dir: nothing kept
        _, metrics = fit(model, data, root=Path(scratch))
    save_checkpoint(paths.checkpoint, model.cpu(), spec, extra={"trainer": "lightning"})
    log.info("wrote %s: %s", paths.checkpoint, metrics)
    return {"checkpoint": str(paths.checkpoint), **metrics}


if __name__ == "__main__":
    # Only the program uses the stage CLI. It shows the library's loggers ("imageclf") at INFO;
    # this module's logger is under "course", so it gets the same level here.
    from imageclf.stage import main

    logging.getLogger("course").setLevel(os.environ.get("IMAGECLF_LOG_LEVEL", "INFO"))
    main(run)

"""The training loop's one callback interface: everything that watches a run or keeps its results
(TensorBoard, gradient flow, activation statistics, the train stage's MLflow log and checkpoints,
the resumable state) is a :class:`TrainingObserver`, so the loop stays one loop and each tool
stays in its file.

Every method is a no-op here; an observer overrides what it needs. The loop calls them on rank 0
only (under DDP), with the unwrapped model, and never lets an observer change the training: the
weights after a run are the same with or without observers. What changes training (the EMA of the
weights, early stopping) is the loop's own, on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


class TrainingObserver:
    """Hooks of :func:`imageclf.training.engine.train_model`, in the order it calls them."""

    def on_train_start(self, model: nn.Module, images: torch.Tensor) -> None:
        """Before the first step, with the first augmented batch (an image grid, the graph)."""

    def after_backward(self, step: int, model: nn.Module) -> None:
        """Gradients of ``step`` are complete and unscaled, not yet clipped: per-layer norms."""

    def on_step_end(self, step: int, scalars: Mapping[str, float]) -> None:
        """After the optimizer step: loss, lr, grad_norm (before clipping), clipped (0/1). The
        values are read from the device when first looked up: an observer that ignores them
        costs no host sync."""

    def on_epoch_end(self, epoch: int, scalars: Mapping[str, float], model: nn.Module) -> None:
        """The epoch's metrics (train/val loss and accuracy, lr, ...) and the model."""

    def save_state(self, state: dict[str, Any]) -> None:
        """After ``on_epoch_end``: the whole training state but the weights (``model``'s), which
        passed back to ``train_model(resume=...)`` with the weights under ``"model"`` continues
        the run exactly where it was."""

    def close(self) -> None:
        """Flush and release files and hooks; called once, also when training fails."""


class Observers(TrainingObserver):
    """Several observers as one: the loop calls this, this calls each in order."""

    def __init__(self, observers: list[TrainingObserver] | None = None) -> None:
        self.observers = list(observers or [])

    def __bool__(self) -> bool:
        return bool(self.observers)

    def __iter__(self) -> Iterator[TrainingObserver]:
        return iter(self.observers)

    def on_train_start(self, model: nn.Module, images: torch.Tensor) -> None:
        for observer in self.observers:
            observer.on_train_start(model, images)

    def after_backward(self, step: int, model: nn.Module) -> None:
        for observer in self.observers:
            observer.after_backward(step, model)

    def on_step_end(self, step: int, scalars: Mapping[str, float]) -> None:
        for observer in self.observers:
            observer.on_step_end(step, scalars)

    def on_epoch_end(self, epoch: int, scalars: Mapping[str, float], model: nn.Module) -> None:
        for observer in self.observers:
            observer.on_epoch_end(epoch, scalars, model)

    def save_state(self, state: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.save_state(state)

    def close(self) -> None:
        for observer in self.observers:
            observer.close()

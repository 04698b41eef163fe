"""Knowledge distillation and the short fine-tuning loop the compression techniques share.

Distillation (Hinton et al., 2015): a student learns from a teacher's *soft* targets, the
teacher's class probabilities at temperature T, which say how alike the classes look ("a shirt
is closer to a T-shirt than to a boot"), information the one-hot label lacks. The loss is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

(T^2 keeps the soft term's gradients on the scale of the hard term's as T grows). The teacher is
a model trained with the long configuration; the student is built with the default one.

The loop here is deliberately its own small loop, not the training engine: it needs a second
model's outputs per batch and nothing of the engine's resume, EMA or DDP machinery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imageclf.config import TrainParams
from imageclf.data.loaders import make_loader
from imageclf.data.store import Split
from imageclf.training.engine import check_finite, make_optimizer, make_scheduler

# (model, images, labels) -> loss of one batch
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Soft-target KL at ``temperature`` (weight ``alpha``) plus hard-label cross-entropy;
    ``alpha`` 0 is exactly the plain cross-entropy (the teacher is then ignored)."""
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    if alpha == 0:
        return hard
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def fit_steps(
    model: nn.Module,
    split: Split,
    steps: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    loss_fn: BatchLoss,
    *,
    seed: int,
    augment: Any = (),
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip_norm: float = 0.0,
) -> list[float]:
    """Train ``model`` in place for ``steps`` optimizer steps (cycling over ``split``) on the
    CPU; returns the loss of each step. Ends in eval mode."""
    loader = make_loader(
        split,
        batch_size,
        shuffle=True,
        seed=seed,
        drop_last=len(split) > batch_size,
        augment=augment,
    )
    model.train()
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        epoch += 1
        for images, labels in loader:
            if len(losses) >= steps:
                break
            loss = loss_fn(model, images, labels)
            check_finite(loss, epoch, len(losses))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
    model.eval()
    return losses


def finetune(
    model: nn.Module, split: Split, steps: int, lr: float, batch_size: int, seed: int
) -> list[float]:
    """A short plain-CE fine-tune at a small constant LR (SGD with momentum): enough to let a
    pruned or fake-quantized model re-adapt, not a training run."""
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9
    )
    return fit_steps(
        model,
        split,
        steps,
        batch_size,
        optimizer,
        lambda m, x, y: F.cross_entropy(m(x), y),
        seed=seed,
    )


def distill(
    student: nn.Module,
    teacher: nn.Module,
    split: Split,
    cfg: TrainParams,
    epochs: int,
    temperature: float,
    alpha: float,
    seed: int,
) -> dict[str, Any]:
    """Train ``student`` in place against ``teacher``'s soft targets with the training
    configuration ``cfg`` (optimizer, LR schedule, batch size, augmentation, label smoothing),
    for ``epochs`` passes over ``split``. The teacher sees the same augmented batch."""
    teacher.eval()
    steps_per_epoch = max(1, len(split) // cfg.batch_size)
    total = steps_per_epoch * epochs
    optimizer = make_optimizer(student, cfg)
    scheduler = make_scheduler(optimizer, cfg, total)

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = teacher(images)
        return distillation_loss(
            model(images), soft, labels, temperature, alpha, cfg.label_smoothing
        )

    losses = fit_steps(
        student,
        split,
        total,
        cfg.batch_size,
        optimizer,
        loss_fn,
        seed=seed,
        augment=cfg.augment,
        scheduler=scheduler,
        grad_clip_norm=cfg.grad_clip_norm,
    )
    return {"steps": total, "final_loss": losses[-1] if losses else None}

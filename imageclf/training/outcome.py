"""What a training run leaves in reports/train.json: the weights it keeps, its outcome, and for an
ensemble the members' outcomes summed up."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from imageclf.config import TrainParams
from imageclf.models.zoo import count_parameters
from imageclf.training import distributed
from imageclf.training.engine import TrainHistory, chosen_weights


def run_outcome(
    history: TrainHistory, model: nn.Module, seed: int
) -> tuple[nn.Module, dict[str, Any]]:
    """(the weights to keep: ``model`` or the EMA of its weights, whichever validated better in
    the last epoch; the run's outcome)."""
    final = history.final
    weights = chosen_weights(history)
    kept = history.ema.module if weights == "ema" and history.ema is not None else model
    return kept, {
        "seed": seed,
        "epochs": len(history.epochs),
        "train_seconds": history.seconds,
        "train_loss": final.train_loss,
        "train_accuracy": final.train_accuracy,
        "val_accuracy": final.val_accuracy if final.val_accuracy is not None else -1.0,
        "images_per_second": float(np.mean([e.images_per_second for e in history.epochs])),
        # Which weights are kept: the trained ones or their EMA (train.ema_decay).
        "weights": weights,
        "ema_val_accuracy": final.ema_val_accuracy if final.ema_val_accuracy is not None else -1.0,
        "best_epoch": history.best_epoch if history.best_epoch is not None else -1,
        "stopped_early": history.stopped_early,
        "resumed_after_epoch": history.resumed_after_epoch,
    }


def train_report(
    cfg: TrainParams, model: nn.Module, members: list[dict[str, Any]], run_id: str
) -> dict[str, Any]:
    """reports/train.json: one run's outcome; for an ensemble, the sums (epochs, seconds), the
    members' mean (losses, accuracies, images/s) and every member's outcome under "members".
    An ensemble's val_accuracy is its members' mean: each member has its own validation split
    (its seed's), which the other members trained on, so no split scores the ensemble; the
    evaluate stage's test accuracy does."""
    first = members[0]
    result: dict[str, Any] = {"model": cfg.model, "parameters": count_parameters(model)}
    if len(members) == 1:
        result.update(first)
    else:

        def mean(key: str) -> float:
            return float(np.mean([m[key] for m in members]))

        result.update(
            {
                "epochs": sum(m["epochs"] for m in members),
                "train_seconds": sum(m["train_seconds"] for m in members),
                **{
                    k: mean(k)
                    for k in ("train_loss", "train_accuracy", "val_accuracy", "images_per_second")
                },
                "weights": "ensemble",
                "ema_val_accuracy": mean("ema_val_accuracy")
                if all(m["ema_val_accuracy"] >= 0 for m in members)
                else -1.0,
                "best_epoch": -1,
                "stopped_early": any(m["stopped_early"] for m in members),
                "resumed_after_epoch": first["resumed_after_epoch"],
                "members": members,
            }
        )
    result.update({"mlflow_run_id": run_id, "world_size": distributed.world_size()})
    result.pop("seed", None)
    return result

"""An exponential moving average (EMA) of the weights: a copy of the model whose parameters and
floating-point buffers (BatchNorm's running statistics) follow the trained ones slowly.

Averaging the last few hundred steps' weights smooths out the noise of the final steps, which
often validates better than the raw weights at no training cost (timm's ``ModelEmaV3`` and
torchvision's reference script do the same). Integer buffers (BatchNorm's batch counter) are
copied, not averaged. The average starts as a copy of the model and its decay warms up as
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs are not dominated by the
random initial weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """The EMA of ``model``'s weights (its own module, on the model's device, in eval mode)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average toward ``model`` (after each optimizer step)."""
        weight = 1.0 - self.current_decay()
        ours = list(self.module.state_dict().values())
        theirs = list(model.state_dict().values())
        floats = [(a, b) for a, b in zip(ours, theirs, strict=True) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], weight)
        for a, b in zip(ours, theirs, strict=True):
            if not a.is_floating_point():
                a.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])

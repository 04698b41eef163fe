"""Backpropagation written out by hand (course modules 1-2 and bonus A): what autograd does.

* :class:`SoftmaxCrossEntropy` is a custom ``torch.autograd.Function``: its forward saves the
  probabilities, and its backward is the one-line gradient of cross-entropy with respect to the
  logits, ``(softmax - one_hot) / N``. ``tests/test_scratch.py`` checks it with ``gradcheck``.
* :class:`ScratchMLP` is a two-layer perceptron on plain tensors, no ``nn.Module`` and no
  autograd: its :meth:`~ScratchMLP.gradients` applies the chain rule layer by layer, and the
  test compares every gradient with what autograd computes for the same function.

Both share :func:`cross_entropy_grad`, so the formula is written once.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from imageclf.models.layers import log_softmax, softmax


def cross_entropy_grad(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d(mean cross-entropy)/d(logits) = (softmax(logits) - one_hot(targets)) / N: the softmax's
    Jacobian and the log's derivative cancel to this, which is why frameworks fuse the two."""
    grad = probs.clone()
    grad[torch.arange(len(targets)), targets] -= 1
    return grad / len(targets)


class SoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``logits`` (N, K) against class indices ``targets`` (N,), with the
    backward pass written by hand instead of recorded by autograd."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(softmax(logits), targets)
        picked = log_softmax(logits).gather(1, targets[:, None])
        return -picked.mean()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, targets = ctx.saved_tensors
        # No gradient for the integer targets.
        return grad_output * cross_entropy_grad(probs, targets), None


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return SoftmaxCrossEntropy.apply(logits, targets)


class ScratchMLP:
    """x (N, D) -> Linear(D, H) -> ReLU -> Linear(H, K) -> logits, as bare tensors.

    Kaiming-uniform initial weights (what ``nn.Linear`` draws, scaled for ReLU), zero biases.
    """

    def __init__(
        self,
        inputs: int,
        hidden: int,
        classes: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        def weight(fan_in: int, fan_out: int) -> torch.Tensor:
            bound = math.sqrt(6.0 / fan_in)  # He: Var = 2 / fan_in for ReLU layers
            draw = torch.rand(fan_in, fan_out, generator=generator, dtype=dtype)
            return (draw * 2 - 1) * bound

        self.params: dict[str, torch.Tensor] = {
            "w1": weight(inputs, hidden),
            "b1": torch.zeros(hidden, dtype=dtype),
            "w2": weight(hidden, classes),
            "b2": torch.zeros(classes, dtype=dtype),
        }

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits, and what the backward pass needs from the forward one (the cache)."""
        p = self.params
        pre = x @ p["w1"] + p["b1"]
        hidden = pre.clamp_min(0)
        return hidden @ p["w2"] + p["b2"], {"x": x, "pre": pre, "hidden": hidden}

    def gradients(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[float, dict]:
        """Mean cross-entropy and its gradient for every parameter, by the chain rule."""
        logits, cache = self.forward(x)
        probs = softmax(logits)
        loss = -log_softmax(logits).gather(1, targets[:, None]).mean()
        d_logits = cross_entropy_grad(probs, targets)  # (N, K)
        d_hidden = d_logits @ self.params["w2"].T  # (N, H)
        d_pre = d_hidden * (cache["pre"] > 0)  # ReLU passes the gradient where it was open
        grads = {
            "w2": cache["hidden"].T @ d_logits,
            "b2": d_logits.sum(0),
            "w1": cache["x"].T @ d_pre,
            "b1": d_pre.sum(0),
        }
        return float(loss), grads

    def sgd_step(self, x: torch.Tensor, targets: torch.Tensor, lr: float) -> float:
        """One plain gradient-descent step; returns the loss before it."""
        loss, grads = self.gradients(x, targets)
        for name, grad in grads.items():
            self.params[name] -= lr * grad
        return loss

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[0].argmax(1)

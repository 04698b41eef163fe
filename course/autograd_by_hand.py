"""Backpropagation written out by hand (course modules 1-2 and bonus A): what autograd does.

* :class:`SoftmaxCrossEntropy` is a custom ``torch.autograd.Function``: its forward saves the
  probabilities, and its backward is the one-line gradient of cross-entropy with respect to the
  logits, ``(softmax - one_hot) / N``. ``tests/test_scratch.py`` checks it with ``gradcheck``.
* :class:`ScratchMLP` is a multilayer perceptron on plain tensors, no ``nn.Module`` and no
  autograd: its :meth:`~ScratchMLP.gradients` applies the chain rule layer by layer, and the
  test compares every gradient with what autograd computes for the same function. At
  ``train.width`` it has the layer sizes of the registered ``mlp`` (:meth:`ScratchMLP.for_width`).

Both share :func:`cross_entropy_grad`, so the formula is written once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch

from imageclf.models.layers import log_softmax, softmax
from imageclf.models.zoo import mlp_hidden_sizes


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
    """x (N, D) -> [Linear -> ReLU] per hidden layer -> Linear(., K) -> logits, as bare tensors.

    ``hidden``: one size or a sequence of sizes (:meth:`for_width` takes those of the registered
    ``mlp``). Kaiming-uniform initial weights (what ``nn.Linear`` draws, scaled for ReLU), zero
    biases; parameters ``w1, b1, ..., wL, bL`` from the input side.
    """

    def __init__(
        self,
        inputs: int,
        hidden: int | Sequence[int],
        classes: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        def weight(fan_in: int, fan_out: int) -> torch.Tensor:
            bound = math.sqrt(6.0 / fan_in)  # He: Var = 2 / fan_in for ReLU layers
            draw = torch.rand(fan_in, fan_out, generator=generator, dtype=dtype)
            return (draw * 2 - 1) * bound

        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        sizes = (inputs, *hidden, classes)
        self.layers = len(sizes) - 1
        self.params: dict[str, torch.Tensor] = {}
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
            self.params[f"w{i}"] = weight(fan_in, fan_out)
            self.params[f"b{i}"] = torch.zeros(fan_out, dtype=dtype)

    @classmethod
    def for_width(cls, inputs: int, width: int, classes: int, **kwargs: Any) -> ScratchMLP:
        """The layer sizes of the registered ``mlp`` at ``train.width`` (its BatchNorm and
        dropout aside): the same network, trained without autograd."""
        return cls(inputs, mlp_hidden_sizes(width), classes, **kwargs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits, and what the backward pass needs from the forward one (the cache): each
        layer's input ``a{i-1}`` and each hidden layer's pre-activation ``z{i}``."""
        p = self.params
        cache = {"a0": x}
        out = x
        for i in range(1, self.layers + 1):
            out = out @ p[f"w{i}"] + p[f"b{i}"]
            if i < self.layers:  # hidden layer: ReLU; the last one gives the logits
                cache[f"z{i}"] = out
                out = out.clamp_min(0)
                cache[f"a{i}"] = out
        return out, cache

    def gradients(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[float, dict]:
        """Mean cross-entropy and its gradient for every parameter, by the chain rule from the
        loss back to the input, one layer at a time."""
        logits, cache = self.forward(x)
        probs = softmax(logits)
        loss = -log_softmax(logits).gather(1, targets[:, None]).mean()
        delta = cross_entropy_grad(probs, targets)  # d loss / d (layer L's output), (N, K)
        grads: dict[str, torch.Tensor] = {}
        for i in range(self.layers, 0, -1):
            grads[f"w{i}"] = cache[f"a{i - 1}"].T @ delta  # output = input @ w + b
            grads[f"b{i}"] = delta.sum(0)
            if i > 1:
                d_input = delta @ self.params[f"w{i}"].T  # into layer i-1's activation
                delta = d_input * (cache[f"z{i - 1}"] > 0)  # ReLU passes it where it was open
        return float(loss), grads

    def sgd_step(self, x: torch.Tensor, targets: torch.Tensor, lr: float) -> float:
        """One plain gradient-descent step; returns the loss before it."""
        loss, grads = self.gradients(x, targets)
        for name, grad in grads.items():
            self.params[name] -= lr * grad
        return loss

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[0].argmax(1)

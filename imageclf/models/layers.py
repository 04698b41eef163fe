"""Building blocks written out from their definitions (course bonus A), used for real by the
``vit_tiny`` model: softmax, GELU, RMSNorm and multi-head self-attention.

Each is checked against PyTorch's own implementation in ``tests/test_layers.py``; they stay
plain tensor arithmetic so that the ONNX exporter and ONNX Runtime see ordinary ops.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x) / sum(exp(x)), shifted by the max first: exp of a large logit overflows float32
    (exp(89) is inf), and the shift cancels out of the ratio."""
    shifted = x - x.amax(dim=dim, keepdim=True)
    exp = shifted.exp()
    return exp / exp.sum(dim=dim, keepdim=True)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x - logsumexp(x), again with the max shift (log(softmax(x)) underflows to -inf)."""
    shifted = x - x.amax(dim=dim, keepdim=True)
    return shifted - shifted.exp().sum(dim=dim, keepdim=True).log()


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean negative log-likelihood of ``target`` under softmax(``logits``), with the target
    distribution smoothed towards uniform by ``label_smoothing`` (what
    ``nn.CrossEntropyLoss(label_smoothing=...)`` computes, on logits, never on probabilities)."""
    logp = log_softmax(logits, dim=1)
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    uniform = -logp.mean(dim=1)
    return ((1 - label_smoothing) * nll + label_smoothing * uniform).mean()


def gelu(x: torch.Tensor) -> torch.Tensor:
    """x * Phi(x), Phi the standard normal CDF: 0.5 * x * (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean subtraction and bias
    (cheaper, and as good in transformers)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class MultiHeadSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V per head, heads concatenated and projected.

    One Linear makes Q, K and V for all heads at once; (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        weights = softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)  # (B, H, N, N)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + MLP(norm(x)) with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(gelu(self.fc1(self.norm2(x))))


class PatchEmbedding(nn.Module):
    """Image -> sequence of patch tokens plus a learned position embedding: a stride-``patch``
    convolution is a linear map of each non-overlapping patch."""

    def __init__(self, in_channels: int, dim: int, patch: int, tokens: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.position


class TokenPool(nn.Module):
    """Mean over tokens, then RMSNorm: the image embedding the classifier (and monitoring) sees."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.mean(dim=1))

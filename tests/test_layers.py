"""The from-scratch building blocks agree with PyTorch's, and the transformer built from them
trains, exports to ONNX and runs in ONNX Runtime like the CNNs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from imageclf.deploy.export import export_onnx, ort_logits, verify_onnx
from imageclf.models.layers import (
    MultiHeadSelfAttention,
    RMSNorm,
    cross_entropy,
    gelu,
    log_softmax,
    softmax,
)
from imageclf.models.zoo import ServingGraph, build_model
from imageclf.onnx_runtime import ort_session


def test_softmax_and_log_softmax_match_torch_and_survive_huge_logits():
    x = torch.randn(5, 7) * 10
    torch.testing.assert_close(softmax(x), torch.softmax(x, -1))
    torch.testing.assert_close(log_softmax(x), torch.log_softmax(x, -1))
    huge = torch.tensor([[1000.0, 0.0, -1000.0]])  # naive exp() would give inf / nan
    assert torch.isfinite(softmax(huge)).all() and torch.isfinite(log_softmax(huge)[0, :2]).all()


def test_cross_entropy_matches_torch_with_label_smoothing():
    logits, target = torch.randn(16, 10), torch.randint(0, 10, (16,))
    for smoothing in (0.0, 0.1):
        torch.testing.assert_close(
            cross_entropy(logits, target, smoothing),
            F.cross_entropy(logits, target, label_smoothing=smoothing),
        )


def test_gelu_and_rmsnorm_match_torch():
    x = torch.randn(4, 9, 32)
    torch.testing.assert_close(gelu(x), F.gelu(x))
    ours, theirs = RMSNorm(32), torch.nn.RMSNorm(32, eps=1e-6)
    torch.testing.assert_close(ours(x), theirs(x))


def test_attention_matches_scaled_dot_product_attention_and_gets_gradients():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(dim=32, heads=4)
    x = torch.randn(3, 10, 32, requires_grad=True)
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
    reference = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
    out = attn(x)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and attn.qkv.weight.grad is not None


def test_vit_exports_to_onnx_and_agrees_with_pytorch(tmp_path):
    torch.manual_seed(0)
    model = build_model("vit_tiny", num_classes=4, in_channels=1, width=8, image_size=12)
    graph = ServingGraph(model.eval(), views=2)
    path = export_onnx(graph, tmp_path / "vit.onnx", (1, 12, 12))
    images = np.random.default_rng(0).integers(0, 256, (6, 12, 12, 1), dtype=np.uint8)
    check = verify_onnx(path, graph, images)
    assert check["max_abs_diff"] < 1e-4 and check["argmax_agreement"] == 1.0
    assert check["dynamic_batch"] and ort_logits(ort_session(path), images[:1]).shape == (1, 4)

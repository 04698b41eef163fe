"""Smaller and faster models (course module 7.1): pruning and PyTorch INT8 quantization.

Each function returns a new model and leaves its input untouched, so the optimize stage can
measure every candidate against the same unmodified baseline in one process:

* Unstructured pruning (``torch.nn.utils.prune``, global L1): zeroes the smallest weights. The
  tensors stay dense, so neither the ``state_dict`` nor the latency shrinks; only a compressed
  file does (zeros deflate well), which is what :func:`size_report` measures.
* Structured pruning by L2 norm of conv filters, with the channels *physically removed* (smaller
  convs, batch norms and consumers), because ``prune.ln_structured`` only masks a channel to
  zero and leaves every FLOP in place.
* Dynamic quantization of ``nn.Linear`` (INT8 weights, activations quantized on the fly).
* Static INT8 of the whole graph through FX graph mode (``prepare_fx``/``prepare_qat_fx``,
  ``convert_fx``), calibrated, or fine-tuned quantization-aware when ``qat_steps > 0``.

Why FX and not PT2E: torch 2.14 no longer ships ``torch.ao.quantization.quantize_pt2e`` nor the
``X86InductorQuantizer``/``XNNPACKQuantizer`` (they moved to the separate ``torchao`` package,
which is not a dependency here); ``torch.ao.quantization`` (eager and FX) is deprecated in 2.14
but still works on this CPU's ``x86`` engine, and FX handles the residual additions that the
eager API would need hand-written ``FloatFunctional`` modules for.
"""

from __future__ import annotations

import copy
import io
import math
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from imageclf.data.transforms import to_model_input

# Modules that act on each channel independently: a channel removed before them stays removed
# after them, so a conv's output channels can be pruned through them to its consumer.
_PER_CHANNEL = (
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout,
    nn.Identity,
)
_WEIGHTED = (nn.Conv2d, nn.Linear)


@contextmanager
def quiet_deprecations() -> Iterator[None]:
    """torch.ao.quantization warns on every call in 2.14 (deprecated for torchao, still working),
    and its own internals trigger torch's warnings about quantized tensors and observers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        warnings.filterwarnings("ignore", "Please use quant_min and quant_max", UserWarning)
        yield


@torch.inference_mode()
def accuracy_of(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int) -> float:
    """Top-1 accuracy on uint8 NHWC images, in batches (a whole test set at once would hold
    every activation of 10k images in memory)."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        logits = model(to_model_input(images[start : start + batch]))
        correct += int((logits.argmax(1).numpy() == labels[start : start + batch]).sum())
    return correct / max(len(images), 1)


@torch.inference_mode()
def interleaved_latency(
    models: dict[str, nn.Module], x: torch.Tensor, warmup: int, iterations: int
) -> dict[str, float]:
    """Median milliseconds per call of each model on ``x``, the models taking turns.

    Taking turns (rather than timing one model, then the next) spreads a busy neighbour on a
    shared CPU over all of them, so the ratios to the baseline stay meaningful."""
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            model(x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(iterations):
        for name, model in models.items():
            start = time.perf_counter()
            model(x)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(t)) for name, t in times.items()}


def size_report(model: nn.Module) -> dict[str, int]:
    """Bytes of the saved ``state_dict`` and of the same bytes deflated (what a zip, a Docker
    layer or an HTTP download of it costs): only the latter shrinks with unstructured zeros."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    raw = buffer.getvalue()
    return {"state_dict_bytes": len(raw), "deflated_bytes": len(zlib.compress(raw, 9))}


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every conv and linear weight: what global pruning ranks together."""
    return [(m, "weight") for m in model.modules() if isinstance(m, _WEIGHTED)]


def weight_sparsity(model: nn.Module) -> float:
    """The share of exactly-zero entries over all conv and linear weights."""
    weights = [m.weight.detach() for m, _ in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


def prune_unstructured(
    model: nn.Module, sparsity: float, finetune: Callable[[nn.Module], None] | None = None
) -> nn.Module:
    """A copy with the ``sparsity`` share of all conv/linear weights with the smallest |w|
    zeroed (one global ranking: layers that matter less lose more). ``finetune`` runs while the
    masks are still attached, so retraining cannot revive a pruned weight; ``prune.remove``
    then bakes the zeros into plain tensors (a normal ``state_dict``, no ``weight_orig``)."""
    pruned = copy.deepcopy(model)
    targets = prunable_weights(pruned)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    if finetune is not None:
        finetune(pruned)
    for module, name in targets:
        prune.remove(module, name)
    return pruned.eval()


def _chains(root: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Runs of leaf modules that execute one after another, as (parent, name) references.

    A nested ``nn.Sequential`` is read inline; any other module with children (a residual
    block, attention) ends the run, because what it does with channels is unknown here, and
    its own Sequential children are searched as runs of their own."""
    runs: list[list[tuple[nn.Module, str]]] = []

    def read(seq: nn.Sequential, run: list[tuple[nn.Module, str]]) -> list[tuple[nn.Module, str]]:
        for name, child in seq.named_children():
            if isinstance(child, nn.Sequential):
                run = read(child, run)
            elif next(child.children(), None) is None:
                run.append((seq, name))
            else:
                runs.append(run)
                visit(child)
                run = []
        return run

    def visit(module: nn.Module) -> None:
        if isinstance(module, nn.Sequential):
            runs.append(read(module, []))
            return
        for child in module.children():
            visit(child)

    visit(root)
    return [run for run in runs if run]


def _consumes_channels(module: nn.Module, flattened: bool) -> bool:
    """A layer whose input channels (or flattened channel blocks) can be cut to match."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and not flattened
    return isinstance(module, nn.Linear) and flattened


def _channel_pairs(model: nn.Module) -> list[dict[str, Any]]:
    """Each conv whose output channels only reach one conv or linear through per-channel
    modules (batch norm, activations, pooling, flatten): those channels can be cut out."""
    pairs = []
    for run in _chains(model):
        modules = [parent._modules[name] for parent, name in run]
        for i, producer in enumerate(modules):
            if not (isinstance(producer, nn.Conv2d) and producer.groups == 1):
                continue
            bn, flattened = None, False
            for j in range(i + 1, len(modules)):
                nxt = modules[j]
                if isinstance(nxt, nn.BatchNorm2d):
                    if bn is not None or flattened:  # a second BN would need cutting too
                        break
                    bn = run[j]
                elif isinstance(nxt, nn.Flatten):
                    flattened = True
                elif isinstance(nxt, _PER_CHANNEL):
                    continue
                elif _consumes_channels(nxt, flattened):
                    pairs.append({"producer": run[i], "bn": bn, "consumer": run[j]})
                    break
                else:
                    break
    return pairs


def _get(ref: tuple[nn.Module, str]) -> nn.Module:
    return ref[0]._modules[ref[1]]


def _set(ref: tuple[nn.Module, str], module: nn.Module) -> None:
    ref[0]._modules[ref[1]] = module


def _conv_like(conv: nn.Conv2d, in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch,
        out_ch,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


@torch.no_grad()
def prune_channels(model: nn.Module, ratio: float) -> tuple[nn.Module, dict[str, Any]]:
    """A copy with ``ratio`` of the output channels of every prunable conv removed: those
    with the smallest L2 filter norm, together with their batch-norm entries and the matching
    input channels (or flattened input columns) of the consumer. The model really gets
    smaller and faster; channels tied to a residual addition are left alone (both sides of
    the sum would have to lose the same channels)."""
    pruned = copy.deepcopy(model).eval()
    pairs = _channel_pairs(pruned)
    before = sum(p.numel() for p in pruned.parameters())
    removed = 0
    for pair in pairs:
        conv = _get(pair["producer"])
        channels = conv.out_channels
        keep_n = max(1, math.ceil(channels * (1 - ratio)))
        norms = conv.weight.flatten(1).norm(dim=1)
        keep = norms.argsort(descending=True)[:keep_n].sort().values
        new_conv = _conv_like(conv, conv.in_channels, keep_n)
        new_conv.weight.copy_(conv.weight[keep])
        if conv.bias is not None:
            new_conv.bias.copy_(conv.bias[keep])
        _set(pair["producer"], new_conv)
        if pair["bn"] is not None:
            bn = _get(pair["bn"])
            new_bn = nn.BatchNorm2d(keep_n, eps=bn.eps, momentum=bn.momentum).eval()
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(new_bn, name).copy_(getattr(bn, name)[keep])
            new_bn.num_batches_tracked.copy_(bn.num_batches_tracked)
            _set(pair["bn"], new_bn)
        consumer = _get(pair["consumer"])
        if isinstance(consumer, nn.Conv2d):
            new = _conv_like(consumer, keep_n, consumer.out_channels)
            new.weight.copy_(consumer.weight[:, keep])
        else:  # flattened (C, H, W) input: each channel owns H*W consecutive columns
            per_channel = consumer.in_features // channels
            columns = (keep[:, None] * per_channel + torch.arange(per_channel)).flatten()
            new = nn.Linear(len(columns), consumer.out_features, bias=consumer.bias is not None)
            new.weight.copy_(consumer.weight[:, columns])
        if consumer.bias is not None:
            new.bias.copy_(consumer.bias)
        _set(pair["consumer"], new)
        removed += channels - keep_n
    after = sum(p.numel() for p in pruned.parameters())
    return pruned.eval(), {
        "prunable_convs": len(pairs),
        "channels_removed": removed,
        "parameters_before": before,
        "parameters_after": after,
    }


def quantize_dynamic_linear(model: nn.Module) -> nn.Module:
    """INT8 weights for every ``nn.Linear``, activations quantized per batch at run time.

    ``torch.ao.quantization.quantize_dynamic`` (deprecated in torch 2.14 in favour of
    ``torchao.quantization.quantize_``, which needs the separate ``torchao`` package): it only
    touches Linear/RNN layers, so a CNN whose work is in its convs gains little."""
    from torch.ao.quantization import quantize_dynamic

    with quiet_deprecations():
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def is_dynamic_quantized(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)


QUANT_ENGINE = "x86"  # fbgemm + onednn kernels for x86 CPUs (AVX2 is enough)


def quantize_static_fx(
    model: nn.Module,
    example: torch.Tensor,
    calibration: Callable[[nn.Module], None],
    qat: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """INT8 weights and activations for the whole traced graph (conv+BN+ReLU fused).

    Without ``qat``: post-training, ``calibration`` runs the observed model on sample images to
    fix activation ranges. With ``qat``: the model is prepared with fake quantization in
    training mode and ``qat`` fine-tunes it, so the weights learn to live with INT8 rounding.
    The result runs on the CPU only (quantized kernels)."""
    from torch.ao.quantization import (
        get_default_qat_qconfig_mapping,
        get_default_qconfig_mapping,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

    if QUANT_ENGINE not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"this torch build has no {QUANT_ENGINE!r} quantized engine")
    torch.backends.quantized.engine = QUANT_ENGINE
    source = copy.deepcopy(model)
    with quiet_deprecations():
        if qat is None:
            prepared = prepare_fx(
                source.eval(), get_default_qconfig_mapping(QUANT_ENGINE), (example,)
            )
            calibration(prepared)
        else:
            prepared = prepare_qat_fx(
                source.train(), get_default_qat_qconfig_mapping(QUANT_ENGINE), (example,)
            )
            qat(prepared)
        return convert_fx(prepared.eval())


def is_int8_graph(model: nn.Module) -> bool:
    """True when the converted graph holds quantized convs or linears (not only fake quant)."""
    from torch.ao.nn import quantized as nnq
    from torch.ao.nn.intrinsic import quantized as nniq

    kinds = (nnq.Conv2d, nnq.Linear, nniq.ConvReLU2d, nniq.LinearReLU)
    return any(isinstance(m, kinds) for m in model.modules())


def gate(baseline_accuracy: float, accuracy: float, max_drop: float) -> dict[str, Any]:
    """The optimize stage's accuracy gate for one candidate: kept only within ``max_drop``."""
    drop = baseline_accuracy - accuracy
    kept = drop <= max_drop
    return {
        "accuracy": accuracy,
        "accuracy_drop": round(drop, 6),
        "kept": kept,
        "reason": "kept: accuracy within tolerance"
        if kept
        else f"rejected: accuracy drop {drop:.4f} exceeds {max_drop}",
    }

"""Identical results give identical files: what DVC hashes must not depend on when, where or in
which process a model was written, nor on how its training data was loaded.

Before: torch.save named the zip's top folder after the random temporary file it wrote to;
TorchScript numbered its classes by how many modules the process had traced before and kept
absolute source paths; the ONNX exporter kept per-node stack traces with absolute paths; and a
train loader with worker processes gave other weights than one without (tqdm.auto started an
extra epoch on the loader). Two clean `dvc repro` runs then gave other hashes for every model.
"""

from __future__ import annotations

import io
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from imageclf.data.loaders import LoaderSettings
from imageclf.deploy.export import export_onnx, export_torchscript, load_torchscript
from imageclf.deploy.optimize import quantize_static_int8
from imageclf.models.checkpoint import ModelSpec, save_checkpoint
from imageclf.models.zoo import ServingGraph, build_model
from imageclf.training.engine import train_model
from monitoring.reference import save_reference
from tests.conftest import REPO, synthetic_split, tiny_params

SHAPE = (1, 12, 12)
SPEC = ModelSpec("resnet_small", 8, 4, 1, 12, tuple("abcd"), 0.2, 0.3)
FILES = {
    "model.pt",
    "model.onnx",
    "model.torchscript.pt",
    "model.int8.onnx",
    "reference.npz",
}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return SPEC.build().eval()


def write_model_files(folder: Path, model: torch.nn.Module) -> dict[str, bytes]:
    """Every kind of model file the pipeline writes, through the functions its stages use."""
    folder.mkdir(parents=True)
    serving = ServingGraph(model, views=2).eval()
    save_checkpoint(folder / "model.pt", model, SPEC, extra={"epoch": 3})
    export_onnx(serving, folder / "model.onnx", SHAPE, metadata={"classes": '["a","b","c","d"]'})
    export_torchscript(serving, folder / "model.torchscript.pt", SHAPE)
    calibration = synthetic_split(4, size=12).images
    quantize_static_int8(folder / "model.onnx", folder / "model.int8.onnx", calibration)
    save_reference({"confidence": np.linspace(0, 1, 5, dtype=np.float32)}, folder / "reference.npz")
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_model_files_are_the_same_bytes_whenever_and_wherever_written(
    tmp_path: Path, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = write_model_files(tmp_path / "run", model)
    # A day later, into a folder with a longer name, after this process traced other modules.
    tomorrow = time.time() + 86_400
    monkeypatch.setattr(time, "time", lambda: tomorrow)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in 2.14
        torch.jit.trace(build_model("resnet_small", 4, 1, 4).eval(), torch.rand(1, *SHAPE))
    second = write_model_files(tmp_path / "another-run-elsewhere", model)

    assert set(first) == set(second) == FILES
    assert [name for name in sorted(FILES) if first[name] != second[name]] == []
    # Nothing that names this machine's folders (the checkout, the virtualenv, the temp dir),
    # not even inside compressed zip entries (TorchScript's debug records are compressed).
    markers = {str(REPO), sys.prefix, str(tmp_path)}
    leaks = [
        (name, m) for name, data in first.items() for m in markers if m.encode() in unpacked(data)
    ]
    assert leaks == []
    # Without its debug records, the TorchScript file still loads and computes what PyTorch does.
    serving, x = ServingGraph(model, views=2).eval(), torch.rand(3, *SHAPE)
    with torch.inference_mode():
        scripted = load_torchscript(tmp_path / "run" / "model.torchscript.pt")
        for ours, ref in zip(scripted(x), serving(x), strict=True):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def unpacked(data: bytes) -> bytes:
    """``data``, followed by every entry decompressed when it is a zip (torch, npz)."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return data
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return data + b"".join(archive.read(name) for name in archive.namelist())


def test_training_gives_the_same_weights_with_and_without_loader_workers() -> None:
    """dataloader_check picks num_workers by measured speed, which varies from run to run on a
    busy machine: it must only change how fast training goes, never what it learns."""
    cfg = tiny_params(train={"epochs": 2, "batch_size": 8}).train
    split = synthetic_split(6, size=12)  # 24 images: 3 steps per epoch
    weights = []
    for workers in (0, 1):
        torch.manual_seed(0)
        model = build_model("resnet_small", 4, 1, 8, image_size=12)
        settings = LoaderSettings(num_workers=workers)
        train_model(model, split, None, cfg, seed=0, loader=settings, progress=False)
        weights.append(model.state_dict())
    differ = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert differ == []

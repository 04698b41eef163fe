"""ONNX (and TorchScript) export, and proof that an export computes what PyTorch does.

An export is only trusted after ``onnx.checker`` accepts it and ONNX Runtime agrees with PyTorch on
real images (max absolute logit difference, argmax agreement). TorchScript is the artefact for
LibTorch (C++) runtimes; PyTorch 2.14 deprecates it in favour of ``torch.export``/ONNX, which is
why ONNX is what the service runs.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imageclf.data.transforms import to_model_array, to_model_input
from imageclf.io import archive_bytes, write_bytes, write_with
from imageclf.onnx_runtime import EMBEDDING_NAME, INPUT_NAME, OUTPUT_NAME, ort_session

log = logging.getLogger(__name__)


@contextmanager
def functional_activations(model: nn.Module) -> Iterator[None]:
    """Run activations out of place while ``model`` is exported, then restore them.

    ``torch.export`` functionalizes an in-place op (``relu_``, ``hardtanh_``) into its
    functional form plus a copy, through the slow symbolic-shape path of PyTorch's reference
    decompositions: EfficientNet-Lite0's 16 ``ReLU6(inplace=True)`` doubled its export time
    (the same ONNX graph, the same outputs). Training keeps the in-place form, which saves
    memory."""
    flagged = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    for m in flagged:
        m.inplace = False
    try:
        yield
    finally:
        for m in flagged:
            m.inplace = True


def export_onnx(
    model: nn.Module,
    path: Path,
    input_shape: tuple[int, int, int],
    opset: int = 18,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``model`` (eval mode, CPU) with batch as a dynamic dimension, atomically.

    A model returning a tuple (a :class:`~imageclf.models.zoo.ServingGraph`) gets the outputs
    ``logits`` and ``embedding``; a plain classifier gets ``logits``.
    """
    model = model.eval().cpu()
    example = torch.rand(4, *input_shape)
    with torch.inference_mode():
        two_outputs = isinstance(model(example), tuple)
    batch = torch.export.Dim("batch", min=1, max=4096)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), functional_activations(model):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME, EMBEDDING_NAME] if two_outputs else [OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
        program.save(str(tmp), external_data=False)
        import onnx

        proto = onnx.load(str(tmp))
        drop_stack_traces(proto.graph.node)
        for function in proto.functions:
            drop_stack_traces(function.node)
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))

    write_with(path, write, suffix=".onnx")
    return path


STACK_TRACE = "pkg.torch.onnx.stack_trace"


def drop_stack_traces(nodes: Iterable[Any]) -> None:
    """Remove the exporter's per-node Python stack traces (subgraphs included), in place.

    They hold absolute paths into the checkout and the virtualenv, so the same model exported
    from two checkouts got two hashes (and two registry versions, which dedupe by SHA-256). The
    other node metadata (module hierarchy, FX node) has no paths and stays."""
    for node in nodes:
        kept = [prop for prop in node.metadata_props if prop.key != STACK_TRACE]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
        for attribute in node.attribute:  # If/Loop/Scan bodies
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for graph in [*subgraphs, *attribute.graphs]:
                drop_stack_traces(graph.node)


def ort_logits(session: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for uint8 NHWC images through the shared preprocessing."""
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_array(images[start : start + batch_size])
        out.append(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)


def scores_in_batches(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """The model's scores (a ServingGraph's first output) for uint8 NHWC images, a batch at a
    time: a graph with test-time augmentation runs 8 views per image, and 512 images at once
    would hold 4,096 images' activations in memory (the export stage was killed for it)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            scores = model.eval().cpu()(to_model_input(images[start : start + batch_size]))
            out.append(scores[0] if isinstance(scores, tuple) else scores)
    return torch.cat(out) if out else torch.empty(0)


def verify_onnx(path: Path, model: nn.Module, images: np.ndarray) -> dict[str, Any]:
    """Check the graph and compare ONNX Runtime with PyTorch on ``images``."""
    import onnx

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = ort_session(path)
    ort_out = ort_logits(session, images, batch_size=64)  # 8 views each, with TTA
    torch_out = scores_in_batches(model, images).numpy()
    diff = float(np.abs(ort_out - torch_out).max()) if len(images) else 0.0
    agreement = float((ort_out.argmax(1) == torch_out.argmax(1)).mean()) if len(images) else 1.0
    inputs = session.get_inputs()[0]
    return {
        "max_abs_diff": diff,
        "argmax_agreement": agreement,
        "compared_images": len(images),
        "input_shape": [d if isinstance(d, int) else str(d) for d in inputs.shape],
        "dynamic_batch": not isinstance(inputs.shape[0], int),
        "file_bytes": Path(path).stat().st_size,
    }


def export_torchscript(model: nn.Module, path: Path, input_shape: tuple[int, int, int]) -> Path:
    """Trace ``model`` (eval, CPU) on an example batch, freeze it (weights become constants,
    conv+BN and similar folds apply) and save it atomically for ``torch.jit.load``/LibTorch.

    Tracing records the ops one example runs: fine for these models, which have no
    data-dependent control flow; the verification below runs a different batch size to be sure
    the batch dimension did not get baked in."""
    model = model.eval().cpu()
    with warnings.catch_warnings(), fresh_script_types():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in 2.14, still supported
        traced = torch.jit.trace(model, torch.rand(4, *input_shape))
        frozen = torch.jit.freeze(traced)
        archive = archive_bytes(lambda f: torch.jit.save(frozen, f))
    write_bytes(path, without_debug_records(archive))
    return path


@contextmanager
def fresh_script_types() -> Iterator[None]:
    """Trace into an empty TorchScript type registry, so a model always gets the same names.

    TorchScript calls a class ``___torch_mangle_<n>`` when the process already holds one of that
    name, ``n`` counting every module traced before: the same model exported after other traces
    (a flow running stages in one process, a test) got other code file names, hence other bytes.
    The registry is what ``torch.jit._state._python_cu`` names (looked up there by torch's C++
    side); without that attribute (another torch), export as before."""
    import torch.jit._state as jit_state

    saved = getattr(jit_state, "_python_cu", None)
    if saved is None:
        yield
        return
    jit_state._python_cu = torch._C.CompilationUnit()
    try:
        yield
    finally:
        jit_state._python_cu = saved


def without_debug_records(archive: bytes) -> bytes:
    """A TorchScript archive without its ``*.debug_pkl`` records.

    Those map every op to the Python line it was traced from, as absolute paths into the
    checkout and the virtualenv: the same model exported from two checkouts (a test's copy, a
    DVC experiment's workspace) got two hashes. Only error messages use them. torch's own zip
    reader and writer keep the format (aligned records); the writer adds the version, byte order
    and serialization id records itself."""
    reader = torch._C.PyTorchFileReader(io.BytesIO(archive))
    buffer = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buffer)
    writer.set_min_version(int(bytes(reader.get_record("version")).strip()))
    written_by_writer = {"version", ".data/version", "byteorder", ".data/serialization_id"}
    for name in reader.get_all_records():
        if name.endswith(".debug_pkl") or name in written_by_writer:
            continue
        record = reader.get_record(name)
        writer.write_record(name, record, len(record))
    writer.write_end_of_file()
    return buffer.getvalue()


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` without its 2.14 deprecation warning (the format is still supported)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path)).eval()


def verify_torchscript(path: Path, model: nn.Module, images: np.ndarray) -> dict[str, Any]:
    """Compare the saved TorchScript module with the eager model on ``images`` (and on one
    image, another batch size than the trace's)."""
    scripted = load_torchscript(path)
    ours, ref = scores_in_batches(scripted, images), scores_in_batches(model, images)
    with torch.inference_mode():
        single = scripted(to_model_input(images[:1]))
    single = single[0] if isinstance(single, tuple) else single
    return {
        "max_abs_diff": float((ours - ref).abs().max()) if len(images) else 0.0,
        "argmax_agreement": float((ours.argmax(1) == ref.argmax(1)).float().mean())
        if len(images)
        else 1.0,
        "batch_1_matches": bool(torch.allclose(single, ref[:1], atol=1e-4)),
        "file_bytes": Path(path).stat().st_size,
    }

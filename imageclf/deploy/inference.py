"""Inference with an exported model: safe decoding, the ONNX model, adaptive batching.

Kept free of any web framework so the BentoML service, the offline batch command and the
baseline server in ``benchmarks/`` share exactly the same code path.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imageclf.config import ServingParams
from imageclf.data.transforms import prepare_image, to_model_array
from imageclf.metric_names import SERVED_LATENCY_METRIC
from imageclf.tracking import redact_uri, scrub_credentials

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A client mistake, with the HTTP status that says which kind (400, 413, 415)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Overloaded(RuntimeError):
    """The inference queue is full: the request is refused now (503) rather than served late."""


class ModelUnavailable(RuntimeError):
    """No model can be served (no champion yet, registry unreachable): the service is not ready."""


# The decoders an upload may use: the formats the error message names, and nothing that
# hands the bytes to an outside program (EPS/PS would run Ghostscript when it is installed).
# JPEG covers MPO, the multi-picture JPEG many phones write (Pillow opens it as a JPEG).
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


def decode_image(
    data: bytes, limits: ServingParams, size: int, channels: int, name: str = "image"
) -> np.ndarray:
    """Bytes of an uploaded file -> uint8 (size, size, channels), or an InputError saying why.

    The pixel count is checked from the header before any pixel is decoded, so a small file that
    expands to gigabytes (a decompression bomb) costs nothing. Decoding itself is left to the
    shared :func:`~imageclf.data.transforms.prepare_image`, which can ask a JPEG decoder for a
    reduced scale first: a phone photo then never exists at full size in memory.
    """
    if not data:
        raise InputError(f"{name} is empty: send the bytes of a PNG or JPEG file.")
    if len(data) > limits.max_request_bytes:
        raise InputError(
            f"{name} is {len(data)} bytes, over the {limits.max_request_bytes}-byte limit "
            "(serving.max_request_bytes).",
            status=413,
        )
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError as exc:  # over twice Pillow's own pixel limit
        raise InputError(f"{name} is over the pixel limit ({exc}).", status=413) from exc
    except Exception as exc:
        raise InputError(
            f"{name} is not an image this service can read (PNG, JPEG, GIF, BMP, WebP or TIFF; "
            "EPS, PDF and other formats are refused).",
            status=415,
        ) from exc
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise InputError(
            f"{name} is {width}x{height} pixels, over the {limits.max_image_pixels}-pixel limit "
            "(serving.max_image_pixels).",
            status=413,
        )
    try:
        return prepare_image(image, size, channels)
    except Image.DecompressionBombError as exc:  # a frame larger than the header said (GIF)
        raise InputError(f"{name} is over the pixel limit ({exc}).", status=413) from exc
    except Exception as exc:
        raise InputError(f"{name} is truncated or corrupt ({exc}).") from exc
    finally:
        image.close()


class Decoder:
    """Uploads decoded on a small pool of threads (``serving.decode_threads``), never on the
    event loop: Pillow releases the GIL while it decodes, so a worker keeps answering health
    checks and small requests while a 12-megapixel photo is decoded, and at most that many
    decodes run at once per worker."""

    def __init__(self, limits: ServingParams) -> None:
        self.limits = limits
        self._executor = ThreadPoolExecutor(
            max_workers=limits.decode_threads, thread_name_prefix="decode"
        )

    async def decode(
        self, source: bytes | Path, size: int, channels: int, name: str = "image"
    ) -> np.ndarray:
        """:func:`decode_image` of ``source`` (bytes, or a file that holds them)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._decode, source, size, channels, name
        )

    def _decode(self, source: bytes | Path, size: int, channels: int, name: str) -> np.ndarray:
        data = source.read_bytes() if isinstance(source, Path) else source
        return decode_image(data, self.limits, size, channels, name=name)


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 HWC image (1 or 3 channels) as PNG: logged inputs and the page's examples."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Example:
    """A test image the web page offers to click, with its true class."""

    label: str
    png: bytes


def pick_examples(labels: np.ndarray, total: int, seed: int) -> np.ndarray:
    """Indices of ``total`` images spread over the classes: one of each class in turn (random
    within a class), so even a short list shows every class once before any twice."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    for rank in range(max((len(p) for p in per_class), default=0)):
        for members in per_class:
            if len(picked) < total and rank < len(members):
                picked.append(int(members[rank]))
    return np.asarray(picked, dtype=np.int64)


def save_examples(path: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    """Write example images (uint8 NHWC) with their class names, atomically, as one .npz that
    is registered with the model version (like the monitoring reference)."""
    from imageclf.io import write_with

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez(
                handle,
                images=np.asarray(images, dtype=np.uint8),
                labels=np.asarray([classes[int(k)] for k in labels], dtype=np.str_),
            )

    write_with(path, write, suffix=".npz")


def load_examples(path: Path) -> list[Example]:
    """The examples of :func:`save_examples`, each encoded once as PNG for the page."""
    with np.load(path, allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"{path} does not hold (N, H, W, C) images with one label each.")
    return [
        Example(str(label), encode_png(image)) for image, label in zip(images, labels, strict=True)
    ]


class ModelRejected(ModelUnavailable):
    """A version whose file must not be served: its SHA-256 differs from the one recorded at
    registration (corrupt or tampered), or it does not load. Refused until the registry changes."""

    def __init__(self, message: str, version: str) -> None:
        super().__init__(message)
        self.version = version


class RegistryUnreachable(ModelUnavailable):
    """The registry did not answer (tracking server down, network): worth asking again later."""


@dataclass
class ModelRef:
    """Where the served model came from (shown by the model-info endpoint)."""

    path: Path
    name: str
    version: str
    alias: str
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    # The served file's SHA-256, and whether it matched the one recorded at registration
    # (False: the version was registered before registration recorded it; see resolve_model).
    sha256: str = ""
    verified: bool = False


def lookup_version(tracking_uri: str, name: str, alias: str) -> Any:
    """The registry's ModelVersion behind ``<name>@<alias>`` (one small request: what a poll
    costs). ModelUnavailable when no version has the alias; RegistryUnreachable when the
    registry does not answer."""
    import mlflow
    from mlflow.protos.databricks_pb2 import (
        INVALID_PARAMETER_VALUE,
        RESOURCE_DOES_NOT_EXIST,
        ErrorCode,
    )

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    missing = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in missing:
            raise ModelUnavailable(
                f"no model version has the alias {alias!r} in registered model {name!r} at "
                f"{redact_uri(tracking_uri)}: train and promote one "
                "(python -m pipelines.training_flow)."
            ) from exc
        raise RegistryUnreachable(
            f"the model registry at {redact_uri(tracking_uri)} does not answer "
            f"({scrub_credentials(str(exc))[:300]}): start the tracking server or fix "
            "MLFLOW_TRACKING_URI."
        ) from exc
    except OSError as exc:  # a connection error that MLflow did not wrap
        raise RegistryUnreachable(
            f"the model registry at {redact_uri(tracking_uri)} does not answer "
            f"({scrub_credentials(str(exc))})."
        ) from exc


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks (a model can be larger than one read should be)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model(
    tracking_uri: str,
    name: str,
    alias: str,
    dest: Path,
    require_sha256: bool = False,
    version: Any = None,
) -> ModelRef:
    """Download ``models:/<name>@<alias>``'s ONNX file into ``dest`` and verify it.

    The file must hash to the ``onnx_sha256`` its registration recorded, else ModelRejected: a
    corrupt or tampered file is never served. A version registered before registration recorded
    the hash is served unverified with a logged warning, or refused with ``require_sha256``
    (serving.require_sha256); its hash is never computed and trusted silently. ``version`` is
    the ModelVersion a caller already looked up (lookup_version), which pins what is
    downloaded even if the alias moves meanwhile. ModelUnavailable says why nothing can be.
    """
    import mlflow

    from imageclf.registry import SHA256_TAG

    version = version or lookup_version(tracking_uri, name, alias)
    number = str(version.version)
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{number}",
                dst_path=str(dest),
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
            )
        )
    except mlflow.exceptions.MlflowException as exc:
        raise RegistryUnreachable(
            f"{name} v{number}'s files cannot be downloaded from {redact_uri(tracking_uri)}: "
            f"{scrub_credentials(str(exc))[:300]}"
        ) from exc
    onnx_files = sorted(local.rglob("*.onnx"))
    if not onnx_files:
        raise ModelRejected(f"{name} v{number} has no ONNX file in its artifacts.", number)
    digest = file_sha256(onnx_files[0])
    recorded = version.tags.get(SHA256_TAG)
    if recorded is None:
        unverified = (
            f"{name} v{number} has no {SHA256_TAG} tag (registered before registration recorded "
            "it), so its file cannot be verified"
        )
        if require_sha256:
            raise ModelRejected(
                f"{unverified}: refused (serving.require_sha256). Register the model again "
                "(python -m imageclf.registry register) and promote the new version.",
                number,
            )
        log.warning("%s: serving it unverified (serving.require_sha256 is off)", unverified)
    elif recorded != digest:
        raise ModelRejected(
            f"{name} v{number}'s ONNX file is corrupt or tampered: its SHA-256 {digest[:16]}... "
            f"differs from the {recorded[:16]}... recorded at registration. Not served; restore "
            "the file in the artifact store or promote another version.",
            number,
        )
    metrics: dict[str, float] = {}
    if version.run_id:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        run = client.get_run(version.run_id)
        metrics = {
            k: v
            for k, v in run.data.metrics.items()
            if k in ("test_accuracy", "macro_f1", SERVED_LATENCY_METRIC)
        }
    return ModelRef(
        onnx_files[0],
        name,
        number,
        alias,
        version.run_id,
        metrics,
        sha256=digest,
        verified=recorded is not None,
    )


class OnnxClassifier:
    """An exported model in ONNX Runtime, described by the metadata the export stage wrote."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        from imageclf.onnx_runtime import onnx_metadata, ort_session

        self.path = Path(path)
        self.session = ort_session(self.path, threads)
        meta = onnx_metadata(self.path)
        if "classes" not in meta or "input" not in meta:
            raise ModelUnavailable(f"{path} lacks the class/input metadata of the export stage.")
        self.classes: list[str] = json.loads(meta["classes"])
        spec = json.loads(meta["input"])
        self.size, self.channels = int(spec["height"]), int(spec["channels"])
        self.output_kind = meta.get("output", "logits")
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (N, H, W, C) -> class probabilities (N, K) and, when the model exports one,
        the penultimate-layer embedding (N, D) monitoring compares with the training data."""
        outputs = self.session.run(None, {self.input_name: to_model_array(images)})
        scores = outputs[0].astype(np.float64)
        scores -= scores.max(axis=1, keepdims=True)  # softmax of logits or of log-probabilities
        exp = np.exp(scores)
        probs = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
        return probs, (outputs[1] if len(outputs) > 1 else None)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) -> class probabilities (N, K)."""
        return self.predict(images)[0]

    def top_k(self, probs: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        k = max(1, min(k, len(self.classes)))
        order = np.argsort(-probs, axis=1)[:, :k]
        return [
            [{"label": self.classes[i], "index": int(i), "probability": float(row[i])} for i in idx]
            for row, idx in zip(probs, order, strict=True)
        ]


BatchFn = Callable[[np.ndarray], tuple["np.ndarray | None", ...]]


class AdaptiveBatcher:
    """Gather concurrent requests into one model call: up to ``max_batch_size`` images, waiting
    at most ``max_latency_ms`` after the first one arrives for more to come.

    ``fn`` maps a uint8 (N, H, W, C) batch to a tuple of per-image arrays (N, ...) or None, e.g.
    ``OnnxClassifier.predict`` (probabilities, embedding); whatever else is per image and
    vectorises (the monitoring summary) belongs in it too, computed once per batch. Each caller
    gets the rows of every output that belong to its images.

    At most ``max_queue_images`` images wait for the model: beyond that ``submit`` raises
    Overloaded at once, so under overload clients are told to come back instead of every
    request waiting longer and longer (and timing out anyway).

    One batch runs at a time on a dedicated thread, so the event loop keeps accepting requests
    while the model works and whatever queued meanwhile forms the next batch at once: under
    load, batches grow by themselves even with ``max_latency_ms`` 0 (which then costs a lone
    request nothing); a positive value trades that much latency for fuller batches.
    """

    def __init__(
        self, fn: BatchFn, max_batch_size: int, max_latency_ms: float, max_queue_images: int
    ) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_latency = max_latency_ms / 1000.0
        self.max_queue_images = max_queue_images
        self.queued_images = 0  # submitted, not yet taken into a batch
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.images = 0

    def _ensure_started(self) -> asyncio.Queue:
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._queue

    def close(self) -> None:
        """Stop the batch task and the model thread (a replaced model's batcher)."""
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False)

    async def submit(self, images: np.ndarray) -> tuple[np.ndarray | None, ...]:
        """``fn``'s outputs for ``images`` (N, H, W, C), computed in some shared batch."""
        if self.queued_images + len(images) > self.max_queue_images:
            raise Overloaded(
                f"the service is overloaded: {self.queued_images} images are waiting for the "
                f"model (serving.max_queue_images {self.max_queue_images}); retry shortly."
            )
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._ensure_started().put_nowait((images, future))
        self.queued_images += len(images)
        return await future

    def _take(self, item: tuple[np.ndarray, asyncio.Future]) -> tuple[np.ndarray, asyncio.Future]:
        self.queued_images -= len(item[0])
        return item

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = self._take(await self._queue.get())
            pending = [first]
            count = len(first[0])
            deadline = loop.time() + self.max_latency
            while count < self.max_batch_size:
                if self._queue.empty():  # nothing waiting: wait a little for more, if allowed
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), timeout)
                    except TimeoutError:
                        break
                else:  # requests that queued while the model was busy join this batch at once
                    item = self._queue.get_nowait()
                pending.append(self._take(item))
                count += len(item[0])
            batch = np.concatenate([images for images, _ in pending])
            try:
                outputs = await loop.run_in_executor(self._executor, self.fn, batch)
            except Exception as exc:  # the model failed: fail these requests, keep serving
                for _, future in pending:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(batch)
            start = 0
            for images, future in pending:
                end = start + len(images)
                if not future.done():
                    future.set_result(tuple(None if o is None else o[start:end] for o in outputs))
                start = end


def read_image_file(path: Path, max_bytes: int) -> bytes:
    """A file's bytes for decoding, read no further than ``max_bytes``: only a regular file (a
    link to /dev/zero would never end, a FIFO would block the run), checked on the opened file
    itself, so nothing can be swapped in between the check and the read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(
                f"{path.name} is not a regular file (a folder, device, FIFO or socket): only image "
                "files are read."
            )
        if info.st_size > max_bytes:
            raise InputError(
                f"{path.name} is {info.st_size} bytes, over the {max_bytes}-byte limit "
                "(serving.max_request_bytes).",
                status=413,
            )
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(max_bytes + 1)  # a file that grew is caught by decode_image
    finally:
        os.close(fd)


def classify_files(
    model: OnnxClassifier,
    files: Sequence[Path],
    limits: ServingParams,
    top_k: int,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """Offline batch inference over image files: one row per file, in order; a file that cannot
    be read gets its reason in ``error`` instead of stopping the run."""
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        chunk_rows: list[dict[str, Any]] = [{"file": str(path), "error": ""} for path in chunk]
        arrays, ok = [], []
        for row, path in zip(chunk_rows, chunk, strict=True):
            try:
                data = read_image_file(path, limits.max_request_bytes)
                arrays.append(decode_image(data, limits, model.size, model.channels, path.name))
                ok.append(row)
            except (InputError, OSError) as exc:
                row["error"] = str(exc)
        if arrays:
            t0 = time.perf_counter()
            probs = model.probabilities(np.stack(arrays))
            per_image_ms = (time.perf_counter() - t0) * 1000 / len(arrays)
            for row, top in zip(ok, model.top_k(probs, top_k), strict=True):
                for rank, entry in enumerate(top, 1):
                    row[f"label_{rank}"] = entry["label"]
                    row[f"probability_{rank}"] = round(entry["probability"], 6)
                row["ms_per_image"] = round(per_image_ms, 4)
        rows.extend(chunk_rows)
    return rows

"""The BentoML service: the registry's champion ONNX model over HTTP, with a web page.

    bentoml serve services.service:ImageClassifier --port 3000

Model: ``models:/<registry.model_name>@<serving.alias>`` from the MLflow registry at
``$MLFLOW_TRACKING_URI`` (default: the project's mlflow.db); ``IMAGECLF_SERVING_ALIAS``
overrides the alias. Without such a model the service still starts, reports not-ready on
``/readyz`` and says why on every endpoint (503).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import Counter, Histogram

from imageclf.config import load_params
from imageclf.deploy.serving import (
    AdaptiveBatcher,
    Example,
    InputError,
    ModelRef,
    ModelUnavailable,
    OnnxClassifier,
    decode_image,
    encode_png,
    load_examples,
    resolve_model,
)
from imageclf.paths import get_paths
from imageclf.registry import download_examples
from imageclf.tracking import tracking_uri
from monitoring.features import pixel_features
from monitoring.prediction_log import BackgroundWriter, PredictionLog
from services.limits import BodySizeLimit, install_request_timeout
from services.schemas import (
    BatchClassification,
    Classification,
    ExampleImage,
    ModelInfo,
    ServedModel,
    TopClass,
)

log = logging.getLogger("imageclf.service")
PARAMS = load_params(get_paths().params)
LIMITS = PARAMS.serving
STATIC = Path(__file__).parent / "static"


def use_upload_temp_dir(path: str) -> None:
    """Spool this process's temp files (BentoML's per-request upload files) under ``path``.

    Each `Path` input becomes a file that is created, read and deleted within the request; on
    a RAM-backed directory that is a memory copy, on a journaling disk it cost ~15% of the
    service's CPU at concurrency 32 (measured with py-spy and /proc CPU time per request)."""
    if not path:
        return
    # Room for a full concurrent load of the largest uploads, else a burst could fail with
    # ENOSPC (a container's /dev/shm is 64 MiB by default): then the disk is the safer place.
    needed = 64 * LIMITS.max_request_bytes
    if not (os.path.isdir(path) and os.access(path, os.W_OK)):
        log.warning("serving.upload_temp_dir %s is not a writable directory: not used", path)
    elif shutil.disk_usage(path).free < needed:
        log.warning(
            "serving.upload_temp_dir %s has under %d MiB free: not used", path, needed >> 20
        )
    else:
        tempfile.tempdir = path


use_upload_temp_dir(LIMITS.upload_temp_dir)
install_request_timeout()

web = FastAPI(title="imageclf web page", docs_url=None, redoc_url=None, openapi_url=None)

# Served on /metrics next to BentoML's own (BentoML aggregates its workers' multiprocess files).
PREDICTIONS = Counter(
    "imageclf_predictions", "Predictions served, by predicted class.", ["label", "model_version"]
)
INFERENCE_LATENCY = Histogram(
    "imageclf_inference_latency_seconds",
    "Decoded images to probabilities, batching included.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
)


class ClientError(BentoMLException):
    """A 4xx whose message tells the client what to fix."""


def _client_error(exc: InputError) -> ClientError:
    return ClientError(str(exc), error_code=HTTPStatus(exc.status))


@bentoml.service(
    name="imageclf",
    workers=LIMITS.workers,
    traffic={"timeout": 30},
    logging={
        "access": {
            "enabled": LIMITS.access_log,
            "skip_paths": ["/livez", "/readyz", "/metrics"],
        }
    },
)
@bentoml.asgi_app(web, path="/ui")
class ImageClassifier:
    """Fashion-MNIST (or any trained) classifier: the champion of the MLflow registry."""

    def __init__(self) -> None:
        self.model: OnnxClassifier | None = None
        self.ref: ModelRef | None = None
        self.batcher: AdaptiveBatcher | None = None
        self.served: ServedModel | None = None
        self.counters: list[Any] = []
        self.examples: list[Example] = []
        self.not_ready_reason = ""
        alias = os.environ.get("IMAGECLF_SERVING_ALIAS", LIMITS.alias)
        try:
            self.ref = resolve_model(tracking_uri(get_paths()), PARAMS.registry.model_name, alias)
            self.model = OnnxClassifier(self.ref.path, LIMITS.threads)
            self.batcher = AdaptiveBatcher(
                self._infer, LIMITS.max_batch_size, LIMITS.max_latency_ms
            )
            self.served = ServedModel(
                name=self.ref.name, version=self.ref.version, alias=self.ref.alias
            )
            # One Prometheus child per class, looked up once instead of per prediction.
            self.counters = [PREDICTIONS.labels(c, self.ref.version) for c in self.model.classes]
            self.examples = self._load_examples(self.ref)
            log.info("serving %s v%s (@%s)", self.ref.name, self.ref.version, alias)
        except ModelUnavailable as exc:
            self.not_ready_reason = str(exc)
            log.warning("not ready: %s", exc)
        self.prediction_log: BackgroundWriter | None = None
        if PARAMS.monitoring.log_predictions and self.model is not None:
            path = get_paths().resolve(PARAMS.monitoring.log_path)
            self.prediction_log = BackgroundWriter(
                PredictionLog(path, PARAMS.monitoring.log_max_rows)
            )
        # Everything loaded so far (BentoML, MLflow, pydantic models...) lives as long as the
        # process: move it out of the garbage collector's sight, so full collections triggered
        # by per-request allocations stay short instead of stalling requests (tail latency).
        gc.collect()
        gc.freeze()

    @staticmethod
    def _load_examples(ref: ModelRef) -> list[Example]:
        """The test images registered with the served version, for the page to offer: they
        follow the version (its classes, its input size), through promotions and rollbacks.
        A version without them, or a store that cannot hand them out, costs only the examples."""
        import mlflow

        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = download_examples(
                    tracking_uri(get_paths()), ref.name, ref.version, Path(tmp)
                )
                return load_examples(path) if path is not None else []
        except (mlflow.exceptions.MlflowException, OSError, ValueError, KeyError) as exc:
            log.warning("no example images for %s v%s: %s", ref.name, ref.version, exc)
            return []

    def __is_ready__(self) -> bool:
        return self.model is not None

    @bentoml.on_shutdown
    def flush_prediction_log(self) -> None:
        """Write the rows still queued (up to 0.25 s of traffic) before the worker exits."""
        if self.prediction_log is not None:
            self.prediction_log.close()

    # ----------------------------------------------------------------- the inference path
    def _require_model(self) -> tuple[OnnxClassifier, AdaptiveBatcher]:
        if self.model is None or self.batcher is None:
            raise BentoMLException(
                f"no model is loaded: {self.not_ready_reason}",
                error_code=HTTPStatus.SERVICE_UNAVAILABLE,
            )
        return self.model, self.batcher

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray | None, ...]:
        """One batch, on the batcher's thread: probabilities, embeddings and, when predictions
        are logged, the monitoring summary (vectorised over the batch, off the event loop)."""
        assert self.model is not None
        probs, embeddings = self.model.predict(batch)
        pixels = pixel_features(batch) if self.prediction_log is not None else None
        return probs, embeddings, pixels

    async def _classify_arrays(self, arrays: list[np.ndarray], top_k: int) -> BatchClassification:
        model, batcher = self._require_model()
        started = time.perf_counter()
        batch = np.stack(arrays)
        probs, embeddings, pixels = await batcher.submit(batch)
        assert probs is not None
        latency_ms = (time.perf_counter() - started) * 1000
        INFERENCE_LATENCY.observe(latency_ms / 1000)
        predicted = probs.argmax(1)
        for k in predicted:
            self.counters[k].inc()
        if self.prediction_log is not None and pixels is not None:
            self._log_predictions(batch, predicted, probs, embeddings, pixels, latency_ms)
        return BatchClassification(
            predictions=[[TopClass(**c) for c in image] for image in model.top_k(probs, top_k)],
            model=self.served,
            inference_ms=round(latency_ms, 3),
        )

    def _log_predictions(
        self,
        batch: np.ndarray,
        predicted: np.ndarray,
        probs: np.ndarray,
        embeddings: np.ndarray | None,
        pixels: np.ndarray,
        latency_ms: float,
    ) -> None:
        """Queue one log row per image: the rows are built, and written, on the log's thread."""
        assert self.prediction_log is not None and self.ref is not None and self.model
        now, version, classes = time.time(), self.ref.version, self.model.classes
        images = batch if PARAMS.monitoring.log_images else None

        def rows() -> list[tuple]:
            return [
                PredictionLog.row(
                    now,
                    version,
                    int(k),
                    classes[int(k)],
                    float(probs[i, k]),
                    latency_ms,
                    pixels[i],
                    None if embeddings is None else embeddings[i],
                    None if images is None else encode_png(images[i]),
                )
                for i, k in enumerate(predicted)
            ]

        self.prediction_log.put(rows)

    def _decode(self, data: bytes, name: str) -> np.ndarray:
        model, _ = self._require_model()
        try:
            return decode_image(data, LIMITS, model.size, model.channels, name=name)
        except InputError as exc:
            raise _client_error(exc) from exc

    def _check_top_k(self, top_k: int) -> int:
        if top_k < 1:
            raise ClientError(
                f"top_k must be at least 1, got {top_k}.", error_code=HTTPStatus.BAD_REQUEST
            )
        return top_k

    async def classify_bytes(self, data: bytes, top_k: int, name: str = "image") -> Classification:
        """One image's bytes -> top-k (the path every single-image endpoint takes)."""
        result = await self._classify_arrays([self._decode(data, name)], self._check_top_k(top_k))
        return Classification(
            predictions=result.predictions[0], model=result.model, inference_ms=result.inference_ms
        )

    # ------------------------------------------------------------------ BentoML endpoints
    @bentoml.api(route="/classify")
    async def classify(self, image: Path, top_k: int = LIMITS.top_k) -> Classification:
        """Classify one uploaded image (PNG, JPEG...; any size or colour mode)."""
        return await self.classify_bytes(image.read_bytes(), top_k, name="image")

    async def _classify_files(self, images: list[Path], top_k: int) -> BatchClassification:
        if not images:
            raise ClientError(
                "no images: send one or more files in the field 'images'.",
                error_code=HTTPStatus.BAD_REQUEST,
            )
        if len(images) > LIMITS.max_images_per_request:
            raise ClientError(
                f"{len(images)} images is over the limit of "
                f"{LIMITS.max_images_per_request} per request.",
                error_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        arrays = [self._decode(p.read_bytes(), f"images[{i}]") for i, p in enumerate(images)]
        return await self._classify_arrays(arrays, self._check_top_k(top_k))

    @bentoml.api(route="/classify_batch")
    async def classify_batch(
        self, images: list[Path], top_k: int = LIMITS.top_k
    ) -> BatchClassification:
        """Classify several images in one request (at most serving.max_images_per_request)."""
        return await self._classify_files(images, top_k)

    @bentoml.task(route="/classify_async")
    async def classify_async(
        self, images: list[Path], top_k: int = LIMITS.top_k
    ) -> BatchClassification:
        """The batch endpoint as a background task: submit, poll status, fetch the result."""
        return await self._classify_files(images, top_k)

    @bentoml.api(route="/model_info")
    def model_info(self) -> ModelInfo:
        """Which model is served (name, version, alias, metrics) or why none is."""
        if self.model is None or self.ref is None:
            return ModelInfo(ready=False, reason=self.not_ready_reason)
        batcher = self.batcher
        return ModelInfo(
            ready=True,
            name=self.ref.name,
            version=self.ref.version,
            alias=self.ref.alias,
            run_id=self.ref.run_id,
            metrics=self.ref.metrics,
            classes=self.model.classes,
            input={
                "height": self.model.size,
                "width": self.model.size,
                "channels": self.model.channels,
            },
            limits=LIMITS.model_dump(),
            mean_batch_size=round(batcher.images / batcher.batches, 2)
            if batcher is not None and batcher.batches
            else None,
        )

    # ------------------------------------------------------- the web page (mounted at /ui)
    @web.get("/")
    def page(self) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @web.post("/api/classify")
    async def page_classify(self, request: Request) -> JSONResponse:
        """Raw image bytes in the body (what the page sends): the leanest path to the model."""
        try:
            top_k = int(request.query_params.get("top_k", LIMITS.top_k))
            result = await self.classify_bytes(await request.body(), top_k)
        except ValueError:
            return JSONResponse({"error": "top_k must be an integer."}, status_code=400)
        except BentoMLException as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.error_code.value)
        return Response(result.model_dump_json(), media_type="application/json")

    @web.get("/api/examples")
    def page_examples(self) -> JSONResponse:
        """The served version's example images: label and where to fetch each one."""
        examples = [
            ExampleImage(index=i, label=e.label, url=f"api/examples/{i}").model_dump()
            for i, e in enumerate(self.examples)
        ]
        return JSONResponse({"examples": examples})

    @web.get("/api/examples/{index}")
    def page_example(self, index: int) -> Response:
        if not 0 <= index < len(self.examples):
            return JSONResponse(
                {"error": f"no example {index}: GET api/examples lists the {len(self.examples)}."},
                status_code=404,
            )
        return Response(
            self.examples[index].png,
            media_type="image/png",
            headers={"Cache-Control": "max-age=3600"},
        )

    @web.get("/api/info")
    def page_info(self) -> JSONResponse:
        return Response(
            self.model_info().model_dump_json(),
            media_type="application/json",
            status_code=200 if self.model else 503,
        )


ImageClassifier.add_asgi_middleware(BodySizeLimit, max_bytes=LIMITS.max_request_bytes)

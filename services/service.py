"""The BentoML service: the registry's champion ONNX model over HTTP, with a web page.

    bentoml serve services.service:ImageClassifier --port 3000

Model: ``models:/<registry.model_name>@<serving.alias>`` from the MLflow registry at
``$MLFLOW_TRACKING_URI`` (default: the project's mlflow.db); ``IMAGECLF_SERVING_ALIAS``
overrides the alias. Without such a model the service still starts, reports not-ready on
``/readyz`` and says why on every endpoint (503).
"""

from __future__ import annotations

import gc
import io
import logging
import os
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from prometheus_client import Counter, Histogram

from imageclf.config import load_params
from imageclf.paths import get_paths
from imageclf.serving import (
    AdaptiveBatcher,
    InputError,
    ModelRef,
    ModelUnavailable,
    OnnxClassifier,
    decode_image,
    resolve_model,
)
from imageclf.tracking import tracking_uri
from monitoring.features import pixel_features
from monitoring.prediction_log import BackgroundWriter, PredictionLog
from services.limits import BodySizeLimit

log = logging.getLogger("imageclf.service")
PARAMS = load_params(get_paths().params)
LIMITS = PARAMS.serving
STATIC = Path(__file__).parent / "static"

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


def png_bytes(image: np.ndarray) -> bytes:
    """A model-sized uint8 HWC image as PNG (for the prediction log, when images are on)."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


class ClientError(BentoMLException):
    """A 4xx whose message tells the client what to fix."""


def _client_error(exc: InputError) -> ClientError:
    return ClientError(str(exc), error_code=HTTPStatus(exc.status))


@bentoml.service(
    name="imageclf",
    workers=LIMITS.workers,
    traffic={"timeout": 30},
    logging={"access": {"enabled": True, "skip_paths": ["/livez", "/readyz", "/metrics"]}},
)
@bentoml.asgi_app(web, path="/ui")
class ImageClassifier:
    """Fashion-MNIST (or any trained) classifier: the champion of the MLflow registry."""

    def __init__(self) -> None:
        self.model: OnnxClassifier | None = None
        self.ref: ModelRef | None = None
        self.batcher: AdaptiveBatcher | None = None
        self.not_ready_reason = ""
        alias = os.environ.get("IMAGECLF_SERVING_ALIAS", LIMITS.alias)
        try:
            self.ref = resolve_model(tracking_uri(get_paths()), PARAMS.registry.model_name, alias)
            self.model = OnnxClassifier(self.ref.path, LIMITS.threads)
            self.batcher = AdaptiveBatcher(self.model, LIMITS.max_batch_size, LIMITS.max_latency_ms)
            log.info("serving %s v%s (@%s)", self.ref.name, self.ref.version, alias)
        except ModelUnavailable as exc:
            self.not_ready_reason = str(exc)
            log.warning("not ready: %s", exc)
        self.prediction_log: BackgroundWriter | None = None
        if PARAMS.monitoring.log_predictions and self.model is not None:
            path = Path(PARAMS.monitoring.log_path)
            path = path if path.is_absolute() else get_paths().root / path
            self.prediction_log = BackgroundWriter(
                PredictionLog(path, PARAMS.monitoring.log_max_rows)
            )
        # Everything loaded so far (BentoML, MLflow, pydantic models...) lives as long as the
        # process: move it out of the garbage collector's sight, so full collections triggered
        # by per-request allocations stay short instead of stalling requests (tail latency).
        gc.collect()
        gc.freeze()

    def __is_ready__(self) -> bool:
        return self.model is not None

    # ----------------------------------------------------------------- the inference path
    def _require_model(self) -> tuple[OnnxClassifier, AdaptiveBatcher]:
        if self.model is None or self.batcher is None:
            raise BentoMLException(
                f"no model is loaded: {self.not_ready_reason}",
                error_code=HTTPStatus.SERVICE_UNAVAILABLE,
            )
        return self.model, self.batcher

    async def _classify_arrays(self, arrays: list[np.ndarray], top_k: int) -> dict[str, Any]:
        model, batcher = self._require_model()
        started = time.perf_counter()
        batch = np.stack(arrays)
        probs, embeddings = await batcher.submit(batch)
        latency_ms = (time.perf_counter() - started) * 1000
        INFERENCE_LATENCY.observe(latency_ms / 1000)
        version = self.ref.version if self.ref else "none"
        for k in probs.argmax(1):
            PREDICTIONS.labels(model.classes[int(k)], version).inc()
        if self.prediction_log is not None and self.ref is not None:
            self._log_predictions(batch, probs, embeddings, latency_ms)
        return {
            "predictions": model.top_k(probs, top_k),
            "model": {"name": self.ref.name, "version": self.ref.version, "alias": self.ref.alias}
            if self.ref
            else None,
            "inference_ms": round(latency_ms, 3),
        }

    def _log_predictions(
        self, batch: np.ndarray, probs: np.ndarray, embeddings: np.ndarray | None, latency_ms: float
    ) -> None:
        """Queue one log row per image (the disk write happens on the logger's thread)."""
        assert self.prediction_log is not None and self.ref is not None and self.model
        now = time.time()
        pixels = pixel_features(batch)
        predicted = probs.argmax(1)
        self.prediction_log.put(
            [
                PredictionLog.row(
                    now,
                    self.ref.version,
                    int(k),
                    self.model.classes[int(k)],
                    float(probs[i, k]),
                    latency_ms,
                    pixels[i],
                    None if embeddings is None else embeddings[i],
                    png_bytes(batch[i]) if PARAMS.monitoring.log_images else None,
                )
                for i, k in enumerate(predicted)
            ]
        )

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

    async def classify_bytes(self, data: bytes, top_k: int, name: str = "image") -> dict[str, Any]:
        """One image's bytes -> top-k (the path every single-image endpoint takes)."""
        result = await self._classify_arrays([self._decode(data, name)], self._check_top_k(top_k))
        result["predictions"] = result["predictions"][0]
        return result

    # ------------------------------------------------------------------ BentoML endpoints
    @bentoml.api(route="/classify")
    async def classify(self, image: Path, top_k: int = LIMITS.top_k) -> dict[str, Any]:
        """Classify one uploaded image (PNG, JPEG...; any size or colour mode)."""
        return await self.classify_bytes(image.read_bytes(), top_k, name="image")

    async def _classify_files(self, images: list[Path], top_k: int) -> dict[str, Any]:
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
    async def classify_batch(self, images: list[Path], top_k: int = LIMITS.top_k) -> dict[str, Any]:
        """Classify several images in one request (at most serving.max_images_per_request)."""
        return await self._classify_files(images, top_k)

    @bentoml.task(route="/classify_async")
    async def classify_async(self, images: list[Path], top_k: int = LIMITS.top_k) -> dict[str, Any]:
        """The batch endpoint as a background task: submit, poll status, fetch the result."""
        return await self._classify_files(images, top_k)

    @bentoml.api(route="/model_info")
    def model_info(self) -> dict[str, Any]:
        """Which model is served (name, version, alias, metrics) or why none is."""
        if self.model is None or self.ref is None:
            return {"ready": False, "reason": self.not_ready_reason}
        info: dict[str, Any] = {
            "ready": True,
            "name": self.ref.name,
            "version": self.ref.version,
            "alias": self.ref.alias,
            "run_id": self.ref.run_id,
            "metrics": self.ref.metrics,
            "classes": self.model.classes,
            "input": {
                "height": self.model.size,
                "width": self.model.size,
                "channels": self.model.channels,
            },
            "limits": LIMITS.model_dump(),
        }
        if self.batcher is not None and self.batcher.batches:
            info["mean_batch_size"] = round(self.batcher.images / self.batcher.batches, 2)
        return info

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
        return JSONResponse(result)

    @web.get("/api/info")
    def page_info(self) -> JSONResponse:
        return JSONResponse(self.model_info(), status_code=200 if self.model else 503)


ImageClassifier.add_asgi_middleware(BodySizeLimit, max_bytes=LIMITS.max_request_bytes)

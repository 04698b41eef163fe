"""The BentoML service: the registry's champion ONNX model over HTTP, with a web page.

    bentoml serve services.service:ImageClassifier --port 3000

Model: ``models:/<registry.model_name>@<serving.alias>`` from the MLflow registry at
``$MLFLOW_TRACKING_URI`` (default: the project's mlflow.db); ``IMAGECLF_SERVING_ALIAS``
overrides the alias. Without such a model the service still starts, reports not-ready on
``/readyz`` and says why on every endpoint (503). Each worker looks the alias up again every
``serving.poll_seconds`` and swaps in the version it names once downloaded and verified
(imageclf/deploy/champion.py): promotions, rollbacks and a registry coming back need no restart.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Coroutine
from http import HTTPStatus
from pathlib import Path
from typing import Any, get_origin

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import Counter, Histogram

from imageclf.config import load_params
from imageclf.deploy.champion import ChampionWatcher, LoadedVersion, bound_registry_calls
from imageclf.deploy.inference import (
    AdaptiveBatcher,
    Decoder,
    Example,
    InputError,
    ModelRef,
    OnnxClassifier,
    Overloaded,
    encode_png,
)
from imageclf.paths import get_paths
from imageclf.tracking import tracking_uri
from monitoring.features import pixel_features
from monitoring.metrics import forget_exited_workers, refresh_drift_metrics, set_model_ready
from monitoring.prediction_log import BackgroundWriter, PredictionLog
from services.limits import (
    ApiToken,
    BodySizeLimit,
    ErrorBodies,
    FormSpec,
    LingeringClose,
    TaskLimit,
    UploadForms,
    bound_request_temp_dirs,
    install_request_timeout,
    install_route_labelled_metrics,
    log_refusals_in_one_line,
)
from services.schemas import (
    BatchClassification,
    Classification,
    ExampleImage,
    ModelInfo,
    ServedModel,
    TopClass,
)

log = logging.getLogger("imageclf.service")
# Importing this module only defines the service; a worker sets itself up when BentoML builds the
# service object (ImageClassifier.__init__). What stays at import is what BentoML reads from the
# class before any instance exists: params.yaml's serving section (the decorator's workers and
# access log, the endpoints' default top_k, the middlewares' limits at the end of this file), the
# middleware stack itself, and RequestTimeout in place of BentoML's timeout middleware (there).
LIMITS = load_params(get_paths().params).serving
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


web = FastAPI(title="imageclf web page", docs_url=None, redoc_url=None, openapi_url=None)
# The page's routes (mounted at /ui), written once: for its handlers and for /metrics' labels.
PAGE_ROUTES = {
    "page": "/",
    "classify": "/api/classify",
    "examples": "/api/examples",
    "example": "/api/examples/{index}",
    "info": "/api/info",
}

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


def overloaded(exc: Overloaded) -> JSONResponse:
    """503 with Retry-After: the inference queue is full, come back shortly."""
    return JSONResponse(
        {"error": str(exc)},
        status_code=HTTPStatus.SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(LIMITS.retry_after_s)},
    )


async def answer(work: Awaitable[Any]) -> Any:
    """An endpoint's result, or the answer that says why there is none.

    BentoML replaces the message of every 5xx raised in an endpoint with "An unexpected error
    has occurred": a full queue (503, come back) or a service without a model (503, and why)
    would reach the client without their reason. Those are answered here instead."""
    try:
        return await work
    except Overloaded as exc:
        return overloaded(exc)
    except BentoMLException as exc:
        if exc.error_code < HTTPStatus.INTERNAL_SERVER_ERROR:
            raise
        return JSONResponse({"error": exc.message}, status_code=exc.error_code.value)


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
        # This worker process's settings, before anything below makes a temp folder or asks the
        # registry: upload temp files (and the model folder) on serving.upload_temp_dir, and
        # MLflow's calls bounded by serving.registry_timeout_s.
        use_upload_temp_dir(LIMITS.upload_temp_dir)
        bound_registry_calls(LIMITS.registry_timeout_s)
        log_refusals_in_one_line()  # bad input is a line in the log, not a traceback
        bound_request_temp_dirs()  # a burst's upload folders do not stay in /dev/shm
        params = load_params(get_paths().params)  # the registry and monitoring sections
        # Decodes uploads on serving.decode_threads threads per worker, off the event loop.
        self.decoder = Decoder(LIMITS)
        self.model: OnnxClassifier | None = None
        self.ref: ModelRef | None = None
        self.batcher: AdaptiveBatcher | None = None
        self.served: ServedModel | None = None
        self.counters: list[Any] = []
        self.examples: list[Example] = []
        # Downloads, verifies and loads the alias's version into a folder this worker owns;
        # the first look is here, the next ones every serving.poll_seconds (follow_champion).
        self.watcher = ChampionWatcher(
            tracking_uri(get_paths()),
            params.registry.model_name,
            os.environ.get("IMAGECLF_SERVING_ALIAS", LIMITS.alias),
            LIMITS,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        loaded = self.watcher.poll()
        if loaded is not None:
            self._swap(loaded)
        self.not_ready_reason = self.watcher.reason
        self.prediction_log: BackgroundWriter | None = None
        self.log_images = params.monitoring.log_images
        if params.monitoring.log_predictions:
            path = get_paths().resolve(params.monitoring.log_path)
            self.prediction_log = BackgroundWriter(
                PredictionLog(path, params.monitoring.log_max_rows)
            )
        # Everything loaded so far (BentoML, MLflow, pydantic models...) lives as long as the
        # process: move it out of the garbage collector's sight, so full collections triggered
        # by per-request allocations stay short instead of stalling requests (tail latency).
        gc.collect()
        gc.freeze()

    # ------------------------------------------- following the champion (no restart needed)
    def _swap(self, loaded: LoadedVersion) -> None:
        """Serve ``loaded`` from the next request on, with its own batcher, Prometheus counters
        and examples. Plain assignments with no await between them: no request sees half of a
        swap. Requests already waiting on the previous batcher finish on the previous model."""
        previous = self.batcher
        self.batcher = AdaptiveBatcher(
            functools.partial(self._infer, loaded.model),
            LIMITS.max_batch_size,
            LIMITS.max_latency_ms,
            LIMITS.max_queue_images,
        )
        ref = loaded.ref
        self.ref, self.model, self.examples = ref, loaded.model, loaded.examples
        self.served = ServedModel(name=ref.name, version=ref.version, alias=ref.alias)
        # One Prometheus child per class, looked up once instead of per prediction.
        self.counters = [PREDICTIONS.labels(c, ref.version) for c in loaded.model.classes]
        log.info("serving %s v%s (@%s)", ref.name, ref.version, ref.alias)
        if previous is not None:
            self._background(self._retire(previous))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _retire(batcher: AdaptiveBatcher) -> None:
        """Stop a replaced batcher once every request that could still be using it is over
        (answered or timed out by BentoML), releasing its thread and its model."""
        await asyncio.sleep(ImageClassifier.config["traffic"]["timeout"])
        batcher.close()

    async def _follow(self) -> None:
        """Look up the alias every serving.poll_seconds; swap in the version it names once
        loaded and verified. Each worker polls on its own. The same beat brings the drift
        verdict and this worker's readiness to /metrics (monitoring.metrics), and drops what
        killed workers last reported there."""
        verdict = get_paths().monitoring_verdict
        while True:
            forget_exited_workers()
            set_model_ready(self.model is not None)
            refresh_drift_metrics(verdict)
            await asyncio.sleep(LIMITS.poll_seconds)
            try:
                loaded = await asyncio.to_thread(self.watcher.poll)
                if loaded is not None:
                    self._swap(loaded)
            except Exception:  # a poll must never stop the polling: log it, look again later
                log.exception("looking up the champion failed")
            self.not_ready_reason = self.watcher.reason

    @bentoml.on_startup
    async def follow_champion(self) -> None:
        self._background(self._follow())

    @bentoml.on_shutdown
    def stop_following(self) -> None:
        """Stop polling and remove this worker's model files."""
        for task in list(self._tasks):
            task.cancel()
        self.watcher.close()

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
                f"no model is loaded: {self.not_ready_reason} (the service retries every "
                f"{LIMITS.poll_seconds:g} s)",
                error_code=HTTPStatus.SERVICE_UNAVAILABLE,
            )
        return self.model, self.batcher

    def _infer(self, model: OnnxClassifier, batch: np.ndarray) -> tuple[np.ndarray | None, ...]:
        """One batch, on the batcher's thread: probabilities, embeddings and, when predictions
        are logged, the monitoring summary (vectorised over the batch, off the event loop).
        ``model`` is the version the batcher was made for, even after a swap."""
        probs, embeddings = model.predict(batch)
        pixels = pixel_features(batch) if self.prediction_log is not None else None
        return probs, embeddings, pixels

    async def _classify_arrays(self, arrays: list[np.ndarray], top_k: int) -> BatchClassification:
        model, batcher = self._require_model()
        served, counters = self.served, self.counters  # this version's, even if one is swapped in
        started = time.perf_counter()
        batch = np.stack(arrays)
        probs, embeddings, pixels = await batcher.submit(batch)
        assert probs is not None
        latency_ms = (time.perf_counter() - started) * 1000
        INFERENCE_LATENCY.observe(latency_ms / 1000)
        predicted = probs.argmax(1)
        for k in predicted:
            counters[k].inc()
        if self.prediction_log is not None and pixels is not None and served is not None:
            self._log_predictions(
                served.version,
                model.classes,
                batch,
                predicted,
                probs,
                embeddings,
                pixels,
                latency_ms,
            )
        return BatchClassification(
            predictions=[[TopClass(**c) for c in image] for image in model.top_k(probs, top_k)],
            model=served,
            inference_ms=round(latency_ms, 3),
        )

    def _log_predictions(
        self,
        version: str,
        classes: list[str],
        batch: np.ndarray,
        predicted: np.ndarray,
        probs: np.ndarray,
        embeddings: np.ndarray | None,
        pixels: np.ndarray,
        latency_ms: float,
    ) -> None:
        """Queue one log row per image: the rows are built, and written, on the log's thread.
        ``version`` and ``classes`` are those of the model that answered, even across a swap."""
        assert self.prediction_log is not None
        now = time.time()
        images = batch if self.log_images else None

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

    async def _decode(self, source: bytes | Path, name: str) -> np.ndarray:
        """One upload decoded on the decoder's threads (off the event loop), or a 4xx."""
        model, _ = self._require_model()
        try:
            return await self.decoder.decode(source, model.size, model.channels, name=name)
        except InputError as exc:
            raise _client_error(exc) from exc

    def _check_top_k(self, top_k: int) -> int:
        model, _ = self._require_model()
        if not 1 <= top_k <= len(model.classes):
            raise ClientError(
                f"top_k must be between 1 and {len(model.classes)} (the model's classes), "
                f"got {top_k}.",
                error_code=HTTPStatus.BAD_REQUEST,
            )
        return top_k

    async def classify_bytes(
        self, data: bytes | Path, top_k: int, name: str = "image"
    ) -> Classification:
        """One image -> top-k (the path every single-image endpoint takes)."""
        top_k = self._check_top_k(top_k)
        result = await self._classify_arrays([await self._decode(data, name)], top_k)
        return Classification(
            predictions=result.predictions[0], model=result.model, inference_ms=result.inference_ms
        )

    # ------------------------------------------------------------------ BentoML endpoints
    @bentoml.api(route="/classify")
    async def classify(self, image: Path, top_k: int = LIMITS.top_k) -> Classification:
        """Classify one uploaded image (PNG, JPEG...; any size or colour mode)."""
        return await answer(self.classify_bytes(image, top_k, name="image"))

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
        top_k = self._check_top_k(top_k)
        arrays = await asyncio.gather(
            *(self._decode(path, f"images[{i}]") for i, path in enumerate(images))
        )
        return await self._classify_arrays(list(arrays), top_k)

    @bentoml.api(route="/classify_batch")
    async def classify_batch(
        self, images: list[Path], top_k: int = LIMITS.top_k
    ) -> BatchClassification:
        """Classify several images in one request (at most serving.max_images_per_request)."""
        return await answer(self._classify_files(images, top_k))

    @bentoml.task(route="/classify_async")
    async def classify_async(
        self, images: list[Path], top_k: int = LIMITS.top_k
    ) -> BatchClassification:
        """The batch endpoint as a background task: submit, poll status, fetch the result."""
        return await answer(self._classify_files(images, top_k))

    @bentoml.api(route="/model_info")
    def model_info(self) -> ModelInfo:
        """Which model is served (name, version, alias, metrics) or why none is."""
        if self.model is None or self.ref is None:
            return ModelInfo(ready=False, reason=self.not_ready_reason)
        batcher = self.batcher
        return ModelInfo(
            ready=True,
            # While serving: what else is wrong (a refused version, the registry down...).
            reason=self.not_ready_reason or None,
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
    @web.get(PAGE_ROUTES["page"])
    def page(self) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @web.post(PAGE_ROUTES["classify"])
    async def page_classify(self, request: Request) -> JSONResponse:
        """Raw image bytes in the body (what the page sends): the leanest path to the model."""
        try:
            top_k = int(request.query_params.get("top_k", LIMITS.top_k))
            result = await self.classify_bytes(await request.body(), top_k)
        except ValueError:
            return JSONResponse({"error": "top_k must be an integer."}, status_code=400)
        except Overloaded as exc:
            return overloaded(exc)
        except BentoMLException as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.error_code.value)
        return Response(result.model_dump_json(), media_type="application/json")

    @web.get(PAGE_ROUTES["examples"])
    def page_examples(self) -> JSONResponse:
        """The served version's example images: label and where to fetch each one."""
        examples = [
            ExampleImage(index=i, label=e.label, url=f"api/examples/{i}").model_dump()
            for i, e in enumerate(self.examples)
        ]
        return JSONResponse({"examples": examples})

    @web.get(PAGE_ROUTES["example"])
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

    @web.get(PAGE_ROUTES["info"])
    def page_info(self) -> JSONResponse:
        return Response(
            self.model_info().model_dump_json(),
            media_type="application/json",
            status_code=200 if self.model else 503,
        )


def upload_forms() -> dict[str, FormSpec]:
    """Each upload endpoint's form, read from the endpoints' own signatures: file fields (a
    list takes up to serving.max_images_per_request files) and text fields."""
    forms: dict[str, FormSpec] = {}
    for method in ImageClassifier.apis.values():
        spec = method.input_spec
        files = list(getattr(spec, "multipart_fields", []))
        if not files:
            continue
        fields = spec.model_fields
        form = FormSpec(
            files={
                name: LIMITS.max_images_per_request
                if get_origin(fields[name].annotation) is list
                else 1
                for name in files
            },
            values=frozenset(fields) - set(files),
        )
        forms[method.route] = form
        if method.is_task:
            forms[f"{method.route}/submit"] = form
    return forms


def task_store_file() -> str:
    """BentoML's task store (in BENTOML_HOME unless BENTOML_RESULT_STORE says otherwise)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.result_store_file.get()


# Without a token every endpoint is open (the service binds 127.0.0.1 by default); with one,
# all but health, metrics and the web page's HTML ask for it (the page then asks the person).
API_TOKEN = os.environ.get("IMAGECLF_API_TOKEN") or None
OPEN_PATHS = ("/livez", "/readyz", "/metrics", "/ui", "/ui/")

# BentoML builds a worker's app (and so its middleware stack, with the TimeoutMiddleware class it
# finds in bentoml._internal.server.http.traffic at that moment) right after importing this
# module, and creates the ImageClassifier object only later, in the lifespan: __init__ would be
# too late to swap in RequestTimeout, so it is swapped here (services/limits.py says why).
install_request_timeout()
# /metrics labels by route, not by whatever path was asked (the page's routes as templates).
install_route_labelled_metrics("/ui" + route for route in PAGE_ROUTES.values())

# Outermost first: every refusal below gets one JSON shape; the token is checked before any
# byte of the body is read; then the body's size, the upload form, the task store.
# The first added is the outermost.
ImageClassifier.add_asgi_middleware(
    LingeringClose, max_bytes=LIMITS.max_request_bytes, seconds=LIMITS.drain_seconds
)
ImageClassifier.add_asgi_middleware(ErrorBodies)
ImageClassifier.add_asgi_middleware(ApiToken, token=API_TOKEN, open_paths=OPEN_PATHS)
ImageClassifier.add_asgi_middleware(BodySizeLimit, max_bytes=LIMITS.max_request_bytes)
ImageClassifier.add_asgi_middleware(
    UploadForms,
    forms=upload_forms(),
    max_field_bytes=LIMITS.max_field_bytes,
    max_filename_bytes=LIMITS.max_filename_bytes,
)
ImageClassifier.add_asgi_middleware(
    TaskLimit,
    routes=[m.route for m in ImageClassifier.apis.values() if m.is_task],
    max_tasks=LIMITS.max_tasks,
    max_bytes=LIMITS.max_task_bytes,
    lifetime_s=LIMITS.task_lifetime_s,
    max_request_bytes=LIMITS.max_request_bytes,
    retry_after_s=LIMITS.retry_after_s,
    store_file=task_store_file,
)

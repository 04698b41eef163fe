"""The baseline the BentoML service must beat: a plain FastAPI + ONNX Runtime server.

One request, one ONNX Runtime call (no batching), multipart upload like the service's /classify.
Also a no-op endpoint that only reads the upload: the ceiling of HTTP on this machine.

    python -m benchmarks.baseline_server MODEL.onnx --port 3200 [--workers 2 --threads 1]

One process with ONNX Runtime's default threads is the by-the-docs server; ``--workers`` runs
uvicorn's multi-process mode (each worker loads the model), the fairer match for the service's
two workers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import uvicorn
from fastapi import FastAPI, File, HTTPException, UploadFile

from imageclf.config import load_params
from imageclf.deploy.inference import InputError, OnnxClassifier, decode_image


def make_app(model_path: Path, threads: int = 0) -> FastAPI:
    model = OnnxClassifier(model_path, threads)
    limits = load_params().serving  # the service's own limits and top_k, from params.yaml
    app = FastAPI()

    @app.post("/classify")
    def classify(image: UploadFile = File(...)) -> dict:  # noqa: B008 (FastAPI idiom)
        try:
            array = decode_image(image.file.read(), limits, model.size, model.channels)
        except InputError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        probs = model.probabilities(array[None])
        return {"predictions": model.top_k(probs, limits.top_k)[0]}

    @app.post("/noop")
    async def noop(image: UploadFile = File(...)) -> dict:  # noqa: B008
        return {"bytes": len(await image.read())}

    return app


def app_from_env() -> FastAPI:
    """The app for uvicorn's worker processes (they import it by name)."""
    return make_app(Path(os.environ["BASELINE_MODEL"]), int(os.environ.get("BASELINE_THREADS", 0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--port", type=int, default=3200)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: default)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    os.environ["BASELINE_MODEL"] = str(args.model.resolve())
    os.environ["BASELINE_THREADS"] = str(args.threads)
    uvicorn.run(
        "benchmarks.baseline_server:app_from_env",
        factory=True,
        workers=args.workers,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()

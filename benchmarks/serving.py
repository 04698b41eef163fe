"""Load benchmark of the serving stack, all in one invocation (numbers are comparable only
within one run on this shared machine).

Drives each server with `wrk` (a C load generator: a Python client saturates first on 2 cores)
for a bounded time on loopback, at several concurrencies, posting one image per request:

* bentoml /classify        the BentoML service's API endpoint (multipart upload)
* bentoml /ui/api/classify the service's lean route (raw image body), same model path
* baseline /classify       plain FastAPI + ONNX Runtime, one model call per request, one
                           process (the by-the-docs server the service must beat)
* baseline x2 /classify    the same with two uvicorn workers and one ORT thread each (a tuned
                           plain server, for an honest picture)
* baseline /noop           reads the upload and answers: the HTTP ceiling here
* in-process               ONNX Runtime at batch 1 and the service's max batch, and decoding +
                           preprocessing each image, no HTTP at all

Images (``--images``): ``test``, a model-sized test image of the dataset; ``photo224``, a
224x224 RGB JPEG of 30-60 KB; ``photo12mp``, a 12-megapixel phone-camera JPEG of several MB.
With photos, decoding and resizing dominate the cost of a small model.

    python -m benchmarks.serving [--duration 10] [--concurrency 1 8 32 64]
    python -m benchmarks.serving --model efficientnet_lite0 --images photo224 photo12mp \\
        --concurrency 32 --set serving.max_batch_size=16

By default it serves whatever the project's registry calls champion (as `bentoml serve` would);
``--model`` instead builds that architecture (with its packaged pretrained weights, if any) and
exports it with the project's own export (ServingGraph, ``export_onnx``, the export stage's
metadata) into a temporary registry. The baselines get the same ONNX file. ``--set`` overrides
params.yaml for every server (serving.* is what may be tuned). Servers run from a temporary
project root (a copy of params.yaml with the overrides), so their prediction logs stay out of
the project. All servers start first and the cells of each concurrency run back to back (each
after a short warm-up), so slow drifts of this shared machine hit every target alike. Besides
wrk's numbers, each row has the server's CPU time per request (all its processes, from /proc):
the cost that decides throughput once the cores are busy, and steadier than requests/s.
Writes a Markdown table (default docs/serving-benchmark.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from imageclf.config import Params
from imageclf.deploy.inference import OnnxClassifier, decode_image, resolve_model
from imageclf.paths import ProjectPaths, get_paths
from imageclf.tracking import tracking_uri
from ops.local_servers import free_port, process_tree, start, stop

LUA = Path(__file__).with_name("multipart.lua")
SERVICE = "bentoml /classify (multipart)"
PLAIN = "baseline FastAPI /classify"
PLAIN_X2 = "baseline FastAPI x2 workers /classify"
IMAGE_KINDS = ("test", "photo224", "photo12mp")


# ----------------------------------------------------------------------------- the images
def _chelsea() -> Image.Image:
    """A real photo that a package ships (scikit-image's cat), so nothing is downloaded."""
    from skimage import data

    return Image.fromarray(data.chelsea())


def _jpeg(image: Image.Image, noise: float, quality: int, seed: int) -> bytes:
    """``image`` with Gaussian sensor-like noise, as a JPEG: noise is what makes real photos
    big (smooth upscaled pixels would compress to a fraction of a camera's file)."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, noise, pixels.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=quality
    )
    return buf.getvalue()


def phone_photo(megapixels: float = 12.0, seed: int = 0) -> bytes:
    """A phone-camera JPEG: the cat upscaled to ``megapixels`` (aspect kept), noise, quality 90:
    about 4.4 MB at 12 MP, like a real phone's photo."""
    cat = _chelsea()
    scale = (megapixels * 1e6 / (cat.width * cat.height)) ** 0.5
    size = (round(cat.width * scale), round(cat.height * scale))
    return _jpeg(cat.resize(size, Image.Resampling.BICUBIC), noise=12.0, quality=90, seed=seed)


def small_photo(side: int = 224, seed: int = 0) -> bytes:
    """A photo already at a model's size: the cat's centre square at ``side``, 30-60 KB."""
    cat = _chelsea()
    crop = min(cat.size)
    left, top = (cat.width - crop) // 2, (cat.height - crop) // 2
    square = cat.resize(
        (side, side), Image.Resampling.BICUBIC, (left, top, left + crop, top + crop)
    )
    return _jpeg(square, noise=12.0, quality=95, seed=seed)


def dataset_png(paths: ProjectPaths) -> bytes:
    """The first test image of the project's dataset, at the model's size, as PNG."""
    from imageclf.data.store import load_dataset

    buf = io.BytesIO()
    Image.fromarray(load_dataset(paths.dataset).test.images[0].squeeze()).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- measuring
def wrk(url: str, image: Path, concurrency: int, duration: float, raw: bool = False) -> dict:
    """One bounded wrk run; returns requests/s, latency percentiles and failures."""
    cmd = [
        "wrk",
        f"-t{min(2, concurrency)}",
        f"-c{concurrency}",
        f"-d{duration:g}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
        "--",
        str(image),
        "image",
    ]
    if raw:
        cmd.append("raw")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("JSON "))
    stats = json.loads(line[5:])
    stats["requests_per_second"] = stats["requests"] / stats["seconds"]
    stats["failed"] = stats["errors"]
    return stats


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its live descendants (Linux /proc): BentoML
    runs its workers as children of the arbiter, uvicorn as children of its supervisor."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


# The project's targets per image kind, at concurrency 32: (the service's throughput over the
# plain server's, more than; p99 at most, ms). Fashion-MNIST: stay ahead with p99 <= 50 ms; a
# 224² photo (EfficientNet-Lite0): 1.5x with p99 <= 250 ms. The 12 MP photo has none: it shows
# what decoding costs.
TARGETS = {"test": (1.0, 50.0), "photo224": (1.5, 250.0)}


def verdict(results: list[dict], concurrency: int = 32) -> list[str]:
    """The targets (:data:`TARGETS`), read off this run, per image: at ``concurrency``, is the
    service's /classify that much faster than the plain server, within the p99 budget and with
    no failed request?"""
    lines = []
    for kind in IMAGE_KINDS:
        cells = {
            r["target"]: r
            for r in results
            if r["concurrency"] == concurrency and r["image"] == kind
        }
        service, plain = cells.get(SERVICE), cells.get(PLAIN)
        if not service or not plain:
            continue
        lines.append(f"At concurrency {concurrency}, image {kind}, bentoml /classify against:")
        for label in (PLAIN, PLAIN_X2):
            if label in cells:
                other = cells[label]
                ratio = service["requests_per_second"] / max(other["requests_per_second"], 1e-9)
                lines.append(
                    f"- {label}: {ratio:.2f}x the requests/s; server CPU per request "
                    f"{service['cpu_ms_per_request']:.2f} vs {other['cpu_ms_per_request']:.2f} ms"
                )
        if kind in TARGETS:
            min_ratio, max_p99_ms = TARGETS[kind]
            ratio = service["requests_per_second"] / max(plain["requests_per_second"], 1e-9)
            met = ratio > min_ratio and service["p99_ms"] <= max_p99_ms and not service["failed"]
            lines.append(
                f"- target (over {min_ratio:g}x the plain server, p99 <= {max_p99_ms:g} ms, no "
                f"failure): {'met' if met else 'NOT met'} ({ratio:.2f}x, p99 "
                f"{service['p99_ms']:.1f} ms, {service['failed']} failed)"
            )
        lines.append("")
    return lines


def timed(fn: Any, seconds: float = 2.0, min_calls: int = 5) -> list[float]:
    """Per-call milliseconds of ``fn`` for about ``seconds`` (after one warm-up call)."""
    fn()
    out: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(out) < min_calls or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def in_process(
    model: OnnxClassifier, params: Params, images: dict[str, bytes], max_batch: int
) -> list[dict]:
    """ONNX Runtime alone at batch 1 and the service's max batch, and decoding + preprocessing
    alone for each image: where a request's time goes, without HTTP."""
    rows = []
    decoded = {}
    for kind, data in images.items():
        decoded[kind] = decode_image(data, params.serving, model.size, model.channels)
        ms = timed(lambda d=data: decode_image(d, params.serving, model.size, model.channels))
        rows.append(
            {
                "target": f"decode + preprocess {kind} ({len(data) / 1e3:.0f} KB)",
                "images_per_second": 1000 / float(np.mean(ms)),
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
            }
        )
    one = next(iter(decoded.values()))
    for batch in sorted({1, max_batch}):
        x = np.repeat(one[None], batch, axis=0)
        ms = timed(lambda x=x: model.probabilities(x))
        rows.append(
            {
                "target": f"onnxruntime in-process, batch {batch}",
                "images_per_second": batch * 1000 / float(np.mean(ms)),
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
            }
        )
    return rows


# ------------------------------------------------------------------------- what is served
def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """``section.key=value`` overrides (values parsed as YAML) grouped by section."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: expected section.key=value, e.g. serving.workers=2")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def serving_root(
    paths: ProjectPaths, root: ProjectPaths, overrides: dict[str, dict[str, Any]]
) -> Params:
    """A temporary project root for the servers: params.yaml with ``overrides``, checked."""
    raw = yaml.safe_load(paths.params.read_text())
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    params = Params.model_validate(raw)
    root.models.mkdir(parents=True)
    root.params.write_text(yaml.safe_dump(raw, sort_keys=False))
    return params


def register_built_model(
    name: str, image_size: int, num_classes: int, params: Params, root: ProjectPaths
) -> str:
    """Build ``name`` (pretrained backbone weights when they ship with a package), export it as
    the export stage does, register it as champion in a new SQLite registry; its tracking URI."""
    import mlflow
    import torch

    from imageclf.data.transforms import to_model_array
    from imageclf.deploy.export import export_onnx
    from imageclf.models.zoo import ServingGraph, build_model, fold_batchnorm, model_entry
    from imageclf.registry import CHAMPION, client, log_and_register

    contract = model_entry(name).contract
    channels = contract.channels or 3
    mean = contract.mean or 0.5
    std = contract.std or 0.5
    torch.manual_seed(params.seed)
    model = build_model(name, num_classes, channels, params.train.width, mean, std, image_size)
    from imageclf.errors import InvalidInput
    from imageclf.models.backbones import load_pretrained

    try:
        weights = str(load_pretrained(model, name, "imagenet", root.root))
    except InvalidInput as exc:  # an architecture without packaged weights: speed is the same
        weights = f"random (no packaged weights: {exc})"
    serving = ServingGraph(fold_batchnorm(model.eval()), views=1)
    classes = [f"class_{i}" for i in range(num_classes)]
    onnx_path = root.onnx
    metadata = {  # what stages/export.py writes: the service reads classes and input from it
        "classes": json.dumps(classes),
        "input": json.dumps(
            {
                "name": "images",
                "layout": "NCHW",
                "dtype": "float32",
                "range": [0, 1],
                "channels": channels,
                "height": image_size,
                "width": image_size,
            }
        ),
        "output": "logits",
        "model": name,
        "tta_flip": "false",
    }
    export_onnx(
        serving, onnx_path, (channels, image_size, image_size), params.export.opset, metadata
    )
    tracking = f"sqlite:///{root.mlflow_db}"
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment("serving-benchmark")
    with mlflow.start_run() as run:
        mlflow.log_params({"model": name, "image_size": image_size, "weights": weights[:200]})
    example = to_model_array(np.zeros((1, image_size, image_size, channels), np.uint8))
    version = log_and_register(tracking, params, run.info.run_id, onnx_path, example)
    client(tracking).set_registered_model_alias(params.registry.model_name, CHAMPION, version)
    print(f"serving {name} at {image_size}x{image_size}, weights: {weights}", flush=True)
    return tracking


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument(
        "--images", nargs="+", choices=IMAGE_KINDS, help="default: all (no 'test' with --model)"
    )
    parser.add_argument("--model", help="serve this architecture, built and exported here")
    parser.add_argument("--image-size", type=int, default=224, help="with --model")
    parser.add_argument("--num-classes", type=int, default=10, help="with --model")
    parser.add_argument(
        "--set", action="append", default=[], help="params override, e.g. serving.workers=1"
    )
    parser.add_argument(
        "--baseline-threads", type=int, default=0, help="ORT threads of the one-process baseline"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/serving-benchmark.md"))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk (make setup does it as root).")
    paths = get_paths()
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    root = ProjectPaths(work / "root")
    params = serving_root(paths, root, parse_sets(args.set))
    if args.model:
        tracking = register_built_model(args.model, args.image_size, args.num_classes, params, root)
    else:
        tracking = tracking_uri(paths)
    ref = resolve_model(
        tracking, params.registry.model_name, params.serving.alias, dest=work / "model"
    )
    model = OnnxClassifier(ref.path, params.serving.threads)
    kinds = args.images or [k for k in IMAGE_KINDS if not (args.model and k == "test")]
    makers = {
        "test": lambda: dataset_png(paths),
        "photo224": small_photo,
        "photo12mp": phone_photo,
    }
    images = {kind: makers[kind]() for kind in kinds}
    files = {}
    for kind, data in images.items():
        files[kind] = work / f"{kind}.{'png' if kind == 'test' else 'jpg'}"
        files[kind].write_bytes(data)
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "BENTOML_HOME": str(work / "bentoml"),
        "IMAGECLF_ROOT": str(root.root),
        "MLFLOW_TRACKING_URI": tracking,
    }
    (work / "bentoml").mkdir()

    # (server command, readiness path, [(row label, path, raw body?)])
    baseline = [str(bin_dir / "python"), "-m", "benchmarks.baseline_server", str(ref.path)]
    servers = [
        (
            [
                str(bin_dir / "bentoml"),
                "serve",
                "services.service:ImageClassifier",
                "--host",
                "127.0.0.1",
            ],
            "/readyz",
            [
                (SERVICE, "/classify", False),
                ("bentoml /ui/api/classify (raw body)", "/ui/api/classify", True),
            ],
        ),
        (
            [*baseline, "--threads", str(args.baseline_threads)],
            "/docs",
            [
                (PLAIN, "/classify", False),
                ("baseline FastAPI /noop (HTTP ceiling)", "/noop", False),
            ],
        ),
        (
            [*baseline, "--workers", "2", "--threads", "1"],
            "/docs",
            [(PLAIN_X2, "/classify", False)],
        ),
    ]
    results: list[dict] = []
    running: list[tuple] = []
    try:
        for cmd, ready, targets in servers:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            cmd = [*cmd, "--port", str(port)]
            running.append((start(cmd, env, ready_url=base + ready), base, targets))
        for c in args.concurrency:
            for kind, image in files.items():
                for proc, base, targets in running:
                    for label, path, raw in targets:
                        wrk(base + path, image, c, 1.0, raw=raw)  # warm-up: connections, caches
                        cpu = tree_cpu_seconds(proc.pid)
                        stats = wrk(base + path, image, c, args.duration, raw=raw)
                        cpu = tree_cpu_seconds(proc.pid) - cpu
                        row = {
                            "target": label,
                            "image": kind,
                            "concurrency": c,
                            **stats,
                            "cpu_ms_per_request": 1000 * cpu / max(stats["requests"], 1),
                        }
                        results.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        for proc, _, _ in running:
            stop(proc)
    local = in_process(model, params, images, params.serving.max_batch_size)

    command = "python -m benchmarks.serving " + shlex.join(sys.argv[1:])
    sizes = ", ".join(f"{k} {len(v) / 1e3:.0f} KB" for k, v in images.items())
    lines = [
        f"Model {ref.name} v{ref.version} ({model.size}x{model.size}x{model.channels}"
        f"{', built by --model ' + args.model if args.model else ', @' + ref.alias}); "
        f"{os.cpu_count()} CPU cores; {args.duration:g} s per cell; wrk on loopback; "
        f"images: {sizes}; serving: workers {params.serving.workers}, threads "
        f"{params.serving.threads}, max_batch_size {params.serving.max_batch_size}, "
        f"max_latency_ms {params.serving.max_latency_ms:g}; command: `{command.strip()}`.",
        "",
        "| target | image | concurrency | requests/s | p50 ms | p95 ms | p99 ms | failed | "
        "server CPU ms/request |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (r["concurrency"], r["image"], r["target"])):
        lines.append(
            f"| {r['target']} | {r['image']} | {r['concurrency']} | "
            f"{r['requests_per_second']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['failed']} | {r['cpu_ms_per_request']:.2f} |"
        )
    lines += ["", *verdict(results)]
    lines += ["| in-process | images/s | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for r in local:
        lines.append(
            f"| {r['target']} | {r['images_per_second']:.0f} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Keep the hand-written reading of the numbers (from "## Reading it" on) across reruns.
    old = args.out.read_text() if args.out.exists() else ""
    notes = old[old.index("## Reading it") :] if "## Reading it" in old else ""
    args.out.write_text("# Serving benchmark\n\n" + table + ("\n" + notes if notes else ""))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

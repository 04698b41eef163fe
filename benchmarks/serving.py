"""Load benchmark of the serving stack, all in one invocation (numbers are comparable only
within one run on this shared machine).

Drives each server with `wrk` (a C load generator: a Python client saturates first on 2 cores)
for a bounded time on loopback, at several concurrencies, posting a real test image:

* bentoml /classify        the BentoML service's API endpoint (multipart upload)
* bentoml /ui/api/classify the service's lean route (raw image body), same model path
* baseline /classify       plain FastAPI + ONNX Runtime, one model call per request, one
                           process (the by-the-docs server the service must beat)
* baseline x2 /classify    the same with two uvicorn workers and one ORT thread each (a tuned
                           plain server, for an honest picture)
* baseline /noop           reads the upload and answers: the HTTP ceiling here
* onnxruntime in-process   batch 1 and 64, no HTTP at all

    python -m benchmarks.serving [--duration 10] [--concurrency 1 8 32 64]

Serves whatever the registry calls champion (as `bentoml serve` would) and gives the baselines
the same ONNX file. All servers start first and the cells of each concurrency run back to back
(each after a short warm-up), so slow drifts of this shared machine hit every target alike.
Besides wrk's numbers, each row has the server's CPU time per request (all its processes,
from /proc): the cost that decides throughput once the cores are busy, and steadier than
requests/s. Writes a Markdown table (default docs/serving-benchmark.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from imageclf.config import load_params
from imageclf.data.store import load_dataset
from imageclf.local_servers import free_port, start, stop
from imageclf.optimize import time_call
from imageclf.paths import get_paths
from imageclf.serving import OnnxClassifier, resolve_model
from imageclf.tracking import tracking_uri

LUA = Path(__file__).with_name("multipart.lua")


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
    parent: dict[int, int] = {}
    cpu: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the process name
        except OSError:  # the process ended meanwhile
            continue
        child = int(stat.parent.name)
        parent[child] = int(fields[1])
        cpu[child] = int(fields[11]) + int(fields[12])  # utime, stime
    family, frontier = {pid}, [pid]
    while frontier:
        current = frontier.pop()
        for child, ppid in parent.items():
            if ppid == current and child not in family:
                family.add(child)
                frontier.append(child)
    return sum(cpu.get(p, 0) for p in family) / tick


def verdict(results: list[dict], concurrency: int = 32) -> list[str]:
    """The issue's target, read off this run: at ``concurrency``, does the service's /classify
    beat the plain server's throughput with p99 <= 100 ms and no failed request?"""
    cells = {r["target"]: r for r in results if r["concurrency"] == concurrency}
    service = cells.get("bentoml /classify (multipart)")
    plain = cells.get("baseline FastAPI /classify")
    if not service or not plain:
        return []
    lines = [f"At concurrency {concurrency}, bentoml /classify against:"]
    for label in ("baseline FastAPI /classify", "baseline FastAPI x2 workers /classify"):
        if label in cells:
            other = cells[label]
            ratio = service["requests_per_second"] / other["requests_per_second"]
            lines.append(
                f"- {label}: {ratio:.2f}x the requests/s; server CPU per request "
                f"{service['cpu_ms_per_request']:.2f} vs {other['cpu_ms_per_request']:.2f} ms"
            )
    met = (
        service["requests_per_second"] > plain["requests_per_second"]
        and service["p99_ms"] <= 100
        and service["failed"] == 0  # wrk's errors: connect, read, write, timeout, non-2xx
    )
    lines.append(
        f"- target (beat the plain server, p99 <= 100 ms, no failure): "
        f"{'met' if met else 'NOT met'} (p99 {service['p99_ms']:.1f} ms, "
        f"{service['failed']} failed)"
    )
    return lines


def in_process(model: OnnxClassifier, images: np.ndarray) -> list[dict]:
    rows = []
    for batch in (1, 64):
        x = images[:batch]
        ms = time_call(lambda x=x: model.probabilities(x), warmup=10, iterations=200)
        rows.append(
            {
                "target": f"onnxruntime in-process, batch {batch}",
                "images_per_second": batch * 1000 / float(np.mean(ms)),
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--out", type=Path, default=Path("docs/serving-benchmark.md"))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk (make setup does it as root).")
    paths = get_paths()
    params = load_params(paths.params)
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    ref = resolve_model(
        tracking_uri(paths), params.registry.model_name, params.serving.alias, dest=work / "model"
    )
    model = OnnxClassifier(ref.path)
    test = load_dataset(paths.dataset).test
    image = work / "image.png"
    Image.fromarray(test.images[0].squeeze()).save(image)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml")}
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
                ("bentoml /classify (multipart)", "/classify", False),
                ("bentoml /ui/api/classify (raw body)", "/ui/api/classify", True),
            ],
        ),
        (
            baseline,
            "/docs",
            [
                ("baseline FastAPI /classify", "/classify", False),
                ("baseline FastAPI /noop (HTTP ceiling)", "/noop", False),
            ],
        ),
        (
            [*baseline, "--workers", "2", "--threads", "1"],
            "/docs",
            [("baseline FastAPI x2 workers /classify", "/classify", False)],
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
            for proc, base, targets in running:
                for label, path, raw in targets:
                    wrk(base + path, image, c, 1.0, raw=raw)  # warm-up: connections, caches
                    cpu = tree_cpu_seconds(proc.pid)
                    stats = wrk(base + path, image, c, args.duration, raw=raw)
                    cpu = tree_cpu_seconds(proc.pid) - cpu
                    row = {
                        "target": label,
                        "concurrency": c,
                        **stats,
                        "cpu_ms_per_request": 1000 * cpu / max(stats["requests"], 1),
                    }
                    results.append(row)
                    print(row, flush=True)
    finally:
        for proc, _, _ in running:
            stop(proc)
    local = in_process(model, test.images)

    lines = [
        f"Model {ref.name} v{ref.version} (@{ref.alias}); {os.cpu_count()} CPU cores; "
        f"{args.duration:g} s per cell; wrk on loopback; command: "
        f"`python -m benchmarks.serving --duration {args.duration:g}`.",
        "",
        "| target | concurrency | requests/s | p50 ms | p95 ms | p99 ms | failed | "
        "server CPU ms/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (r["concurrency"], r["target"])):
        lines.append(
            f"| {r['target']} | {r['concurrency']} | {r['requests_per_second']:.0f} | "
            f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['failed']} | {r['cpu_ms_per_request']:.2f} |"
        )
    lines += ["", *verdict(results)]
    lines += ["", "| in-process | images/s | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
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

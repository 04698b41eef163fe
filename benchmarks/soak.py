"""Soak test of the service (a benchmark script, not a test): many requests, good and malformed,
against a real `bentoml serve`, watching what must stay bounded.

Sends ``--requests`` requests (default 10,000) at ``--concurrency`` (default 64), each kind
drawn from :data:`MIX` in a seeded order: good images (one, a batch, an async submission) and
every malformed kind the service must refuse with a 4xx (empty, not an image, EPS, a truncated
PNG, a decompression bomb, a wrong field name, a text value or a URL in the file field, too
many images, one bad image in a batch, a declared or a chunked body over the size limit). One
connection per request (``Connection: close``), written by hand, so that a connection the
server drops is seen as such and never retried by a client library.

Every second it samples, until the load has drained:

* the RSS (VmRSS) of every process in the service's process group (arbiter and workers);
* the async task store (rows and bytes of BentoML's SQLite file);
* the files in the service's upload temp dir (serving.upload_temp_dir, here a private folder
  under it so that other processes' files do not count).

Reports the status codes per kind, the 5xx (503 load shedding apart), dropped connections and
timeouts (all expected 0), the URL-in-a-file-field fetches (a listener counts them; expected
0), whether any worker died, and the series' start/max/end. Prints a table; writes JSON.

    python -m benchmarks.soak [--requests 10000] [--concurrency 64] [--out soak.json]

It serves whatever the project's registry calls champion, from a copy of the SQLite store (the
project's own mlflow.db is never opened), like benchmarks/serving.py: a temporary project root
with params.yaml (``--set`` overrides), BENTOML_HOME and the prediction log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.serving import dataset_png, parse_sets, serving_root, small_photo
from imageclf.config import Params
from imageclf.paths import ProjectPaths, get_paths
from ops.local_servers import free_port, output, process_tree, start, stop

BOUNDARY = "soakboundary7MA4YWxkTrZu0gW"
# Share of each request kind in the mix (relative weights). Good requests dominate, as in real
# traffic; the expensive malformed ones (20+ MiB bodies) are rare.
MIX: dict[str, float] = {
    "good_png": 30,
    "good_photo": 10,
    "good_batch": 6,
    "async_submit": 4,
    "empty_file": 4,
    "empty_body": 3,
    "not_an_image": 4,
    "eps": 4,
    "truncated_png": 4,
    "bomb": 3,
    "wrong_field": 4,
    "text_in_file_field": 4,
    "url_in_file_field": 3,
    "too_many_images": 3,
    "bad_image_in_batch": 4,
    "declared_oversize": 3,
    "chunked_oversize": 0.5,
}


# ----------------------------------------------------------------------------- the requests
@dataclass
class Body:
    """One request: path, headers, body; ``chunks`` streams a chunked body instead."""

    path: str
    content_type: str | None
    body: bytes = b""
    content_length: int | None = None  # declared, when it is not len(body)
    # A chunked body: this prefix, then (chunk bytes, number of chunks) of zeros.
    chunks: tuple[int, int] | None = None


def part(name: str, data: bytes, filename: str | None, mime: str = "image/png") -> bytes:
    disposition = f'form-data; name="{name}"'
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}"
    if filename is not None:
        head += f'; filename="{filename}"\r\nContent-Type: {mime}'
    return head.encode() + b"\r\n\r\n" + data + b"\r\n"


def form(*parts: bytes) -> tuple[str, bytes]:
    return f"multipart/form-data; boundary={BOUNDARY}", b"".join(
        parts
    ) + f"--{BOUNDARY}--\r\n".encode()


def bomb_png(side: int) -> bytes:
    """A real decompression bomb: a valid 1-bit PNG of ``side``² pixels (all black), a few
    kilobytes on the wire and far over serving.max_image_pixels once decoded."""
    row = b"\x00" + bytes((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1 bit, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n%%EndComments\n"
    b"newpath 0 0 moveto 28 28 lineto stroke\nshowpage\n%%EOF\n"
)


def build_requests(params: Params, png: bytes, photo: bytes, url: str) -> dict[str, Body]:
    limits = params.serving
    side = int((4 * limits.max_image_pixels) ** 0.5)  # 4x the pixel limit
    bomb = bomb_png(side)
    bad = b"this is not an image"
    kinds: dict[str, Body] = {}

    def add(kind: str, path: str, *parts: bytes) -> None:
        ctype, body = form(*parts)
        kinds[kind] = Body(path, ctype, body)

    add("good_png", "/classify", part("image", png, "shirt.png"))
    add("good_photo", "/classify", part("image", photo, "cat.jpg", "image/jpeg"))
    add("good_batch", "/classify_batch", *(part("images", png, f"{i}.png") for i in range(4)))
    add("async_submit", "/classify_async/submit", part("images", png, "0.png"))
    add("empty_file", "/classify", part("image", b"", "empty.png"))
    kinds["empty_body"] = Body("/classify", None, b"")
    add("not_an_image", "/classify", part("image", bad, "notes.png"))
    add("eps", "/classify", part("image", EPS, "drawing.eps", "application/postscript"))
    add("truncated_png", "/classify", part("image", png[: len(png) // 2], "cut.png"))
    add("bomb", "/classify", part("image", bomb, "bomb.png"))
    add("wrong_field", "/classify", part("file", png, "shirt.png"))
    add("text_in_file_field", "/classify", part("image", b"hello", None))
    add("url_in_file_field", "/classify", part("image", url.encode(), None))
    too_many = limits.max_images_per_request + 1
    add(
        "too_many_images",
        "/classify_batch",
        *(part("images", png, f"{i}.png") for i in range(too_many)),
    )
    add(
        "bad_image_in_batch",
        "/classify_batch",
        *(part("images", png, f"{i}.png") for i in range(3)),
        part("images", bad, "3.png"),
    )
    ctype, body = form(part("image", png, "shirt.png"))
    kinds["declared_oversize"] = Body(
        "/classify", ctype, body, content_length=2 * limits.max_request_bytes
    )
    # A valid start of a multipart upload whose file then never ends: only the size limit
    # can stop it.
    chunk = 1 << 20
    head = part("image", b"", "huge.png").removesuffix(b"\r\n")
    kinds["chunked_oversize"] = Body(
        "/classify", ctype, head, chunks=(chunk, limits.max_request_bytes // chunk + 2)
    )
    missing = set(MIX) - set(kinds)
    assert not missing, missing
    return kinds


# ----------------------------------------------------------------------------- the client
@dataclass
class Outcome:
    kind: str
    status: int | None  # None: dropped or timed out
    error: str = ""  # "dropped" | "timeout" | "connect"
    seconds: float = 0.0


class Connection(asyncio.Protocol):
    """One client connection that keeps whatever the server sent, even when the connection
    then ends in a reset (asyncio's StreamReader would raise instead of returning the answer
    it already holds: a server that answers 413 and closes while the client is still sending
    would look like a dropped connection)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: asyncio.Future[BaseException | None] = asyncio.Future()
        self.writable = asyncio.Event()
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: BaseException | None) -> None:
        self.writable.set()  # a sender waiting for the buffer to drain must not wait forever
        if not self.closed.done():
            self.closed.set_result(exc)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def answered(self) -> bool:
        return b"\r\n" in self.data

    def status(self) -> int | None:
        """The response's status code; None if the server sent no status line."""
        if not self.data.startswith(b"HTTP/") or not self.answered():
            return None
        return int(self.data.split(b"\r\n", 1)[0].split()[1])


async def send(host: str, port: int, req: Body, kind: str, timeout: float) -> Outcome:
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    try:
        transport, conn = await asyncio.wait_for(
            loop.create_connection(Connection, host, port), timeout
        )
    except (OSError, TimeoutError) as exc:
        return Outcome(kind, None, f"connect: {exc}", time.perf_counter() - t0)
    head = [f"POST {req.path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    if req.content_type:
        head.append(f"Content-Type: {req.content_type}")
    if req.chunks:
        head.append("Transfer-Encoding: chunked")
    else:
        length = req.content_length if req.content_length is not None else len(req.body)
        head.append(f"Content-Length: {length}")
    try:
        async with asyncio.timeout(timeout):
            transport.write(("\r\n".join(head) + "\r\n\r\n").encode())
            if req.chunks:
                size, count = req.chunks
                transport.write(f"{len(req.body):x}\r\n".encode() + req.body + b"\r\n")
                block = f"{size:x}\r\n".encode() + bytes(size) + b"\r\n"
                for _ in range(count):
                    await conn.writable.wait()
                    if conn.answered() or conn.closed.done():
                        break  # the server answered (refused) while we were sending
                    transport.write(block)
                if not (conn.answered() or conn.closed.done()):
                    transport.write(b"0\r\n\r\n")
            else:
                transport.write(req.body)
            exc = await conn.closed
    except TimeoutError:
        transport.abort()
        return Outcome(kind, None, "timeout", time.perf_counter() - t0)
    finally:
        transport.close()
    status = conn.status()
    seconds = time.perf_counter() - t0
    if status is None:
        why = f"{type(exc).__name__} {exc}" if exc else "closed before a status line"
        return Outcome(kind, None, f"dropped: {why}", seconds)
    return Outcome(kind, status, "", seconds)


async def drive(
    host: str, port: int, kinds: dict[str, Body], order: list[str], concurrency: int, timeout: float
) -> list[Outcome]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for kind in order:
        queue.put_nowait(kind)
    outcomes: list[Outcome] = []

    async def worker() -> None:
        while not queue.empty():
            kind = queue.get_nowait()
            outcomes.append(await send(host, port, kinds[kind], kind, timeout))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


class UrlTrap:
    """A listener the URL-in-a-file-field requests point at: it counts connections (a service
    that fetches the URL shows up here)."""

    def __init__(self) -> None:
        self.hits = 0
        self.port = free_port()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.hits += 1
        writer.close()

    async def __aenter__(self) -> UrlTrap:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: Any) -> None:
        self.server.close()
        await self.server.wait_closed()


# ----------------------------------------------------------------------------- the sampler
def service_processes(pid: int) -> dict[int, tuple[str, int]]:
    """pid -> (command line, VmRSS in KiB) of ``pid``, its process group and all their live
    descendants (BentoML's workers are children of its arbiter, not all in its group)."""
    found: dict[int, tuple[str, int]] = {}
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        rss = next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:")), 0)
        found[p] = (cmd, rss)
    return found


def task_store(path: Path) -> tuple[int | None, int]:
    """(rows, bytes) of BentoML's task store (bytes: the file and its WAL); rows None when
    the file cannot be read right now (locked, or not created yet)."""
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    if not path.exists():
        return None, 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.5) as conn:
            return conn.execute("SELECT count(*) FROM result").fetchone()[0], size
    except sqlite3.Error:
        return None, size


def folder_usage(path: Path) -> tuple[int, int, int]:
    """(files, their bytes, folders) under ``path``."""
    entries = list(path.rglob("*")) if path.exists() else []
    sizes, folders = [], 0
    for p in entries:
        with contextlib.suppress(OSError):  # deleted between listing and stat
            if p.is_dir():
                folders += 1
            else:
                sizes.append(p.stat().st_size)
    return len(sizes), sum(sizes), folders


@dataclass
class Samples:
    t: list[float] = field(default_factory=list)
    rss: list[dict[int, int]] = field(default_factory=list)
    commands: dict[int, str] = field(default_factory=dict)
    store: list[tuple[int | None, int]] = field(default_factory=list)
    uploads: list[tuple[int, int, int]] = field(default_factory=list)

    def take(self, t0: float, pgid: int, store: Path, uploads: Path) -> None:
        procs = service_processes(pgid)
        self.t.append(round(time.monotonic() - t0, 1))
        self.rss.append({pid: rss for pid, (_, rss) in procs.items()})
        self.commands.update({pid: cmd for pid, (cmd, _) in procs.items()})
        self.store.append(task_store(store))
        self.uploads.append(folder_usage(uploads))


async def sample_every(seconds: float, stop_event: asyncio.Event, take: Callable[[], None]) -> None:
    while not stop_event.is_set():
        await asyncio.to_thread(take)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_event.wait(), seconds)


def series_summary(values: list[int | None]) -> dict[str, int | None]:
    seen = [v for v in values if v is not None]
    if not seen:
        return {"start": None, "max": None, "end": None}
    return {"start": seen[0], "max": max(seen), "end": seen[-1]}


# ----------------------------------------------------------------------------- the report
def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(outcomes: list[Outcome], samples: Samples, seconds: float) -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    for kind in MIX:
        mine = [o for o in outcomes if o.kind == kind]
        statuses = Counter(str(o.status) for o in mine if o.status is not None)
        errors = Counter(o.error.split(":")[0] for o in mine if o.status is None)
        kinds[kind] = {
            "sent": len(mine),
            "statuses": dict(sorted(statuses.items())),
            "dropped": errors.get("dropped", 0),
            "timeouts": errors.get("timeout", 0),
            "connect_errors": errors.get("connect", 0),
            "error_examples": sorted({o.error for o in mine if o.status is None})[:3],
            "p50_ms": round(1000 * percentile([o.seconds for o in mine], 50), 1),
            "p99_ms": round(1000 * percentile([o.seconds for o in mine], 99), 1),
        }
    codes = [o.status for o in outcomes if o.status is not None]
    pids = sorted(samples.commands)
    processes = {
        str(pid): {
            "command": samples.commands[pid][:120],
            "rss_kib": series_summary([s.get(pid) for s in samples.rss]),
            "alive_at_end": pid in samples.rss[-1],
        }
        for pid in pids
    }
    first, last = set(samples.rss[0]), set(samples.rss[-1])
    return {
        "requests": len(outcomes),
        "seconds": round(seconds, 1),
        "requests_per_second": round(len(outcomes) / seconds, 1),
        "http_5xx": sum(1 for c in codes if c >= 500 and c != 503),
        "http_503": sum(1 for c in codes if c == 503),
        "dropped": sum(1 for o in outcomes if o.error.startswith("dropped")),
        "timeouts": sum(1 for o in outcomes if o.error == "timeout"),
        "connect_errors": sum(1 for o in outcomes if o.error.startswith("connect")),
        "processes_died": sorted(first - last),
        "processes_started": sorted(last - first),
        "kinds": kinds,
        "processes": processes,
        "rss_total_kib": series_summary([sum(s.values()) for s in samples.rss]),
        "task_store_rows": series_summary([rows for rows, _ in samples.store]),
        "task_store_bytes": series_summary([size for _, size in samples.store]),
        "upload_dir_files": series_summary([n for n, _, _ in samples.uploads]),
        "upload_dir_bytes": series_summary([b for _, b, _ in samples.uploads]),
        "upload_dir_folders": series_summary([d for _, _, d in samples.uploads]),
        "series": {
            "t": samples.t,
            "rss_total_kib": [sum(s.values()) for s in samples.rss],
            "task_store": samples.store,
            "upload_dir": samples.uploads,
        },
    }


def expected(kind: str, status: str) -> bool:
    """A 2xx for good requests, a 4xx for malformed ones (429 for a full task store)."""
    code = int(status)
    if kind.startswith("good") or kind == "async_submit":
        return code == 200 or (kind == "async_submit" and code == 429)
    return 400 <= code < 500


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"soak: {report['requests']} requests in {report['seconds']} s")
    for col in ("kind", "sent", "statuses", "dropped", "timeouts", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col in ("kind", "statuses") else "right")
    for kind, k in report["kinds"].items():
        statuses = " ".join(
            f"{code}:{n}" if expected(kind, code) else f"[red]{code}:{n}[/red]"
            for code, n in k["statuses"].items()
        )
        table.add_row(
            kind,
            str(k["sent"]),
            statuses,
            str(k["dropped"]),
            str(k["timeouts"]),
            str(k["p50_ms"]),
            str(k["p99_ms"]),
        )
    console.print(table)
    bounded = Table(title="bounded? (start / max / end)")
    for col in ("what", "start", "max", "end"):
        bounded.add_column(col)
    rows = [
        ("RSS, all service processes (MiB)", report["rss_total_kib"], 1 / 1024),
        ("task store rows", report["task_store_rows"], 1),
        ("task store (MiB)", report["task_store_bytes"], 1 / 1048576),
        ("upload temp dir files", report["upload_dir_files"], 1),
        ("upload temp dir (MiB)", report["upload_dir_bytes"], 1 / 1048576),
        ("upload temp dir folders", report["upload_dir_folders"], 1),
    ]
    for pid, proc in report["processes"].items():
        rows.append((f"RSS pid {pid} (MiB) {proc['command'][-40:]}", proc["rss_kib"], 1 / 1024))
    for label, s, scale in rows:
        cells = [
            "-" if s[key] is None else f"{s[key] * scale:.1f}" for key in ("start", "max", "end")
        ]
        bounded.add_row(label, *cells)
    console.print(bounded)
    for i, r in enumerate(report["rounds"], 1):
        console.print(
            f"after round {i} ({r['t']} s): RSS {r['rss_total_kib'] / 1024:.1f} MiB, "
            f"task store {r['task_store'][0]} rows, upload dir {r['upload_dir'][0]} files "
            f"{r['upload_dir'][2]} folders"
        )
    console.print(
        f"5xx (503 apart): {report['http_5xx']}   503 (load shed): {report['http_503']}   "
        f"dropped: {report['dropped']}   timeouts: {report['timeouts']}   "
        f"URL fetches: {report['url_fetches']}   processes died: {report['processes_died']}"
    )


# ----------------------------------------------------------------------------- main
def git_state(root: Path) -> dict[str, Any]:
    """Which code the service ran: the commit and whether the service's files had changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout

    where = ("--", "services", "imageclf", get_paths(root).params.name)
    dirty = [d for d in git("status", "--porcelain", *where).split("\n") if d]
    diff = hashlib.sha256(git("diff", *where).encode()).hexdigest()[:12]
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted": dirty, "diff_sha256": diff}


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    paths = get_paths()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    root = ProjectPaths(work / "root")
    overrides = parse_sets(args.set)
    # A private folder under the configured upload temp dir, so that only this service's files
    # are counted (/dev/shm is shared with every process of the machine).
    configured = serving_root(paths, ProjectPaths(work / "probe"), overrides).serving
    base_tmp = Path(configured.upload_temp_dir or tempfile.gettempdir())
    uploads = Path(tempfile.mkdtemp(prefix="soak-uploads-", dir=base_tmp))
    overrides.setdefault("serving", {})["upload_temp_dir"] = str(uploads)
    params = serving_root(paths, root, overrides)
    db = work / paths.mlflow_db.name  # a copy: the project's store is never opened
    shutil.copy2(paths.mlflow_db, db)
    env = {
        **os.environ,
        "BENTOML_HOME": str(work / "bentoml"),
        "IMAGECLF_ROOT": str(root.root),
        "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
    }
    (work / "bentoml").mkdir()
    store = work / "bentoml" / "task_result.db"
    png = dataset_png(paths)
    photo = small_photo()
    rng = random.Random(args.seed)
    mix = {k: w for k, w in MIX.items() if not args.kinds or k in args.kinds}
    order = rng.choices(list(mix), weights=list(mix.values()), k=args.requests)
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "bentoml"),
        "serve",
        "services.service:ImageClassifier",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    console = Console()
    proc = start(cmd, env, ready_url=f"http://127.0.0.1:{port}/readyz", timeout=args.start_timeout)
    samples = Samples()
    try:
        async with UrlTrap() as trap:
            kinds = build_requests(params, png, photo, f"http://127.0.0.1:{trap.port}/cat.png")
            console.print(
                f"serving on :{port} (pgid {proc.pid}); {args.requests} requests at "
                f"concurrency {args.concurrency}; uploads in {uploads}"
            )
            t0 = time.monotonic()
            done = asyncio.Event()

            def take() -> None:
                samples.take(t0, proc.pid, store, uploads)

            sampler = asyncio.ensure_future(sample_every(1.0, done, take))
            outcomes: list[Outcome] = []
            rounds = []
            for _ in range(args.rounds):  # the same requests again, against the same server
                outcomes += await drive(
                    "127.0.0.1", port, kinds, order, args.concurrency, args.timeout
                )
                take()
                rounds.append(
                    {
                        "t": samples.t[-1],
                        "rss_total_kib": sum(samples.rss[-1].values()),
                        "task_store": samples.store[-1],
                        "upload_dir": samples.uploads[-1],
                    }
                )
            seconds = time.monotonic() - t0
            await asyncio.sleep(args.drain)  # background tasks finish, temp files go
            done.set()
            await sampler
            take()
            report = summarize(outcomes, samples, seconds)
            report["url_fetches"] = trap.hits
            report["rounds"] = rounds
            left = Counter(p.name.rsplit("-", 1)[0] for p in uploads.rglob("*"))
            report["upload_dir_left"] = dict(left.most_common())
    finally:
        stop(proc)
        shutil.rmtree(uploads, ignore_errors=True)
    if report["processes_died"]:
        report["server_log_tail"] = output(proc)
    report["config"] = {
        "requests": args.requests,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "mix": mix,
        "overrides": overrides,
        "command": " ".join(["python -m benchmarks.soak", *sys.argv[1:]]),
    }
    report["service_state"] = git_state(paths.root)
    shutil.rmtree(work, ignore_errors=True)
    print_report(report, console)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000, help="per round")
    parser.add_argument(
        "--rounds", type=int, default=1, help="send them this many times (growth across rounds)"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--drain", type=float, default=5.0, help="sampling after the load")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", choices=sorted(MIX), help="only these kinds")
    parser.add_argument(
        "--set", action="append", default=[], help="params override, e.g. serving.workers=1"
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args()
    report = asyncio.run(soak(args))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    bad = report["http_5xx"] + report["dropped"] + report["timeouts"] + report["url_fetches"]
    sys.exit(1 if bad or report["processes_died"] else 0)


if __name__ == "__main__":
    main()

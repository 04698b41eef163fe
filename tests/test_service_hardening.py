"""The service stays up whatever it is sent: malformed requests, refused formats, overload,
large uploads, missing tokens. Server tests run against a real `bentoml serve` on loopback
(the champion is shared with tests/test_service.py); the rest drive the library directly."""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from benchmarks.serving import phone_photo
from imageclf.config import load_params
from imageclf.deploy.inference import (
    UPLOAD_FORMATS,
    AdaptiveBatcher,
    InputError,
    Overloaded,
    classify_files,
    decode_image,
)
from imageclf.paths import ProjectPaths
from imageclf.tracking import redact_uri, scrub_credentials
from ops.local_servers import stop
from tests import service_helpers
from tests.conftest import FASHION_MNIST_DIR, REPO
from tests.service_helpers import MAX_BYTES, MAX_IMAGES, start_server

LIMITS = load_params(REPO / "params.yaml").serving
needs_dataset = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="needs dataset-fashion-mnist"
)
champion_project = service_helpers.champion_project  # trained once, shared with other modules


# ----------------------------------------------------------------------------- test inputs
def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def good_png() -> bytes:
    """A 28x28 grey image of noise (it does not compress to almost nothing, so cutting the
    file short cuts into its pixel data)."""
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    return encode(Image.fromarray(noise), "PNG")


def bomb_png(side: int = 15_000) -> bytes:
    """A few KB of PNG that decodes to side² pixels (15k: beyond Pillow's hard limit)."""
    return encode(Image.new("1", (side, side)), "PNG")


def gif_with_giant_frame() -> bytes:
    """A GIF whose header says 8x8 but whose first frame spans 65535²: not the header's size
    but the frame's trips DecompressionBombError (Pillow grows the image to fit the frame)."""
    small = encode(Image.new("L", (8, 8), 50), "GIF")
    descriptor = small.index(b"\x2c")  # image descriptor: left, top, width, height
    return small[: descriptor + 5] + struct.pack("<HH", 65535, 65535) + small[descriptor + 9 :]


def wmf() -> bytes:
    """A placeable Windows Metafile header (Pillow's WMF plugin would hand it to a handler)."""
    header = struct.pack("<LHhhhhHLH", 0x9AC6CDD7, 0, 0, 0, 100, 100, 1440, 0, 0)
    return header + b"\x01\x00\x09\x00\x00\x03" + b"\x00" * 64


def refused_formats() -> dict[str, bytes]:
    """Real files of formats Pillow could read but uploads must not reach: EPS and PDF (the
    PostScript family, Ghostscript), ICNS, ICO, TGA, PPM, PCX, JPEG 2000, WMF."""
    rgb = Image.new("RGB", (16, 16), (200, 10, 10))
    files = {fmt: encode(rgb, fmt) for fmt in ("EPS", "PDF", "ICNS", "ICO", "TGA", "PPM", "PCX")}
    files["JPEG2000"] = encode(rgb, "JPEG2000")
    files["WMF"] = wmf()
    files["PS"] = b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    return files


BOUNDARY = "hardening-boundary"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def multipart(*parts: bytes, close: bool = True) -> bytes:
    body = b"".join(b"--" + BOUNDARY.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + BOUNDARY.encode() + b"--\r\n" if close else b"")


def file_part(
    name: str, data: bytes, filename: str = "x.png", content_type: str = "image/png"
) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
    return (disposition + f"Content-Type: {content_type}\r\n\r\n").encode() + data


def text_part(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


def form(*parts: bytes, close: bool = True) -> dict[str, Any]:
    return {"content": multipart(*parts, close=close), "headers": MULTIPART}


def chunked(body: bytes, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The body as a stream: httpx then sends it chunked, without a Content-Length."""
    for start in range(0, len(body), chunk):
        yield body[start : start + chunk]


def raw_request(url: str, request: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request over a plain socket (for what no client library would send)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# (name, method, path, request builder, expected status, part of the message)
Case = tuple[str, str, str, Callable[[str], dict[str, Any]], int, str]
GOOD = good_png()
MALFORMED: list[Case] = [
    (
        "text as a png",
        "POST",
        "/classify",
        lambda u: form(file_part("image", b"hi")),
        415,
        "not an image",
    ),
    (
        "truncated png",
        "POST",
        "/classify",
        lambda u: form(file_part("image", GOOD[: len(GOOD) // 2])),
        400,
        "truncated",
    ),
    ("empty file", "POST", "/classify", lambda u: form(file_part("image", b"")), 400, "empty"),
    (
        "bomb beyond Pillow's limit",
        "POST",
        "/classify",
        lambda u: form(file_part("image", bomb_png())),
        413,
        "pixel limit",
    ),
    (
        "bomb under Pillow's limit",
        "POST",
        "/classify",
        lambda u: form(file_part("image", bomb_png(10_000))),
        413,
        "max_image_pixels",
    ),
    (
        "GIF frame bigger than its header",
        "POST",
        "/classify",
        lambda u: form(file_part("image", gif_with_giant_frame(), "x.gif", "image/gif")),
        413,
        "pixel limit",
    ),
    (
        "EPS",
        "POST",
        "/classify",
        lambda u: form(
            file_part("image", refused_formats()["EPS"], "x.eps", "application/postscript")
        ),
        415,
        "EPS",
    ),
    (
        "text value in the file field",
        "POST",
        "/classify",
        lambda u: form(text_part("image", b"hello")),
        400,
        "must be a file upload",
    ),
    (
        "URL in the file field",
        "POST",
        "/classify",
        lambda u: form(text_part("image", f"{u}/livez".encode())),
        400,
        "URLs are not fetched",
    ),
    (
        "URL in the batch field",
        "POST",
        "/classify_batch",
        lambda u: form(text_part("images", b"http://example.com/cat.jpg")),
        400,
        "URLs are not fetched",
    ),
    (
        "wrong field name",
        "POST",
        "/classify",
        lambda u: form(file_part("picture", GOOD)),
        400,
        "unknown field 'picture'",
    ),
    (
        "two files for one",
        "POST",
        "/classify",
        lambda u: form(file_part("image", GOOD), file_part("image", GOOD)),
        400,
        "takes one file",
    ),
    (
        "too many files",
        "POST",
        "/classify_batch",
        lambda u: form(*[file_part("images", GOOD)] * 500),
        413,
        "max_images_per_request",
    ),
    (
        "too many text parts",
        "POST",
        "/classify",
        lambda u: form(file_part("image", GOOD), *[text_part(f"f{i}", b"1") for i in range(2000)]),
        400,
        "unknown field",
    ),
    (
        "a part without headers",
        "POST",
        "/classify",
        lambda u: {
            "content": f"--{BOUNDARY}\r\n\r\nabc\r\n--{BOUNDARY}--\r\n".encode(),
            "headers": MULTIPART,
        },
        400,
        "Content-Disposition",
    ),
    (
        "body without closing boundary",
        "POST",
        "/classify",
        lambda u: form(file_part("image", GOOD), close=False),
        400,
        "truncated",
    ),
    (
        "garbage for the boundary",
        "POST",
        "/classify",
        lambda u: {"content": b"--elsewhere\r\nhello\r\n--elsewhere--\r\n", "headers": MULTIPART},
        400,
        "malformed",
    ),
    (
        "multipart without boundary",
        "POST",
        "/classify",
        lambda u: {
            "content": multipart(file_part("image", GOOD)),
            "headers": {"Content-Type": "multipart/form-data"},
        },
        400,
        "boundary",
    ),
    (
        "chunked body over the limit",
        "POST",
        "/classify",
        lambda u: {
            "content": chunked(multipart(file_part("image", b"\0" * (MAX_BYTES + 1)))),
            "headers": MULTIPART,
        },
        413,
        "max_request_bytes",
    ),
    (
        "declared body over the limit",
        "POST",
        "/classify",
        lambda u: form(file_part("image", b"\0" * (MAX_BYTES + 1))),
        413,
        "max_request_bytes",
    ),
    (
        "one bad image in a batch",
        "POST",
        "/classify_batch",
        lambda u: form(file_part("images", GOOD), file_part("images", b"junk")),
        415,
        "images[1]",
    ),
    (
        "JSON instead of multipart",
        "POST",
        "/classify",
        lambda u: {"json": {"image": "http://example.com/x.png"}},
        415,
        "multipart/form-data",
    ),
    (
        "text/plain body",
        "POST",
        "/classify",
        lambda u: {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
        415,
        "multipart/form-data",
    ),
    (
        "pickle body",
        "POST",
        "/classify",
        lambda u: {
            "content": b"\x80\x04.",
            "headers": {"Content-Type": "application/vnd.bentoml+pickle"},
        },
        415,
        "multipart/form-data",
    ),
    ("empty body", "POST", "/classify", lambda u: {"content": b""}, 400, "no image"),
    (
        "no file at all",
        "POST",
        "/classify_batch",
        lambda u: form(text_part("top_k", b"1")),
        400,
        "no image",
    ),
    (
        "huge top_k",
        "POST",
        "/classify",
        lambda u: form(file_part("image", GOOD), text_part("top_k", b"9" * 40)),
        400,
        "top_k",
    ),
    (
        "top_k beyond the classes",
        "POST",
        "/classify",
        lambda u: form(file_part("image", GOOD), text_part("top_k", b"11")),
        400,
        "between 1 and 10",
    ),
    (
        "top_k zero",
        "POST",
        "/classify",
        lambda u: form(file_part("image", GOOD), text_part("top_k", b"0")),
        400,
        "top_k",
    ),
    (
        "top_k not an integer",
        "POST",
        "/classify",
        lambda u: form(file_part("image", GOOD), text_part("top_k", b"2.5")),
        400,
        "top_k",
    ),
    (
        "top_k oversized",
        "POST",
        "/classify",
        lambda u: form(file_part("image", GOOD), text_part("top_k", b"1" * 5000)),
        400,
        "max_field_bytes",
    ),
    (
        "top_k given as a file",
        "POST",
        "/classify",
        lambda u: form(file_part("image", GOOD), file_part("top_k", b"3")),
        400,
        "text field",
    ),
    (
        "file name too long",
        "POST",
        "/classify",
        lambda u: form(file_part("image", GOOD, "a" * 400 + ".png")),
        400,
        "max_filename_bytes",
    ),
    (
        "NUL in the file name",
        "POST",
        "/classify",
        lambda u: form(file_part("image", GOOD, "a\0b.png")),
        400,
        "NUL",
    ),
    (
        "garbage query string",
        "POST",
        "/classify?%%ZZ&&==;;top_k=abc&%00",
        lambda u: {"content": b""},
        400,
        "no image",
    ),
    ("GET on an API endpoint", "GET", "/classify", lambda u: {}, 405, "method"),
    ("unknown endpoint", "GET", "/no/such/thing", lambda u: {}, 404, "no such endpoint"),
    (
        "garbage JSON to model_info",
        "POST",
        "/model_info",
        lambda u: {"content": b"[[[", "headers": {"Content-Type": "application/json"}},
        400,
        "JSON",
    ),
    (
        "task submitted without a file",
        "POST",
        "/classify_async/submit",
        lambda u: form(text_part("images", b"http://x")),
        400,
        "must be a file upload",
    ),
    ("task status without an id", "GET", "/classify_async/status", lambda u: {}, 400, "task_id"),
    (
        "result of an unknown task",
        "GET",
        "/classify_async/get?task_id=nope",
        lambda u: {},
        404,
        "not found",
    ),
    (
        "page: EPS",
        "POST",
        "/ui/api/classify",
        lambda u: {"content": refused_formats()["EPS"]},
        415,
        "EPS",
    ),
    (
        "page: top_k not a number",
        "POST",
        "/ui/api/classify?top_k=abc",
        lambda u: {"content": GOOD},
        400,
        "top_k",
    ),
    (
        "page: chunked body over the limit",
        "POST",
        "/ui/api/classify",
        lambda u: {"content": chunked(b"\0" * (MAX_BYTES + 1))},
        413,
        "max_request_bytes",
    ),
    (
        "page: example that is not a number",
        "GET",
        "/ui/api/examples/abc",
        lambda u: {},
        422,
        "index",
    ),
]


def error_of(response: httpx.Response) -> str:
    """The message of an error answer: JSON ``{"error": "<message>"}``, nothing else."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    assert body["error"], body
    return body["error"]


def worker_pids(proc: Any) -> set[int]:
    """The processes of a server's process group (its workers included)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == proc.pid:  # field 5: pgid
                pids.add(int(entry.name))
    return pids


# ---------------------------------------------------------------------------- the servers
@pytest.fixture(scope="module")
def served(champion_project: ProjectPaths) -> Iterator[tuple[Any, str]]:
    proc, url = start_server(champion_project)
    yield proc, url
    stop(proc)


def classifies(url: str, **kwargs: Any) -> bool:
    r = httpx.post(f"{url}/classify", files={"image": ("x.png", GOOD, "image/png")}, **kwargs)
    return r.status_code == 200 and len(r.json()["predictions"]) == LIMITS.top_k


@pytest.mark.slow
@needs_dataset
def test_every_malformed_request_gets_a_4xx_that_says_why(served):
    """~45 malformed requests (the kinds that got 5xx or a dropped connection before, and
    more): each a 4xx with a JSON message; the workers stay the same processes and serve."""
    proc, url = served
    assert len(MALFORMED) >= 30
    before = worker_pids(proc)
    client = httpx.Client(base_url=url, timeout=60)
    failures = []
    for name, method, path, build, status, fragment in MALFORMED:
        try:
            r = client.request(method, path, **build(url))
        except httpx.HTTPError as exc:  # a dropped connection is a failure too
            failures.append(f"{name}: {type(exc).__name__} {exc}")
            continue
        if r.status_code != status or fragment.lower() not in error_of(r).lower():
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    status, body = raw_request(
        url,
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n--b\r\n\r\n0\r\n\r\n",
    )
    assert status == 400 and b"error" in body
    assert client.get("/livez").status_code == 200
    assert classifies(url)
    assert worker_pids(proc) == before  # no worker died and was replaced


@pytest.mark.slow
@needs_dataset
def test_refused_formats_are_415_on_every_upload_path(served):
    """EPS, PDF and the other formats outside the allow-list never reach a decoder, whichever
    endpoint they come through: single, batch, async task, the web page's raw-body route."""
    _, url = served
    client = httpx.Client(base_url=url, timeout=60)
    for fmt, data in refused_formats().items():
        upload = ("x." + fmt.lower(), data, "application/octet-stream")
        answers = {
            "/classify": client.post("/classify", files={"image": upload}),
            "/classify_batch": client.post(
                "/classify_batch",
                files=[("images", ("ok.png", GOOD, "image/png")), ("images", upload)],
            ),
            "/ui/api/classify": client.post("/ui/api/classify", content=data),
        }
        for route, r in answers.items():
            assert r.status_code == 415, (fmt, route, r.text)
            assert "EPS, PDF and other formats are refused" in error_of(r), (fmt, route)
        assert "images[1]" in error_of(answers["/classify_batch"])
    task = client.post(
        "/classify_async/submit", files={"images": ("x.eps", refused_formats()["EPS"])}
    )
    assert task.status_code == 200, task.text
    task_id = task.json()["task_id"]
    for _ in range(120):
        state = client.get("/classify_async/status", params={"task_id": task_id}).json()["status"]
        if state != "in_progress":
            break
        time.sleep(0.25)
    assert state == "failed"
    result = client.get("/classify_async/get", params={"task_id": task_id})
    assert result.status_code == 415 and "EPS" in error_of(result)


@pytest.mark.slow
@needs_dataset
def test_livez_answers_while_large_photos_are_decoded(served):
    """Decoding runs on threads, off the event loop: while several 12-megapixel uploads are in
    flight, /livez still answers (no timing is asserted, only that it answers)."""
    _, url = served
    photo = phone_photo()
    results: list[int] = []
    started = threading.Event()

    def upload() -> None:
        started.set()
        r = httpx.post(
            f"{url}/classify", files={"image": ("p.jpg", photo, "image/jpeg")}, timeout=120
        )
        results.append(r.status_code)

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for thread in threads:
        thread.start()
    started.wait()
    health = []
    while any(t.is_alive() for t in threads):
        health.append(httpx.get(f"{url}/livez", timeout=30).status_code)
    for thread in threads:
        thread.join()
    assert health and set(health) == {200}
    assert results == [200] * 6


@pytest.fixture(scope="module")
def guarded(champion_project: ProjectPaths) -> Iterator[str]:
    """A server with an API token and a tiny task store (2 tasks, 3 s lifetime)."""
    proc, url = start_server(
        champion_project,
        env={"IMAGECLF_API_TOKEN": "s3cret-token"},
        serving={"max_tasks": 2, "task_lifetime_s": 3.0},
    )
    yield url
    stop(proc)


AUTH = {"Authorization": "Bearer s3cret-token"}


@pytest.mark.slow
@needs_dataset
def test_api_token_guards_every_endpoint_but_health_metrics_and_page(guarded):
    client = httpx.Client(base_url=guarded, timeout=60)
    image = {"image": ("x.png", GOOD, "image/png")}
    for method, path, kwargs in [
        ("POST", "/classify", {"files": image}),
        ("POST", "/classify_batch", {"files": {"images": ("x.png", GOOD)}}),
        ("POST", "/classify_async/submit", {"files": {"images": ("x.png", GOOD)}}),
        ("GET", "/classify_async/status?task_id=x", {}),
        ("POST", "/model_info", {"json": {}}),
        ("POST", "/ui/api/classify", {"content": GOOD}),
        ("GET", "/ui/api/info", {}),
        ("GET", "/ui/api/examples", {}),
        ("GET", "/docs.json", {}),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            r = client.request(method, path, headers=headers, **kwargs)
            assert r.status_code == 401, (path, headers, r.text)
            assert "Authorization: Bearer" in error_of(r)
            assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/livez", "/readyz", "/metrics", "/ui/"):
        assert client.get(path).status_code == 200, path
    assert classifies(guarded, headers=AUTH, timeout=60)
    r = client.post("/ui/api/classify", content=GOOD, headers=AUTH)
    assert r.status_code == 200, r.text


@pytest.mark.slow
@needs_dataset
def test_task_store_is_bounded_by_count_and_lifetime(guarded):
    client = httpx.Client(base_url=guarded, timeout=60, headers=AUTH)
    files = [("images", ("x.png", GOOD, "image/png"))]
    ids = []
    for _ in range(2):
        r = client.post("/classify_async/submit", files=files)
        assert r.status_code == 200, r.text
        ids.append(r.json()["task_id"])
    full = client.post("/classify_async/submit", files=files)
    assert full.status_code == 429
    assert "serving.max_tasks" in error_of(full) and full.headers["retry-after"].isdigit()
    for task_id in ids:  # both still served while they live
        for _ in range(40):
            status = client.get("/classify_async/status", params={"task_id": task_id}).json()
            if status["status"] == "completed":
                break
            time.sleep(0.05)
        assert status["status"] == "completed"
    time.sleep(4.5)  # past serving.task_lifetime_s (stored to the second): they are dropped
    again = client.post("/classify_async/submit", files=files)
    assert again.status_code == 200, again.text
    gone = client.get("/classify_async/status", params={"task_id": ids[0]})
    assert gone.status_code == 404


@pytest.mark.slow
@needs_dataset
def test_no_answer_shows_the_tracking_uri_credentials(champion_project):
    """A registry URI with a password in it (here an MLflow server that does not answer):
    the service starts not-ready and says why, without the password."""
    secret_uri = "http://alice:hunter2-secret@127.0.0.1:9/"
    proc, url = start_server(
        champion_project,
        env={
            "MLFLOW_TRACKING_URI": secret_uri,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
        },
    )
    try:
        answers = [
            httpx.post(f"{url}/model_info", json={}, timeout=60),
            httpx.get(f"{url}/ui/api/info", timeout=60),
            httpx.post(f"{url}/classify", files={"image": ("x.png", GOOD)}, timeout=60),
            httpx.post(f"{url}/ui/api/classify", content=GOOD, timeout=60),
        ]
        for r in answers:
            assert "hunter2" not in r.text and "alice" not in r.text, r.text
        assert answers[2].status_code == 503 and error_of(answers[2])
    finally:
        stop(proc)


# --------------------------------------------------------------- in-process (no server)
def test_decoding_refuses_formats_outside_the_allow_list(monkeypatch):
    """No refused format reaches its decoder: Ghostscript (EPS/PS/PDF) is never called,
    whether it is installed or not, and each file gets a 415 that names the allowed ones."""
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs", raising=False)
    for fmt, data in refused_formats().items():
        with pytest.raises(InputError) as caught:
            decode_image(data, LIMITS, 28, 1)
        assert caught.value.status == 415, fmt
        assert "PNG, JPEG" in str(caught.value)
    assert not calls
    assert set(UPLOAD_FORMATS) == {"PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"}


def test_decompression_bombs_are_refused_by_header_and_by_frame():
    for data in (bomb_png(), gif_with_giant_frame()):
        with pytest.raises(InputError) as caught:
            decode_image(data, LIMITS, 28, 1)
        assert caught.value.status == 413 and "pixel limit" in str(caught.value)


def test_batch_predict_refuses_eps_per_file(tmp_path, monkeypatch):
    """The offline batch command shares the upload decoder: an EPS in the folder gets its
    reason in the error column and Ghostscript is never called."""
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))

    class Model:
        size, channels, classes = 28, 1, ["a", "b"]

        def probabilities(self, images: np.ndarray) -> np.ndarray:
            return np.tile([0.25, 0.75], (len(images), 1)).astype(np.float32)

        def top_k(self, probs: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
            return [[{"label": "b", "index": 1, "probability": float(p[1])}] for p in probs]

    (tmp_path / "ok.png").write_bytes(GOOD)
    (tmp_path / "evil.png").write_bytes(refused_formats()["EPS"])
    rows = classify_files(Model(), sorted(tmp_path.iterdir()), LIMITS, 1)  # type: ignore[arg-type]
    by_file = {Path(r["file"]).name: r for r in rows}
    assert "not an image this service can read" in by_file["evil.png"]["error"]
    assert by_file["ok.png"]["error"] == "" and by_file["ok.png"]["label_1"] == "b"
    assert not calls


def test_batcher_refuses_beyond_its_queue_bound():
    """With the model busy, images queue up to max_queue_images; the next request is refused
    at once (Overloaded, the service's 503) instead of waiting, and the queue drains after."""
    release = threading.Event()

    def slow_model(batch: np.ndarray) -> tuple[np.ndarray]:
        release.wait(timeout=30)
        return (batch.reshape(len(batch), -1).sum(1),)

    async def scenario() -> tuple[list[Any], int]:
        batcher = AdaptiveBatcher(
            slow_model, max_batch_size=2, max_latency_ms=0, max_queue_images=3
        )
        image = np.ones((1, 2, 2, 1), dtype=np.uint8)
        first = asyncio.ensure_future(batcher.submit(image))  # taken by the model at once
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(batcher.submit(image)) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert batcher.queued_images == 3
        with pytest.raises(Overloaded, match="max_queue_images"):
            await batcher.submit(image)
        with pytest.raises(Overloaded):
            await batcher.submit(np.ones((2, 2, 2, 1), dtype=np.uint8))
        release.set()
        results = await asyncio.gather(first, *waiting)
        after = await batcher.submit(image)  # room again once the queue drained
        return [*results, after], batcher.queued_images

    results, queued = asyncio.run(scenario())
    assert [int(r[0][0]) for r in results] == [4] * 5 and queued == 0


def test_redact_uri_hides_credentials_only():
    assert redact_uri("http://user:s3cret@mlflow:5000") == "http://***@mlflow:5000"
    assert redact_uri("postgresql://u:pw@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert redact_uri("https://host/x?token=abc&run=1") == "https://host/x?token=***&run=1"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact_uri("http://host:5000") == "http://host:5000"
    text = "cannot reach http://a:b@h:1/x (also https://tok@h2)"
    assert scrub_credentials(text) == "cannot reach http://***@h:1/x (also https://***@h2)"
    # Signed URLs (S3, GCS, Azure SAS): the signature and credentials go, the rest stays.
    s3 = (
        "https://b.s3.amazonaws.com/m.onnx?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIA%2F20261208&X-Amz-Security-Token=FwoGZX&X-Amz-Expires=60"
        "&X-Amz-Signature=9f86d08"
    )
    assert redact_uri(s3) == (
        "https://b.s3.amazonaws.com/m.onnx?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Expires=60&X-Amz-Signature=***"
    )
    gcs = "https://storage.googleapis.com/b/o?X-Goog-Credential=sa%40p&X-Goog-Signature=ab12"
    assert redact_uri(gcs) == (
        "https://storage.googleapis.com/b/o?X-Goog-Credential=***&X-Goog-Signature=***"
    )
    assert redact_uri("https://a.blob.core.windows.net/c/m?sv=2024&sig=Zm9v%3D") == (
        "https://a.blob.core.windows.net/c/m?sv=2024&sig=***"
    )
    assert (
        scrub_credentials("GET /x?api_key=123&page=2 failed") == "GET /x?api_key=***&page=2 failed"
    )


def test_serving_limits_are_consistent(default_params):
    """A full request fits an empty queue and an empty task store (else it never could)."""
    from pydantic import ValidationError

    serving = default_params.serving.model_dump()
    with pytest.raises(ValidationError, match="max_queue_images"):
        type(default_params.serving).model_validate(
            {**serving, "max_queue_images": serving["max_images_per_request"] - 1}
        )
    with pytest.raises(ValidationError, match="max_task_bytes"):
        type(default_params.serving).model_validate({**serving, "max_task_bytes": 1 << 20})
    assert LIMITS.max_queue_images >= MAX_IMAGES

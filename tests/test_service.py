"""The BentoML service under a real `bentoml serve` on loopback, with a registered champion.

The champion is a real (small, quickly trained) Fashion-MNIST model, trained with the stage
functions, registered and promoted in a temporary MLflow store (tests/service_helpers.py builds
it once for every module that serves it), then served.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.serving import phone_photo, small_photo
from imageclf.data.store import load_dataset
from imageclf.deploy.inference import OnnxClassifier
from imageclf.models.checkpoint import load_checkpoint
from imageclf.models.zoo import split_head
from imageclf.paths import ProjectPaths
from imageclf.registry import register_workspace
from ops.local_servers import stop
from tests import service_helpers
from tests.conftest import FASHION_MNIST_DIR, REPO, tiny_params
from tests.service_helpers import DEFAULT_LIMITS, MAX_BYTES, MAX_IMAGES, png, start_server

# `make test` runs the module's one `bentoml serve` (real requests, the web page in a real
# browser); the tests that start servers or builds of their own are `slow` (`make test-all`).
pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="needs dataset-fashion-mnist"
)
champion_project = service_helpers.champion_project  # trained once, shared with other modules


@pytest.fixture(scope="module")
def served(champion_project: ProjectPaths) -> Iterator[tuple[subprocess.Popen, str]]:
    """The module's `bentoml serve` of the champion: (process, URL)."""
    proc, url = start_server(champion_project)
    yield proc, url
    stop(proc)


@pytest.fixture(scope="module")
def server(served: tuple[subprocess.Popen, str]) -> str:
    return served[1]


@pytest.fixture(scope="module")
def test_images(champion_project: ProjectPaths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First 40 test images, labels, and the champion's own in-process predictions."""
    test = load_dataset(champion_project.dataset).test
    images, labels = test.images[:40], test.labels[:40]
    model = OnnxClassifier(champion_project.onnx)
    return images, labels, model.probabilities(images).argmax(1)


def test_ready_and_real_image_gets_its_class(server, test_images):
    images, labels, offline = test_images
    client = httpx.Client(base_url=server, timeout=30)
    assert client.get("/readyz").status_code == 200
    served = []
    for image in images:
        r = client.post(
            "/classify", files={"image": ("x.png", png(image), "image/png")}, data={"top_k": "3"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["predictions"]) == 3 and body["model"]["alias"] == "champion"
        served.append(body["predictions"][0]["index"])
    assert served == offline.tolist()  # exactly what the model says in-process
    assert (np.asarray(served) == labels).mean() >= 0.7
    first_right = int(np.flatnonzero(offline == labels)[0])
    r = client.post("/classify", files={"image": ("x.png", png(images[first_right]), "image/png")})
    assert r.json()["predictions"][0]["index"] == labels[first_right]


def test_any_size_and_mode_is_accepted(server, test_images):
    images, _, offline = test_images
    big = Image.fromarray(images[0].squeeze()).resize((300, 300)).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=95)
    r = httpx.post(f"{server}/classify", files={"image": ("x.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 200 and r.json()["predictions"][0]["index"] == offline[0]


def test_phone_photo_of_several_mb_is_accepted(server, test_images):
    """A 12-megapixel JPEG straight from a phone, through both upload routes: accepted within
    the default limits and classified like the same picture at a small size."""
    photo = phone_photo()
    assert len(photo) > 3_000_000
    small = httpx.post(
        f"{server}/classify",
        files={"image": ("cat.jpg", small_photo(), "image/jpeg")},
        data={"top_k": "1"},
        timeout=60,
    )
    r = httpx.post(
        f"{server}/classify",
        files={"image": ("IMG_0001.jpg", photo, "image/jpeg")},
        data={"top_k": "1"},
        timeout=60,
    )
    assert small.status_code == 200 and r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"] == small.json()["predictions"][0]["label"]
    raw = httpx.post(
        f"{server}/ui/api/classify",
        content=photo,
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    )
    assert raw.status_code == 200, raw.text


def test_examples_of_the_served_version(server, champion_project):
    """The page's example images are the ones registered with the served version."""
    listed = httpx.get(f"{server}/ui/api/examples").json()["examples"]
    classes = httpx.post(f"{server}/model_info", json={}).json()["classes"]
    assert len(listed) == DEFAULT_LIMITS.examples
    assert {e["label"] for e in listed} == set(classes)  # 20 examples over 10 classes
    first = httpx.get(f"{server}/ui/{listed[0]['url']}")
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(first.content)).size == (28, 28)
    missing = httpx.get(f"{server}/ui/api/examples/{len(listed)}")
    assert missing.status_code == 404 and "api/examples" in missing.json()["error"]


def test_batch_and_async(server, test_images):
    images, _, offline = test_images
    files = [("images", (f"{i}.png", png(images[i]), "image/png")) for i in range(3)]
    r = httpx.post(f"{server}/classify_batch", files=files, timeout=30)
    assert r.status_code == 200, r.text
    assert [p[0]["index"] for p in r.json()["predictions"]] == offline[:3].tolist()

    r = httpx.post(f"{server}/classify_async/submit", files=files, timeout=30)
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    for _ in range(60):
        status = httpx.get(f"{server}/classify_async/status", params={"task_id": task_id}).json()
        if status["status"] in ("completed", "failed"):
            break
        time.sleep(0.5)
    assert status["status"] == "completed", status
    result = httpx.get(f"{server}/classify_async/get", params={"task_id": task_id}).json()
    assert [p[0]["index"] for p in result["predictions"]] == offline[:3].tolist()


def test_model_info_metrics_and_page(server):
    info = httpx.post(f"{server}/model_info", json={}).json()
    assert info["ready"] and info["version"] == "1" and info["alias"] == "champion"
    assert 0 < info["metrics"]["test_accuracy"] <= 1 and len(info["classes"]) == 10
    assert httpx.get(f"{server}/livez").status_code == 200
    metrics = httpx.get(f"{server}/metrics")
    assert metrics.status_code == 200 and "bentoml_service_request" in metrics.text
    assert 'imageclf_predictions_total{label="' in metrics.text
    assert "imageclf_inference_latency_seconds_bucket" in metrics.text
    page = httpx.get(f"{server}/ui/")
    assert page.status_code == 200 and "<canvas" in page.text


def bomb() -> bytes:
    """A tiny PNG that decodes to 100 megapixels."""
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 100_000
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "files", "status", "message"),
    [
        (
            "not an image",
            {"image": ("x.png", b"hello, I am text", "image/png")},
            415,
            "not an image",
        ),
        ("truncated", "truncated", 400, "truncated"),
        ("empty file", {"image": ("x.png", b"", "image/png")}, 400, "empty"),
        ("decompression bomb", {"image": ("x.png", "bomb", "image/png")}, 413, "pixel limit"),
        (
            "oversized body",
            {"image": ("x.png", b"\0" * (MAX_BYTES + 10), "image/png")},
            413,
            "limit",
        ),
    ],
)
def test_bad_input_is_4xx_with_reason(server, test_images, name, files, status, message):
    if files == "truncated":
        files = {"image": ("x.png", png(test_images[0][0])[:120], "image/png")}
    elif files["image"][1] == "bomb":
        files = {"image": ("x.png", bomb(), "image/png")}
    r = httpx.post(f"{server}/classify", files=files, timeout=30)
    assert r.status_code == status, (name, r.text)
    assert message in r.text, r.text
    # ...and the service is still up and serving.
    ok = httpx.post(
        f"{server}/classify",
        files={"image": ("x.png", png(test_images[0][0]), "image/png")},
        timeout=30,
    )
    assert ok.status_code == 200


def test_refused_requests_are_one_line_in_the_log_not_a_traceback(served):
    """Bad input is the client's problem: the log gets one line per refusal (path, status,
    reason), so a client sending garbage cannot flood it with tracebacks."""
    proc, url = served
    log = proc.log_path
    before = log.stat().st_size
    for data in (b"hello, I am text", b""):
        r = httpx.post(f"{url}/classify", files={"image": ("x.png", data, "image/png")})
        assert 400 <= r.status_code < 500
    assert httpx.post(f"{url}/classify", timeout=30).status_code == 400  # no file at all
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the workers' log lines reach the file asynchronously
        new = log.read_bytes()[before:].decode(errors="replace")
        if new.count("Exception on /classify [POST] -> ") >= 2:
            break
        time.sleep(0.2)
    assert new.count("Exception on /classify [POST] -> ") >= 2, new[-3000:]
    assert "-> 415: image is not an image" in new and "-> 400: image is empty" in new
    assert "Traceback" not in new, new[-3000:]


def test_random_paths_do_not_grow_metrics(server):
    """Each request to a path that is no route counts under one label, "other": a scanner
    trying thousands of paths cannot grow /metrics (or Prometheus) by a series each."""
    before = httpx.get(f"{server}/metrics").text
    for i in range(40):
        assert httpx.get(f"{server}/no-such-path-{i}").status_code == 404
    assert httpx.get(f"{server}/ui/api/info").status_code == 200
    after = httpx.get(f"{server}/metrics").text
    assert "no-such-path" not in after
    assert 'endpoint="other"' in after
    assert 'endpoint="/ui/api/info"' in after  # the page's routes keep their own label
    assert len(after) - len(before) < 20_000  # not ~80 KB a path, as before


def test_request_without_file_and_too_many_images(server, test_images):
    assert httpx.post(f"{server}/classify", timeout=30).status_code == 400
    one = png(test_images[0][0])
    files = [("images", (f"{i}.png", one, "image/png")) for i in range(MAX_IMAGES + 1)]
    r = httpx.post(f"{server}/classify_batch", files=files, timeout=30)
    assert r.status_code == 413 and "limit" in r.text
    r = httpx.post(f"{server}/ui/api/classify", content=b"", timeout=30)
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = httpx.post(f"{server}/ui/api/classify", content=b"<html>", timeout=30)
    assert r.status_code == 415


@pytest.mark.slow
def test_not_ready_without_champion_says_why(champion_project):
    proc, url = start_server(champion_project, alias="no-such-alias")
    try:
        assert httpx.get(f"{url}/readyz").status_code == 503
        info = httpx.post(f"{url}/model_info", json={}).json()
        assert not info["ready"] and "no-such-alias" in info["reason"]
        r = httpx.post(f"{url}/classify", files={"image": ("x.png", b"123", "image/png")})
        assert r.status_code == 503
    finally:
        stop(proc)


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def rendered(page, selector: str) -> dict[str, float]:
    """What a person sees of an element: its box on screen, in CSS pixels."""
    box = page.locator(selector).first.bounding_box()
    assert box is not None, f"{selector} is not displayed"
    return box


def bar_fractions(page) -> list[tuple[float, float]]:
    """(drawn fill width / track width, probability) of each result bar, top first."""
    return page.evaluate(
        """() => [...document.querySelectorAll('#results .bar')].map((bar) => [
            bar.querySelector('.fill').getBoundingClientRect().width
              / bar.querySelector('.track').getBoundingClientRect().width,
            Number(bar.dataset.probability)])"""
    )


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")
def test_web_page_in_a_real_browser(server, champion_project, test_images, tmp_path):
    """What a person sees: the upload shown large, bars as long as their probabilities, example
    images that classify when clicked, and the drawing canvas."""
    from playwright.sync_api import sync_playwright

    images, labels, offline = test_images
    probs = OnnxClassifier(champion_project.onnx).probabilities(images)
    right = np.flatnonzero(offline == labels)
    index = int(right[np.argmax(probs[right].max(1))])  # the most confident right answer
    assert probs[index].max() >= 0.5
    image_file = tmp_path / "garment.png"
    image_file.write_bytes(png(images[index]))
    photo_file = tmp_path / "cat.jpg"
    photo_file.write_bytes(phone_photo(megapixels=2.0))
    classes = httpx.post(f"{server}/model_info", json={}).json()["classes"]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1200})
            page.goto(f"{server}/ui/")
            page.wait_for_function("document.getElementById('model').dataset.version === '1'")
            page.set_input_files("#file", str(image_file))
            page.wait_for_selector("#results[data-top]", timeout=15000)
            assert page.get_attribute("#results", "data-top") == classes[labels[index]]
            assert len(page.query_selector_all("#results .bar")) == 5
            assert "model v1" in page.inner_text("#timing")
            # The bars are drawn as long as their probabilities (the top one over half its track).
            fractions = bar_fractions(page)
            assert fractions[0][1] == pytest.approx(probs[index].max(), abs=1e-4)
            assert fractions[0][0] >= 0.5
            for drawn, probability in fractions:
                assert drawn == pytest.approx(probability, abs=0.02)
            # The 28x28 upload fills the preview (10x, sharp pixels), not a 28-pixel speck.
            page.wait_for_function("document.querySelector('#drop img').style.width !== ''")
            shown = rendered(page, "#drop img")
            assert shown["width"] >= 250 and shown["height"] >= 250
            assert (
                page.eval_on_selector("#drop img", "e => getComputedStyle(e).imageRendering")
                == "pixelated"
            )
            # A photo is fitted with its aspect ratio kept, and smoothed.
            page.set_input_files("#file", str(photo_file))
            page.wait_for_function(
                "document.querySelector('#drop img') && "
                "document.querySelector('#drop img').naturalWidth > 1000 && "
                "document.querySelector('#drop img').style.width !== ''"
            )
            page.wait_for_selector("#results[data-top]", timeout=30000)
            photo = Image.open(photo_file)
            shown = rendered(page, "#drop img")
            assert shown["width"] >= 250
            assert shown["width"] / shown["height"] == pytest.approx(
                photo.width / photo.height, rel=0.02
            )
            assert (
                page.eval_on_selector("#drop img", "e => getComputedStyle(e).imageRendering")
                != "pixelated"
            )
            # The served version's examples: click one, it is shown large and classified.
            page.wait_for_function(
                f"document.querySelectorAll('#examples .example').length === "
                f"{DEFAULT_LIMITS.examples}"
            )
            thumb = rendered(page, "#examples .example img")
            assert thumb["width"] >= 48  # a thumbnail a person can see and click
            example = page.locator("#examples .example").nth(3)
            truth = example.get_attribute("data-label")
            assert truth in classes
            page.evaluate("document.getElementById('results').removeAttribute('data-top')")
            example.click()
            page.wait_for_selector("#results[data-top]", timeout=15000)
            assert page.get_attribute("#results", "data-top") in classes
            assert truth in page.inner_text("#truth")
            page.wait_for_function(
                "document.querySelector('#drop img').naturalWidth === 28 && "
                "document.querySelector('#drop img').style.width !== ''"
            )
            assert rendered(page, "#drop img")["width"] >= 250
            assert bar_fractions(page)[0][0] == pytest.approx(bar_fractions(page)[0][1], abs=0.02)
            # Draw on the canvas and classify the drawing: some class comes back.
            box = page.locator("canvas").bounding_box()
            page.mouse.move(box["x"] + 60, box["y"] + 60)
            page.mouse.down()
            page.mouse.move(box["x"] + 200, box["y"] + 220, steps=8)
            page.mouse.up()
            page.evaluate("document.getElementById('results').removeAttribute('data-top')")
            page.click("#classify-drawing")
            page.wait_for_selector("#results[data-top]", timeout=15000)
            assert page.get_attribute("#results", "data-top") in classes
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()


@pytest.mark.slow
def test_bentoml_build_makes_a_bento_offline(tmp_path):
    """`bentoml build` from bentofile.yaml: the code is in, data/models/venv are not."""
    bentoml = shutil.which("bentoml", path=str(Path(sys.executable).parent))
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run(
        [bentoml, "build", "--output", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    src = next((tmp_path / "bentos" / "imageclf").glob("*/src"))
    for needed in (
        "services/service.py",
        "services/static/index.html",
        "imageclf/deploy/inference.py",
        "imageclf/data/store.py",
        "params.yaml",
    ):
        assert (src / needed).is_file(), needed
    for unwanted in ("data", "models", ".venv", "tests", "mlflow.db"):
        assert not (src / unwanted).exists(), unwanted
    requirements = (src.parent / "env" / "python" / "requirements.txt").read_text().splitlines()
    packages = [line.split(">")[0].split("=")[0] for line in requirements if line[:1].isalpha()]
    assert "onnxruntime" in packages and "torch" not in packages


def test_registering_the_same_workspace_model_again_adds_no_version(champion_project):
    params = tiny_params(registry={"max_latency_ms": 1000.0})
    assert register_workspace(champion_project, params) == "1"


def test_predictions_are_logged_with_input_summaries(server, champion_project, test_images):
    from monitoring.prediction_log import PredictionLog

    images, _, offline = test_images
    path = champion_project.root / "logs" / "predictions.sqlite"

    def logged() -> int:
        return len(PredictionLog(path).read_window()["ts"]) if path.exists() else 0

    before = logged()  # earlier tests' requests may still be on their way to the log
    time.sleep(1.0)
    before = max(before, logged())
    r = httpx.post(f"{server}/classify", files={"image": ("x.png", png(images[5]), "image/png")})
    assert r.status_code == 200
    for _ in range(40):  # the service writes on a background thread, every 0.25 s
        if logged() > before:
            break
        time.sleep(0.25)
    window = PredictionLog(path).read_window(last=1)
    assert window["model_version"] == ["1"] and window["predicted"][0] == offline[5]
    # The embedding is the classifier's input, whatever the trained architecture.
    dim = split_head(load_checkpoint(champion_project.checkpoint)[0])[1].in_features
    assert window["pixels"].shape == (1, 7) and window["embeddings"].shape == (1, dim)
    assert 0 < window["confidence"][0] <= 1


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("wrk"), reason="wrk not installed (make setup installs it)")
def test_load_benchmark_runs_every_target(champion_project, tmp_path):
    """The benchmark script end to end, briefly: every target answers under load without a
    failed request and the report is written (its speed numbers are not asserted: noisy)."""
    out = tmp_path / "bench.md"
    env = {**os.environ, "IMAGECLF_ROOT": str(champion_project.root), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "benchmarks.serving", "--duration", "1", "--concurrency", "4"]
    cmd += ["--images", "test", "photo224", "photo12mp"]
    done = subprocess.run(
        [*cmd, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    rows = [[c.strip() for c in line.split("|")] for line in report.splitlines()]
    served = {(r[1], r[2]): r for r in rows if len(r) == 11 and r[3] == "4"}
    for image in ("test", "photo224", "photo12mp"):
        for target in (
            "bentoml /classify (multipart)",
            "bentoml /ui/api/classify (raw body)",
            "baseline FastAPI /classify",
            "baseline FastAPI x2 workers /classify",
            "baseline FastAPI /noop (HTTP ceiling)",
        ):
            row = served[target, image]
            assert float(row[4]) > 0 and row[8] == "0", (target, image)
    assert "onnxruntime in-process, batch 64" in report
    assert "decode + preprocess photo12mp" in report


@pytest.mark.slow
def test_stopping_the_service_writes_the_last_predictions(champion_project, test_images):
    """A graceful stop flushes the prediction log's queue (the on_shutdown hook)."""
    from monitoring.prediction_log import PredictionLog

    images, _, _ = test_images
    path = champion_project.root / "logs" / "predictions.sqlite"
    proc, url = start_server(champion_project)
    try:
        time.sleep(1.0)  # whatever earlier tests queued is written by now
        before = len(PredictionLog(path).read_window()["ts"]) if path.exists() else 0
        for i in range(5):
            files = {"image": ("x.png", png(images[i]), "image/png")}
            assert httpx.post(f"{url}/classify", files=files).status_code == 200
    finally:
        stop(proc)  # SIGTERM right away: the rows are still queued in the workers
    assert len(PredictionLog(path).read_window()["ts"]) == before + 5


@pytest.mark.slow
# ------------------------------------------------ Prometheus scraping the served service
@pytest.mark.skipif(not shutil.which("prometheus"), reason="prometheus not installed (make setup)")
def test_prometheus_scrapes_the_service_and_alerts_on_drift(
    served, champion_project, test_images, tmp_path
):
    """A real Prometheus, configured from ops/prometheus/prometheus.yml (only the target and
    the intervals replaced), scrapes the served champion: the service's metrics arrive, every
    alert rule loads and evaluates, a drift verdict written by the monitoring flow reaches
    Prometheus through the service and fires ImageclfDriftDetected, and every metric the rules
    and the Grafana dashboard use is one this service really exposes."""
    from imageclf.io import write_json
    from ops.local_servers import free_port, output, start
    from ops.prometheus.config import write_config
    from tests.prometheus_helpers import (
        PROMETHEUS,
        SCRAPE_SERIES,
        alert_exprs,
        dashboard_exprs,
        exposed_names,
        metric_names,
        worker_readiness,
    )

    server_proc, server = served
    images, _, _ = test_images
    target = server.removeprefix("http://")
    config = write_config(tmp_path / "prometheus", target, interval_s=0.5)
    verdict = champion_project.monitoring_verdict
    tests = {"confidence": {"drift": True}, "embedding.mmd": {"drift": True}}
    write_json(verdict, {"drift": True, "window_size": 150, "reasons": ["x"], "tests": tests})
    port = free_port()
    prometheus = f"http://127.0.0.1:{port}"
    cmd = [
        str(PROMETHEUS),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    proc = start(cmd, dict(os.environ), cwd=tmp_path, ready_url=f"{prometheus}/-/ready")
    try:
        for image in images[:3]:
            files = {"image": ("x.png", png(image), "image/png")}
            assert httpx.post(f"{server}/classify", files=files).status_code == 200

        def value(query: str) -> float | None:
            answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}).json()
            assert answer["status"] == "success", answer
            result = answer["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        def firing() -> set[str]:
            alerts = httpx.get(f"{prometheus}/api/v1/alerts").json()["data"]["alerts"]
            return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

        wanted = {
            f'up{{job="imageclf", instance="{target}"}}': 1.0,
            'sum(imageclf_predictions_total{job="imageclf"})': 3.0,
            'imageclf_model_ready{job="imageclf"}': 1.0,
            'imageclf_drift_detected{job="imageclf"}': 1.0,
            'imageclf_drift_tests_drifted{job="imageclf"}': 2.0,
            'imageclf_drift_window_size{job="imageclf"}': 150.0,
        }
        seen: dict[str, float | None] = {}

        def arrived() -> bool:
            seen.update({query: value(query) for query in wanted})
            if not all(seen[q] is not None and seen[q] >= v for q, v in wanted.items()):
                return False
            groups = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]
            evaluated = all(r["health"] == "ok" for g in groups for r in g["rules"])
            return evaluated and "ImageclfDriftDetected" in firing()

        for _ in range(240):  # Prometheus scrapes every 0.5 s; the service polls the verdict
            if arrived():
                break
            time.sleep(0.25)
        assert seen.pop('sum(imageclf_predictions_total{job="imageclf"})') >= 3, seen
        wanted.pop('sum(imageclf_predictions_total{job="imageclf"})')
        # (earlier tests' predictions count as well: at least 3)
        home = champion_project.root / f"bentoml-{target.rsplit(':', 1)[1]}"
        readiness = worker_readiness(home / "prometheus_multiproc_dir")
        assert seen == wanted, (
            f"readiness per worker {{pid: (value, alive)}}: {readiness}\n"
            f"server log:\n{output(server_proc)}"
        )
        assert [value for value, alive in readiness.values() if alive] == [1.0, 1.0], readiness
        assert "ImageclfDriftDetected" in firing()
        last_check = value('imageclf_drift_last_check_timestamp_seconds{job="imageclf"}')
        assert last_check == pytest.approx(verdict.stat().st_mtime, abs=1e-3)
        assert not firing() & {
            "ImageclfDown",
            "ImageclfNotReady",
            "ImageclfDriftCheckStale",
        }

        groups = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert {rule["name"] for rule in rules} == set(alert_exprs())
        assert all(rule["health"] == "ok" for rule in rules), rules  # each one evaluated

        exposed = exposed_names(httpx.get(f"{server}/metrics").text) | SCRAPE_SERIES
        for source, exprs in (
            ("alerts.yml", alert_exprs().values()),
            ("dashboard", dashboard_exprs()),
        ):
            for expr in exprs:
                assert metric_names(expr) <= exposed, (
                    source,
                    expr,
                    metric_names(expr) - exposed,
                )
        page = httpx.get(f"{server}/metrics").text
        # The latency budgets sit on bucket bounds, so the alerts compare exact quantiles.
        assert 'bentoml_service_request_duration_seconds_bucket{endpoint="/classify"' in page
        assert (
            'le="0.05"' in page and 'imageclf_inference_latency_seconds_bucket{le="0.01"}' in page
        )
    finally:
        stop(proc)
        verdict.unlink(missing_ok=True)

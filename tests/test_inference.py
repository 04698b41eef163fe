"""imageclf/deploy/inference.py: upload decoding and its limits, the ONNX classifier, adaptive
batching."""

from __future__ import annotations

import asyncio
import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.serving import phone_photo, small_photo
from imageclf.config import load_params
from imageclf.deploy.export import export_onnx
from imageclf.deploy.inference import (
    AdaptiveBatcher,
    InputError,
    OnnxClassifier,
    classify_files,
    decode_image,
    encode_png,
    load_examples,
    pick_examples,
    read_image_file,
    save_examples,
)
from imageclf.models.zoo import ServingGraph, build_model
from monitoring.drift import Thresholds, detect
from monitoring.features import pixel_features
from monitoring.prediction_log import PredictionLog
from monitoring.reference import build_reference
from tests.conftest import REPO, synthetic_split

DEFAULTS = load_params(REPO / "params.yaml")

LIMITS = load_params(REPO / "params.yaml").serving.model_copy(
    update={"max_request_bytes": 50_000, "max_image_pixels": 1_000_000}
)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def tiny_classifier(path: Path, channels: int, serving_graph: bool) -> OnnxClassifier:
    """A 4-class 12x12 model exported with the metadata the service reads; ``serving_graph``:
    as the export stage writes it (logits and the embedding), else the bare model."""
    torch.manual_seed(0)
    model = build_model("resnet_small", 4, channels, 4).eval()
    export_onnx(
        ServingGraph(model, views=1) if serving_graph else model,
        path,
        (channels, 12, 12),
        metadata={
            "classes": '["a", "b", "c", "d"]',
            "input": f'{{"height": 12, "width": 12, "channels": {channels}}}',
        },
    )
    return OnnxClassifier(path)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> OnnxClassifier:
    return tiny_classifier(tmp_path_factory.mktemp("onnx") / "m.onnx", 1, serving_graph=False)


def test_decode_any_mode_to_model_shape():
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 128))
    out = decode_image(encode(rgba), LIMITS, 12, 1)
    assert out.shape == (12, 12, 1) and out.dtype == np.uint8
    assert decode_image(encode(rgba.convert("RGB"), "JPEG"), LIMITS, 12, 3).shape == (12, 12, 3)


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"", 400, "empty"),
        (b"plain text, not an image", 415, "not an image"),
        (b"\0" * 60_000, 413, "byte limit"),
        (
            encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)))[
                :800
            ],
            400,
            "truncated",
        ),
        (encode(Image.new("1", (2000, 2000))), 413, "pixel limit"),
    ],
)
def test_bad_uploads_are_client_errors(data, status, words):
    with pytest.raises(InputError, match=words) as err:
        decode_image(data, LIMITS, 12, 1)
    assert err.value.status == status


def test_probabilities_and_top_k(classifier):
    images = synthetic_split(3).images
    probs = classifier.probabilities(images)
    assert probs.shape == (12, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    top = classifier.top_k(probs[:2], 2)
    assert [len(t) for t in top] == [2, 2]
    assert top[0][0]["probability"] >= top[0][1]["probability"]
    assert top[0][0]["label"] in "abcd"


def test_batcher_shares_model_calls_and_returns_each_its_own(classifier):
    images = synthetic_split(5).images  # 20 images
    expected = classifier.probabilities(images)

    def fn(batch: np.ndarray) -> tuple[np.ndarray | None, ...]:
        probs, _ = classifier.predict(batch)
        return probs, None, batch.reshape(len(batch), -1).mean(1)  # any per-image outputs

    batcher = AdaptiveBatcher(fn, max_batch_size=64, max_latency_ms=0, max_queue_images=20)
    chunks = [(i, i + 1) for i in range(10)] + [(10, 13), (13, 20)]  # 1 to 7 images each

    async def many() -> list[tuple[np.ndarray | None, ...]]:
        return await asyncio.gather(*(batcher.submit(images[a:b]) for a, b in chunks))

    results = asyncio.run(many())
    for (a, b), (probs, nothing, means) in zip(chunks, results, strict=True):
        np.testing.assert_allclose(probs, expected[a:b], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(means, images[a:b].reshape(b - a, -1).mean(1))
        assert nothing is None
    assert batcher.images == 20 and batcher.batches < len(chunks)


def test_classify_files_reports_unreadable_files(classifier, tmp_path: Path):
    good = tmp_path / "good.png"
    good.write_bytes(encode(Image.new("L", (12, 12), 200)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    rows = classify_files(classifier, [good, bad], LIMITS, top_k=2)
    assert rows[0]["error"] == "" and rows[0]["label_1"] in "abcd" and "label_2" in rows[0]
    assert "not an image" in rows[1]["error"]


def test_classify_files_reads_only_regular_files_and_never_past_the_limit(
    classifier, tmp_path: Path
):
    """A .png that is a link to /dev/zero (endless), a FIFO (blocks forever), a folder, or a
    file over serving.max_request_bytes: each gets its reason in its row, at once, without
    being read (the FIFO has no writer: reading it would hang the run)."""
    good = tmp_path / "good.png"
    good.write_bytes(encode(Image.new("L", (12, 12), 200)))
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(LIMITS.max_request_bytes + 1)
    rows = classify_files(classifier, sorted(tmp_path.iterdir()), LIMITS, top_k=1)
    errors = {Path(r["file"]).name: r["error"] for r in rows}
    assert errors["good.png"] == ""
    for name in ("zero.png", "pipe.png", "folder.png"):
        assert "is not a regular file" in errors[name], errors
    assert f"over the {LIMITS.max_request_bytes}-byte limit" in errors["big.png"]
    with pytest.raises(InputError) as caught:
        read_image_file(good, 10)
    assert caught.value.status == 413


def test_batch_predict_writes_names_that_look_like_formulas_as_text(
    classifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A file or folder name such as ``=HYPERLINK(...)`` reaches the CSV as text, not as a
    formula a spreadsheet would run (OWASP's CSV injection)."""
    from services import batch_predict

    folder = tmp_path / "=HYPERLINK(evil)"
    folder.mkdir()
    (folder / "+1.png").write_bytes(encode(Image.new("L", (12, 12), 9)))
    (folder / "@x.png").write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    monkeypatch.chdir(tmp_path)  # a relative folder: the file column starts with "="
    code = batch_predict.main(
        ["=HYPERLINK(evil)", "--out", str(out), "--onnx", str(classifier.path)]
    )
    assert code == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == [
        "'=HYPERLINK(evil)/+1.png",
        "'=HYPERLINK(evil)/@x.png",
    ]
    assert all(not str(v).startswith(batch_predict.FORMULA_START) for r in rows for v in r.values())
    assert batch_predict.csv_safe("-2+3") == "'-2+3" and batch_predict.csv_safe(0.5) == 0.5


def test_phone_photos_pass_the_default_limits_and_decode_to_the_model_size():
    """A 12-megapixel phone JPEG of several MB is normal input, not an abuse of the limits."""
    photo = phone_photo()
    assert 3_000_000 < len(photo) <= DEFAULTS.serving.max_request_bytes
    with Image.open(io.BytesIO(photo)) as opened:
        assert opened.width * opened.height >= 11_900_000
        assert opened.width * opened.height <= DEFAULTS.serving.max_image_pixels
    out = decode_image(photo, DEFAULTS.serving, 224, 3)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # The same picture as the small photo made from the same cat (both centre-cropped): the
    # reduced-scale decoding of the big one changes pixels, never what the image shows.
    small = decode_image(small_photo(), DEFAULTS.serving, 224, 3)
    assert np.abs(out.astype(np.int16) - small.astype(np.int16)).mean() < 12
    assert 30_000 <= len(small_photo()) <= 60_000  # the benchmark's photo-sized case


@pytest.fixture(scope="module")
def rgb_classifier(tmp_path_factory: pytest.TempPathFactory) -> OnnxClassifier:
    """An RGB model exported as the export stage does: logits and the embedding."""
    return tiny_classifier(tmp_path_factory.mktemp("rgb") / "rgb.onnx", 3, serving_graph=True)


def test_monitoring_keeps_reference_and_embeddings_for_rgb_models(rgb_classifier, tmp_path):
    """The service's monitoring path with 3-channel inputs: reference, logged rows (summaries,
    embeddings, the image itself) and the drift verdict all work as for grayscale."""
    model = rgb_classifier
    train = synthetic_split(60, size=12, channels=3, seed=3)
    reference = build_reference(model, train, 200, seed=0)
    dim = reference["embeddings"].shape[1]
    assert reference["pixels"].shape == (200, 7) and reference["embeddings"].shape == (200, dim)

    def served_window(images: np.ndarray) -> dict:
        """Upload each image as a PNG, decode it as the service does, log it, read it back."""
        log = PredictionLog(tmp_path / f"log-{len(list(tmp_path.iterdir()))}.sqlite")
        batch = np.stack([decode_image(encode(Image.fromarray(i)), LIMITS, 12, 3) for i in images])
        probs, embeddings = model.predict(batch)
        pixels = pixel_features(batch)
        log.append(
            [
                PredictionLog.row(
                    0.0, "1", int(p.argmax()), "a", float(p.max()), 1.0, px, e, encode_png(img)
                )
                for p, px, e, img in zip(probs, pixels, embeddings, batch, strict=True)
            ]
        )
        window = log.read_window()
        assert window["embeddings"].shape == (len(images), dim)
        logged = np.asarray(Image.open(io.BytesIO(window["images"][0])))
        np.testing.assert_array_equal(logged, batch[0])  # RGB, not flattened to gray
        return window

    same = served_window(synthetic_split(30, size=12, channels=3, seed=4).images)
    thresholds = Thresholds.from_params(DEFAULTS.monitoring.model_copy(update={"min_window": 100}))
    assert not detect(reference, same, thresholds).drift
    # Colour-shifted inputs (a red cast): the summaries and embeddings see it.
    shifted = synthetic_split(30, size=12, channels=3, seed=4).images.copy()
    shifted[..., 0] = 255
    verdict = detect(reference, served_window(shifted), thresholds)
    assert verdict.drift and verdict.reasons


def test_examples_spread_over_classes_and_round_trip(tmp_path):
    labels = np.repeat(np.arange(4), [10, 1, 5, 5])
    picked = pick_examples(labels, 6, seed=0)
    assert sorted(labels[picked[:4]].tolist()) == [0, 1, 2, 3]  # each class once first
    assert len(picked) == 6 and len(set(picked.tolist())) == 6
    assert len(pick_examples(labels, 100, seed=0)) == len(labels)
    images = synthetic_split(2, size=12, channels=3).images[:6]
    save_examples(tmp_path / "examples.npz", images, labels[picked], ["a", "b", "c", "d"])
    loaded = load_examples(tmp_path / "examples.npz")
    assert [e.label for e in loaded] == ["abcd"[k] for k in labels[picked]]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(loaded[2].png))), images[2])

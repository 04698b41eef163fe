"""Serving library: upload decoding and its limits, the ONNX classifier, adaptive batching."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imageclf.config import load_params
from imageclf.export import export_onnx
from imageclf.models import build_model
from imageclf.serving import (
    AdaptiveBatcher,
    InputError,
    OnnxClassifier,
    classify_files,
    decode_image,
)
from tests.conftest import REPO, synthetic_split

LIMITS = load_params(REPO / "params.yaml").serving.model_copy(
    update={"max_request_bytes": 50_000, "max_image_pixels": 1_000_000}
)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> OnnxClassifier:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_onnx(
        build_model("resnet_small", 4, 1, 4).eval(),
        path,
        (1, 12, 12),
        metadata={
            "classes": '["a", "b", "c", "d"]',
            "input": '{"height": 12, "width": 12, "channels": 1}',
        },
    )
    return OnnxClassifier(path)


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

    batcher = AdaptiveBatcher(fn, max_batch_size=64, max_latency_ms=0)
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

"""Drift detection on real Fashion-MNIST images: quiet on held-out data, loud on shifted data."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from imageclf.config import load_params
from imageclf.data import fashion_mnist as fm
from monitoring.drift import Thresholds, detect, pixel_features, psi
from tests.conftest import FASHION_MNIST_DIR, REPO

pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="needs dataset-fashion-mnist"
)
RNG = np.random.default_rng(0)
PROJECTION = RNG.normal(size=(784, 16)).astype(np.float32) / 28  # stand-in embedding
THRESHOLDS = Thresholds.from_params(load_params(REPO / "params.yaml").monitoring)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fm")
    fm.fetch(folder, [str(FASHION_MNIST_DIR)])
    train, train_labels = fm.load_split(folder, "train")
    test, test_labels = fm.load_split(folder, "test")
    return train[:3000], train_labels[:3000], test, test_labels


def summarize(images: np.ndarray, labels: np.ndarray, confidence: float = 0.9) -> dict:
    flat = images.reshape(len(images), -1).astype(np.float32) / 255
    return {
        "pixels": pixel_features(images),
        "embeddings": flat @ PROJECTION,
        "predicted": labels,
        "confidence": np.full(len(labels), confidence),
    }


def test_held_out_windows_rarely_alarm(data):
    _, _, test, labels = data
    train, train_labels = data[0], data[1]
    reference = summarize(train, train_labels)
    alarms = 0
    for w in range(20):
        idx = np.random.default_rng(w).choice(len(test), 300, replace=False)
        alarms += detect(reference, summarize(test[idx], labels[idx]), THRESHOLDS, seed=w).drift
    assert alarms <= 1  # at most 5% of windows


@pytest.mark.parametrize(
    "shift",
    [
        lambda x: np.clip(x.astype(int) + 60, 0, 255).astype(np.uint8),  # brighter
        lambda x: 255 - x,  # inverted
        lambda x: np.rot90(x, 1, axes=(1, 2)).copy(),  # rotated
    ],
    ids=["brightness", "inversion", "rotation"],
)
def test_shifted_windows_alarm(data, shift):
    train, train_labels, test, labels = data
    reference = summarize(train, train_labels)
    verdict = detect(reference, summarize(shift(test[:300]), labels[:300]), THRESHOLDS)
    assert verdict.drift and verdict.reasons


def test_prediction_and_confidence_drift(data):
    train, train_labels, test, _ = data
    reference = summarize(train, train_labels)
    window = summarize(test[:300], np.zeros(300, dtype=np.int64), confidence=0.6)
    verdict = detect(reference, window, THRESHOLDS)
    assert verdict.tests["predictions.class_shift"]["drift"]
    assert verdict.tests["confidence"]["drift"]


def test_small_window_gives_no_verdict(data):
    train, train_labels, test, labels = data
    verdict = detect(
        summarize(train, train_labels),
        summarize(test[:10], labels[:10]),
        replace(THRESHOLDS, min_window=100),
    )
    assert not verdict.drift and "below" in verdict.reasons[0]


def test_psi_is_zero_for_same_and_large_for_shifted():
    x = np.random.default_rng(0).normal(size=5000)
    assert psi(x, x) < 0.01
    assert psi(x, x + 1.0) > 0.25


def test_verdict_through_the_real_log_format(data, tmp_path):
    """Windows written to and read back from the service's prediction log give the same verdicts."""
    from monitoring.prediction_log import PredictionLog

    train, train_labels, test, labels = data
    reference = summarize(train, train_labels)
    for name, images in (("held-out", test[:300]), ("inverted", 255 - test[300:600])):
        log = PredictionLog(tmp_path / f"{name}.sqlite")
        summary = summarize(images, labels[:300])
        log.append(
            [
                PredictionLog.row(
                    i,
                    "1",
                    summary["predicted"][i],
                    "x",
                    0.9,
                    1.0,
                    summary["pixels"][i],
                    summary["embeddings"][i],
                )
                for i in range(300)
            ]
        )
        window = log.read_window()
        verdict = detect(reference, window, THRESHOLDS)
        assert verdict.drift == (name == "inverted"), verdict.reasons

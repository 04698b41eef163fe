"""The prediction log: one SQLite row per prediction the service makes, kept across restarts.

Each row holds when, which model version, the predicted class and its probability, the latency,
and a compact summary of the input (pixel statistics and the model's penultimate-layer
embedding as float16); the image itself (model-sized PNG) only with monitoring.log_images on.
SQLite in WAL mode lets several service workers append while the monitoring flow reads;
``max_rows`` bounds the file (oldest rows go first).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    model_version TEXT NOT NULL,
    predicted INTEGER NOT NULL,
    label TEXT NOT NULL,
    confidence REAL NOT NULL,
    latency_ms REAL NOT NULL,
    pixels TEXT NOT NULL,
    embedding BLOB,
    image BLOB
);
CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts);
"""
COLUMNS = (
    "ts",
    "model_version",
    "predicted",
    "label",
    "confidence",
    "latency_ms",
    "pixels",
    "embedding",
    "image",
)


class PredictionLog:
    """Append and read prediction rows in one SQLite file."""

    def __init__(self, path: Path, max_rows: int = 1_000_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self._db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        existing = {row[1] for row in self._db.execute("PRAGMA table_info(predictions)")}
        if "image" not in existing:  # a log written before images could be switched on
            self._db.execute("ALTER TABLE predictions ADD COLUMN image BLOB")
        self._lock = threading.Lock()

    @staticmethod
    def row(
        ts: float,
        model_version: str,
        predicted: int,
        label: str,
        confidence: float,
        latency_ms: float,
        pixels: np.ndarray,
        embedding: np.ndarray | None,
        image: bytes | None = None,
    ) -> tuple:
        """One log row; ``image`` (the model-sized input as PNG) only when switched on."""
        return (
            ts,
            model_version,
            int(predicted),
            label,
            float(confidence),
            float(latency_ms),
            json.dumps([round(float(v), 5) for v in pixels]),
            None if embedding is None else np.asarray(embedding, "<f2").tobytes(),
            image,
        )

    def append(self, rows: list[tuple]) -> None:
        """Insert ``rows`` in one transaction and drop the oldest beyond ``max_rows``.

        Ids only grow and only the oldest rows are ever deleted, so the rows span the id range
        [min, max]: the bound costs two index lookups, not a COUNT(*) scan of the table (which
        took milliseconds per write at a million rows)."""
        with self._lock, self._db:
            self._db.executemany(
                f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES "
                f"({', '.join('?' * len(COLUMNS))})",
                rows,
            )
            newest = self._db.execute("SELECT MAX(id) FROM predictions").fetchone()[0]
            oldest = self._db.execute("SELECT MIN(id) FROM predictions").fetchone()[0]
            if newest - oldest + 1 > self.max_rows:
                self._db.execute("DELETE FROM predictions WHERE id <= ?", (newest - self.max_rows,))

    def read_window(self, last: int | None = None, since: float | None = None) -> dict[str, Any]:
        """The most recent ``last`` rows (or all since ``since``), oldest first, as arrays."""
        query = f"SELECT {', '.join(COLUMNS)} FROM predictions"
        args: list[Any] = []
        if since is not None:
            query += " WHERE ts >= ?"
            args.append(since)
        query += " ORDER BY id DESC"
        if last is not None:
            query += " LIMIT ?"
            args.append(last)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()[::-1]
        embeddings = [np.frombuffer(r[7], "<f2").astype(np.float32) for r in rows if r[7]]
        return {
            "ts": np.array([r[0] for r in rows], dtype=np.float64),
            "model_version": [r[1] for r in rows],
            "predicted": np.array([r[2] for r in rows], dtype=np.int64),
            "label": [r[3] for r in rows],
            "confidence": np.array([r[4] for r in rows], dtype=np.float32),
            "latency_ms": np.array([r[5] for r in rows], dtype=np.float32),
            "pixels": np.array([json.loads(r[6]) for r in rows], dtype=np.float32).reshape(
                len(rows), -1
            )
            if rows
            else np.zeros((0, 0), np.float32),  # an empty log (or window) is not an error
            "embeddings": np.stack(embeddings)
            if len(embeddings) == len(rows) and rows
            else np.zeros((len(rows), 0), np.float32),
            "images": [r[8] for r in rows],
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()


class BackgroundWriter:
    """Hand rows over from the request path; a thread writes them in batches, so requests never
    wait on the disk. A full backlog drops rows and counts them rather than slowing the service.

    ``put`` is a lock-free ``deque.append`` of a thunk: building the rows (JSON, float16
    embeddings) runs on the writer thread too, and nothing wakes that thread per request: it
    sleeps ``flush_every_s`` and writes what gathered. A ``queue.Queue`` here, with its
    condition variable signalled on every put, cost ~4% of a worker's event loop under load."""

    def __init__(
        self, prediction_log: PredictionLog, max_backlog: int = 100_000, flush_every_s: float = 0.25
    ) -> None:
        self.log = prediction_log
        self.dropped = 0
        self._pending: deque[Callable[[], list[tuple]]] = deque()
        self._max_backlog = max_backlog
        self._flush_every = flush_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def put(self, rows: Callable[[], list[tuple]]) -> None:
        """Queue ``rows()`` for writing (called on the writer thread, so keep it pure)."""
        if len(self._pending) >= self._max_backlog:
            self.dropped += 1
            return
        self._pending.append(rows)

    def _drain(self) -> None:
        batch: list[tuple] = []
        while self._pending:
            try:
                batch.extend(self._pending.popleft()())
            except Exception as exc:  # a bad row loses itself, not the log
                log.warning("prediction log row failed: %s", exc)
        if batch:
            try:
                self.log.append(batch)
            except sqlite3.Error as exc:  # never take the service down for its log
                log.warning("prediction log write failed (%d rows): %s", len(batch), exc)

    def _run(self) -> None:
        while not self._stop.wait(self._flush_every):
            self._drain()
        self._drain()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop."""
        self._stop.set()
        self._thread.join(timeout)

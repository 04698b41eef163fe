"""The prediction log: rows survive reopening, the file stays bounded, writes happen off-thread."""

from __future__ import annotations

import threading

import numpy as np

from monitoring.prediction_log import BackgroundWriter, PredictionLog


def rows(n: int, start: float = 0.0) -> list[tuple]:
    rng = np.random.default_rng(0)
    return [
        PredictionLog.row(
            start + i, "3", i % 10, f"c{i % 10}", 0.9, 1.5, rng.random(7), rng.random(16)
        )
        for i in range(n)
    ]


def test_rows_round_trip_and_survive_reopening(tmp_path):
    path = tmp_path / "logs" / "p.sqlite"
    log = PredictionLog(path)
    log.append(rows(50))
    log.close()
    window = PredictionLog(path).read_window(last=20)
    assert len(window["predicted"]) == 20
    assert window["ts"][0] == 30 and window["ts"][-1] == 49  # the most recent, oldest first
    assert window["pixels"].shape == (20, 7) and window["embeddings"].shape == (20, 16)
    assert window["model_version"][0] == "3" and window["label"][1] == "c1"
    assert len(PredictionLog(path).read_window(since=45)["ts"]) == 5


def test_oldest_rows_go_when_full(tmp_path):
    log = PredictionLog(tmp_path / "p.sqlite", max_rows=1000)
    log.append(rows(1200))
    window = log.read_window()
    assert len(window["ts"]) == 1000 and window["ts"][0] == 200


def test_background_writer_writes_everything_it_was_given(tmp_path):
    log = PredictionLog(tmp_path / "p.sqlite")
    writes = []
    append = log.append
    log.append = lambda batch: (writes.append(len(batch)), append(batch))  # type: ignore[method-assign]
    writer = BackgroundWriter(log, flush_every_s=0.2)
    caller = threading.get_ident()
    built_on = set()

    def chunk(i: int):
        built_on.add(threading.get_ident())
        return rows(30, start=i * 30)

    for i in range(10):
        writer.put(lambda i=i: chunk(i))
    writer.close()
    assert len(log.read_window()["ts"]) == 300 and writer.dropped == 0
    assert caller not in built_on  # the rows were built on the writer thread
    assert len(writes) <= 2  # gathered into few transactions, not one per put


def test_background_writer_drops_beyond_its_backlog_and_survives_bad_rows(tmp_path):
    log = PredictionLog(tmp_path / "p.sqlite")
    writer = BackgroundWriter(log, max_backlog=3, flush_every_s=60)
    writer.put(lambda: 1 / 0)  # type: ignore[arg-type, return-value]
    for i in range(4):
        writer.put(lambda i=i: rows(1, start=i))
    writer.close()
    assert writer.dropped == 2 and len(log.read_window()["ts"]) == 2


def test_trimming_keeps_the_newest_rows_across_many_appends(tmp_path):
    log = PredictionLog(tmp_path / "p.sqlite", max_rows=1000)
    for i in range(12):
        log.append(rows(250, start=i * 250))
    window = log.read_window()
    assert len(window["ts"]) == 1000 and window["ts"][0] == 2000 and window["ts"][-1] == 2999


def test_images_are_kept_only_when_given_and_old_logs_are_upgraded(tmp_path):
    import sqlite3

    path = tmp_path / "p.sqlite"
    old = sqlite3.connect(path)  # a log from before the image column existed
    old.execute(
        "CREATE TABLE predictions (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,"
        " model_version TEXT NOT NULL, predicted INTEGER NOT NULL, label TEXT NOT NULL,"
        " confidence REAL NOT NULL, latency_ms REAL NOT NULL, pixels TEXT NOT NULL,"
        " embedding BLOB)"
    )
    old.commit()
    old.close()
    log = PredictionLog(path)
    base = rows(2)
    log.append([base[0], (*base[1][:-1], b"\x89PNG fake")])
    assert log.read_window()["images"] == [None, b"\x89PNG fake"]


def test_an_empty_log_reads_as_an_empty_window(tmp_path):
    window = PredictionLog(tmp_path / "p.sqlite").read_window(last=10)
    assert len(window["ts"]) == 0 and window["pixels"].shape[0] == 0

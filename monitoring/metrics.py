"""The service's own Prometheus gauges: is a model served, and what did the last drift check say.

The monitoring flow judges drift offline and writes its verdict to a JSON file
(``ProjectPaths.monitoring_verdict``, by :func:`monitoring.report.run_monitoring`); alerting
needs it where the other signals are, on the service's ``/metrics``. The service's background
poll loop calls :func:`refresh_drift_metrics` with that path, so the verdict reaches Prometheus
within one poll interval of being written.

``bentoml serve`` runs several worker processes with ``prometheus_client`` in multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by BentoML before it imports the service, and so before this
module): each worker writes its own file and ``/metrics`` merges them. A gauge's
``multiprocess_mode`` says how: left at the default (``all``) every gauge would come out once
per worker with a ``pid`` label, and an alert on ``imageclf_drift_detected == 1`` would fire
once per worker. The ``live`` modes drop the values of workers that have exited, but only once
someone deletes their files: BentoML does it when a worker exits cleanly, and
:func:`forget_exited_workers` does it for workers that were killed (an OOM kill, a crash while
loading the model), whose last word would otherwise count forever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from prometheus_client import Gauge, multiprocess

log = logging.getLogger(__name__)

# Every worker reads the same verdict file, so they agree except for up to one poll interval
# after it changes: the most recently set value (any live worker's) is the newest verdict.
DRIFT_DETECTED = Gauge(
    "imageclf_drift_detected",
    "1 if the monitoring flow's last verdict found drift, else 0 (also 0 before any verdict).",
    multiprocess_mode="livemostrecent",
)
DRIFT_TESTS_DRIFTED = Gauge(
    "imageclf_drift_tests_drifted",
    "How many of the last verdict's drift tests (pixel KS, embedding MMD, class mix, "
    "confidence) flagged drift.",
    multiprocess_mode="livemostrecent",
)
DRIFT_WINDOW_SIZE = Gauge(
    "imageclf_drift_window_size",
    "Predictions in the window the last verdict judged (below monitoring.min_window: no verdict).",
    multiprocess_mode="livemostrecent",
)
DRIFT_LAST_CHECK = Gauge(
    "imageclf_drift_last_check_timestamp_seconds",
    "Unix time the last drift verdict was written (0: none read yet).",
    multiprocess_mode="livemostrecent",
)
# Ready only if every live worker is: a request can land on any of them.
MODEL_READY = Gauge(
    "imageclf_model_ready",
    "1 if this service has a model loaded and answers /readyz with 200, else 0.",
    multiprocess_mode="livemin",
)


def set_model_ready(ready: bool) -> None:
    """Record this worker's readiness (what ``__is_ready__`` answers) for the NotReady alert:
    Prometheus cannot read ``/readyz`` itself, only metrics."""
    MODEL_READY.set(1 if ready else 0)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process under a reused pid: not ours to judge
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): a zombie is reaped soon and caught by the next beat
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def forget_exited_workers(directory: str | os.PathLike[str] | None = None) -> list[int]:
    """Delete the ``live*`` gauge files of processes that no longer run; the pids forgotten.

    A worker killed without a clean exit keeps its file, and ``livemin`` would read its last
    readiness forever: one worker that died while loading a model would hold
    ``imageclf_model_ready`` at 0, and the NotReady alert firing, after its replacement serves.
    Every file in the directory belongs to this server (BentoML empties it at start), so any
    worker may clean up after any other; the service calls this on every poll beat."""
    directory = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return []  # single-process mode: nothing is shared, nothing goes stale
    pids = set()
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit():
            pids.add(int(pid))
    gone = sorted(pid for pid in pids if not _alive(pid))
    for pid in gone:
        with contextlib.suppress(FileNotFoundError):  # another worker removed it first
            multiprocess.mark_process_dead(pid, str(directory))
    return gone


def _drifted_tests(tests: Any) -> int:
    if not isinstance(tests, dict):
        raise ValueError(f"'tests' is {type(tests).__name__}, expected an object")
    return sum(1 for t in tests.values() if isinstance(t, dict) and t.get("drift") is True)


def read_verdict(report_path: Path) -> tuple[bool, int, int, float]:
    """(drift, drifted tests, window size, written at) from the monitoring flow's verdict file.

    The file is replaced atomically (:func:`imageclf.io.write_json`) once per check, so its
    modification time is when that check finished. Raises ValueError, saying what is wrong,
    for a file that is not such a verdict."""
    text = report_path.read_text()
    written_at = report_path.stat().st_mtime
    try:
        verdict = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{report_path} is not JSON ({exc})") from exc
    if not isinstance(verdict, dict):
        raise ValueError(f"{report_path} holds a {type(verdict).__name__}, expected an object")
    drift, window = verdict.get("drift"), verdict.get("window_size")
    if not isinstance(drift, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(
            f"{report_path} lacks a boolean 'drift' and a count 'window_size' "
            f"(got {drift!r}, {window!r})"
        )
    try:
        drifted = _drifted_tests(verdict.get("tests", {}))
    except ValueError as exc:
        raise ValueError(f"{report_path}: {exc}") from exc
    return drift, drifted, window, written_at


def refresh_drift_metrics(report_path: Path | str) -> None:
    """Set the drift gauges from the verdict file at ``report_path``.

    Never raises for the file: the service must keep serving whatever the monitoring flow
    left behind. No file yet (the flow has not run) leaves the gauges as they are; an
    unreadable one is logged, with the reason and what to do, and leaves them as they are too,
    so ``imageclf_drift_last_check_timestamp_seconds`` stops advancing and the
    ImageclfDriftCheckStale alert says so."""
    path = Path(report_path)
    try:
        drift, drifted, window, written_at = read_verdict(path)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        log.warning(
            "drift verdict not read (%s): gauges keep their last values; rerun the monitoring "
            "flow (python -m pipelines.monitoring_flow) to write a new one",
            exc,
        )
        return
    DRIFT_DETECTED.set(1 if drift else 0)
    DRIFT_TESTS_DRIFTED.set(drifted)
    DRIFT_WINDOW_SIZE.set(window)
    DRIFT_LAST_CHECK.set(written_at)

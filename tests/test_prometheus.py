"""Prometheus: the scrape config, the alert rules and their unit tests (promtool), the Grafana
dashboard's queries, and the drift gauges the service exposes (monitoring/metrics.py).

A real Prometheus scraping a real `bentoml serve` is in tests/test_service.py (it shares that
module's served champion).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml
from prometheus_client import REGISTRY

from benchmarks.serving import TARGETS
from imageclf.config import load_params
from imageclf.io import write_json
from imageclf.paths import ProjectPaths
from monitoring.metrics import forget_exited_workers, refresh_drift_metrics, set_model_ready
from monitoring.prediction_log import PredictionLog
from monitoring.report import run_monitoring
from ops.prometheus.config import CONFIG, RULE_TESTS, RULES, render_config, write_config
from tests.conftest import REPO
from tests.prometheus_helpers import (
    NO_PROMTOOL,
    PROMTOOL,
    alert_exprs,
    check_exprs,
    dashboard_exprs,
    metric_names,
    promtool,
)

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
PARAMS = load_params(REPO / "params.yaml")


# ------------------------------------------------------------------------ promtool checks
@needs_promtool
def test_config_and_rules_are_valid():
    config = promtool("check", "config", CONFIG)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout + config.stderr
    rules = promtool("check", "rules", RULES)
    assert rules.returncode == 0, rules.stdout + rules.stderr


@needs_promtool
def test_alerts_fire_and_stay_quiet_on_synthetic_series():
    done = promtool("test", "rules", RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_a_broken_alert_fails_its_unit_test(tmp_path):
    """The unit tests can fail: the p99 budget moved to 100 ms, the 90 ms p99 no longer fires."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "ImageclfLatencyP99High":
                assert rule["expr"].rstrip().endswith("> 0.05")
                rule["expr"] = rule["expr"].rstrip().removesuffix("> 0.05") + "> 0.1"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(rules))
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    done = promtool("test", "rules", tmp_path / RULE_TESTS.name)
    assert done.returncode != 0 and "ImageclfLatencyP99High" in done.stdout + done.stderr


def test_every_alert_is_unit_tested_firing_and_quiet():
    tests = yaml.safe_load(RULE_TESTS.read_text())
    cases = [case for test in tests["tests"] for case in test["alert_rule_test"]]
    for alert in alert_exprs():
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in mine), f"{alert} never fires in a test"
        assert any(not case["exp_alerts"] for case in mine), f"{alert} is never quiet in a test"


def threshold(alert: str) -> float:
    """The number an alert's expression compares against (its last `> N`)."""
    return float(re.findall(r">\s*([0-9.]+)\s*$", alert_exprs()[alert].strip())[-1])


def test_thresholds_are_the_projects_targets():
    """The rules restate targets kept elsewhere: they must agree (alerts.yml says where)."""
    assert threshold("ImageclfLatencyP99High") == TARGETS["test"][1] / 1000
    assert threshold("ImageclfModelSlow") == PARAMS.registry.max_latency_ms / 1000
    assert threshold("ImageclfDriftCheckStale") == 3 * PARAMS.monitoring.check_every_minutes * 60


@needs_promtool
def test_generated_config_differs_only_in_target_and_intervals(tmp_path):
    path = write_config(tmp_path, "127.0.0.1:4321", interval_s=0.5)
    generated, original = yaml.safe_load(path.read_text()), yaml.safe_load(CONFIG.read_text())
    assert generated["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:4321"]}]
    assert generated["global"] == {"scrape_interval": "500ms", "evaluation_interval": "500ms"}
    for config in (generated, original):
        config.pop("global")
        config["scrape_configs"][0].pop("static_configs")
    assert generated == original
    assert (tmp_path / RULES.name).read_text() == RULES.read_text()
    done = promtool("check", "config", path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_generated_config_refuses_a_url_as_target():
    with pytest.raises(ValueError, match="host:port"):
        render_config("http://127.0.0.1:3000/metrics")


# -------------------------------------------------------------------- the dashboard
@needs_promtool
def test_every_dashboard_query_parses(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    done = check_exprs(exprs, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = check_exprs([*exprs, "sum(rate(imageclf_predictions_total[5m])"], tmp_path)
    assert broken.returncode != 0  # the check can fail


def test_dashboard_covers_what_an_operator_looks_at():
    names = set().union(*map(metric_names, dashboard_exprs()))
    for wanted in (
        "bentoml_service_request_total",
        "bentoml_service_request_duration_seconds_bucket",
        "imageclf_inference_latency_seconds_bucket",
        "imageclf_predictions_total",
        "imageclf_drift_detected",
        "imageclf_model_ready",
        "up",
    ):
        assert wanted in names, wanted


def test_metric_names_are_read_out_of_promql():
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(x_bucket{job="a", le=~"0.1"}[5m])))'
        " / on(instance) group_left sum without (pid) (y_total offset 5m) > 1e-3"
        " and time() - z_seconds > 3"
    )
    assert metric_names(expr) == {"x_bucket", "y_total", "z_seconds"}


# ------------------------------------------------------------------ the drift gauges
def sample(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


@pytest.mark.slow  # run_monitoring: an MLflow store is created, plots are drawn (~5-10 s)
def test_refresh_sets_the_gauges_from_the_monitoring_flows_verdict(project):
    """The verdict file written by monitoring.report.run_monitoring itself (synthetic summaries
    in the prediction log and reference, no model needed): drift; then a verdict of none."""
    paths: ProjectPaths = project
    params = load_params(paths.params)
    rng = np.random.default_rng(0)

    def summaries(n: int, shift: float) -> dict[str, np.ndarray]:
        return {
            "pixels": np.clip(rng.normal(0.4 + shift, 0.1, (n, 7)), 0, 1).astype(np.float32),
            "embeddings": rng.normal(shift * 10, 1, (n, 16)).astype(np.float32),
            "predicted": rng.integers(0, 4, n),
            "confidence": rng.uniform(0.8 - shift, 1.0 - shift, n).astype(np.float32),
        }

    paths.reference.parent.mkdir(parents=True, exist_ok=True)
    np.savez(paths.reference, **summaries(1000, 0.0))

    # A shifted window, logged as the service logs it.
    window = summaries(params.monitoring.min_window, shift=0.3)
    log = PredictionLog(paths.resolve(params.monitoring.log_path))
    log.append(
        [
            PredictionLog.row(time.time(), "1", int(k), "abcd"[int(k)], float(c), 1.0, px, e)
            for k, c, px, e in zip(
                window["predicted"],
                window["confidence"],
                window["pixels"],
                window["embeddings"],
                strict=True,
            )
        ]
    )
    log.close()
    result = run_monitoring(paths, params, last=params.monitoring.min_window)
    assert result["drift"]
    refresh_drift_metrics(paths.monitoring_verdict)
    assert sample("imageclf_drift_detected") == 1
    flagged = sum(1 for t in result["tests"].values() if isinstance(t, dict) and t["drift"])
    assert sample("imageclf_drift_tests_drifted") == flagged >= 2
    assert sample("imageclf_drift_window_size") == params.monitoring.min_window
    assert sample("imageclf_drift_last_check_timestamp_seconds") == pytest.approx(
        paths.monitoring_verdict.stat().st_mtime
    )

    # The next verdict finds none (written as run_monitoring writes it): back to 0.
    write_json(paths.monitoring_verdict, {**result, "drift": False, "reasons": [], "tests": {}})
    refresh_drift_metrics(str(paths.monitoring_verdict))
    assert sample("imageclf_drift_detected") == 0
    assert sample("imageclf_drift_tests_drifted") == 0


@pytest.mark.parametrize(
    "content",
    ["{not json", "[1, 2]", '{"drift": "yes", "window_size": 5}', '{"drift": true}'],
    ids=["not-json", "not-an-object", "drift-not-bool", "no-window"],
)
def test_a_bad_verdict_file_keeps_the_last_values_and_says_why(tmp_path, caplog, content):
    good = tmp_path / "verdict.json"
    write_json(good, {"drift": True, "window_size": 321, "reasons": ["x"], "tests": {}})
    refresh_drift_metrics(good)
    before = {
        name: sample(name)
        for name in (
            "imageclf_drift_detected",
            "imageclf_drift_window_size",
            "imageclf_drift_last_check_timestamp_seconds",
        )
    }
    assert before["imageclf_drift_window_size"] == 321
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    os.utime(bad, (time.time() + 100, time.time() + 100))
    with caplog.at_level("WARNING", logger="monitoring.metrics"):
        refresh_drift_metrics(bad)
    assert {name: sample(name) for name in before} == before
    assert "drift verdict not read" in caplog.text and str(bad) in caplog.text
    caplog.clear()
    refresh_drift_metrics(tmp_path / "missing.json")  # the flow has not run yet: no noise
    assert {name: sample(name) for name in before} == before and not caplog.text


def test_model_ready_gauge():
    set_model_ready(False)
    assert sample("imageclf_model_ready") == 0
    set_model_ready(True)
    assert sample("imageclf_model_ready") == 1


WORKER = textwrap.dedent(
    """
    import sys, time
    from monitoring.metrics import forget_exited_workers, refresh_drift_metrics, set_model_ready
    set_model_ready(sys.argv[1] == "ready")
    refresh_drift_metrics(sys.argv[2])
    """
)
COLLECT = textwrap.dedent(
    """
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    print(generate_latest(registry).decode())
    """
)


def test_workers_merge_into_one_series_per_gauge(tmp_path):
    """As under `bentoml serve` (PROMETHEUS_MULTIPROC_DIR, one file per worker): one series per
    gauge, no per-worker copies; ready only if every worker is; the newest verdict wins."""
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "PYTHONPATH": str(REPO),
    }
    (tmp_path / "prom").mkdir()
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    write_json(old, {"drift": False, "window_size": 100, "tests": {}})
    write_json(new, {"drift": True, "window_size": 200, "tests": {"a": {"drift": True}}})
    for readiness, verdict in (("ready", old), ("not-ready", old), ("ready", new)):
        subprocess.run([sys.executable, "-c", WORKER, readiness, str(verdict)], env=env, check=True)
    text = subprocess.run(
        [sys.executable, "-c", COLLECT], env=env, check=True, capture_output=True, text=True
    ).stdout
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("imageclf_")
    }
    assert samples == {
        "imageclf_model_ready": 0.0,
        "imageclf_drift_detected": 1.0,
        "imageclf_drift_tests_drifted": 1.0,
        "imageclf_drift_window_size": 200.0,
        "imageclf_drift_last_check_timestamp_seconds": pytest.approx(new.stat().st_mtime),
    }, text


def collected(env: dict[str, str]) -> dict[str, float]:
    """The imageclf samples a multiprocess collector merges from env's PROMETHEUS_MULTIPROC_DIR."""
    text = subprocess.run(
        [sys.executable, "-c", COLLECT], env=env, check=True, capture_output=True, text=True
    ).stdout
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("imageclf_")
    }


def test_a_killed_workers_readiness_is_forgotten(tmp_path):
    """A worker killed while it had no model (no clean exit, so BentoML never marked it dead)
    must not hold imageclf_model_ready at 0 once its replacement serves: the service's beat
    (forget_exited_workers) deletes the files of processes that are gone, and only those."""
    prom = tmp_path / "prom"
    prom.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom), "PYTHONPATH": str(REPO)}
    verdict = tmp_path / "verdict.json"
    write_json(verdict, {"drift": False, "window_size": 100, "tests": {}})
    serving = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WORKER + "print('set', flush=True); time.sleep(600)",
            "ready",
            str(verdict),
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert serving.stdout is not None and serving.stdout.readline() == "set\n"
        killed = subprocess.Popen(
            [sys.executable, "-c", WORKER + "import os; os._exit(9)", "not-ready", str(verdict)],
            env=env,
        )
        assert killed.wait(timeout=60) == 9
        assert collected(env)["imageclf_model_ready"] == 0  # the dead worker's 0 still counts
        assert forget_exited_workers(prom) == [killed.pid]
        samples = collected(env)
        assert samples["imageclf_model_ready"] == 1, samples
        assert samples["imageclf_drift_window_size"] == 100, samples  # the live one's gauges
        assert forget_exited_workers(prom) == []  # nothing more to forget
        assert {p.name for p in prom.glob("gauge_live*")} == {
            f"gauge_{mode}_{serving.pid}.db" for mode in ("livemin", "livemostrecent")
        }
    finally:
        serving.kill()
        serving.wait()
    assert forget_exited_workers(prom) == [serving.pid]
    assert forget_exited_workers(tmp_path / "empty") == []


def test_dashboard_is_valid_grafana_json():
    dashboard = json.loads((REPO / "ops" / "grafana" / "imageclf.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"

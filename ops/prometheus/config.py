"""A runnable Prometheus setup derived from ``prometheus.yml`` beside this file.

The checked-in config scrapes the service at its default address. Tests (and team mode) run
the same config against a service elsewhere: :func:`write_config` copies it with only the
scrape target (and, when asked, the scrape and rule intervals) replaced, and copies the rule
files it names beside it, so there is one definition of what is scraped and alerted on.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from imageclf.io import write_text

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "prometheus.yml"
RULES = HERE / "alerts.yml"
RULE_TESTS = HERE / "alerts_test.yml"
JOB = "imageclf"


def load_config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def render_config(target: str, interval_s: float | None = None) -> dict[str, Any]:
    """The checked-in config with the service job scraping ``target`` ("host:port")."""
    if ":" not in target or "/" in target:
        raise ValueError(f"target must be host:port (no scheme or path), got {target!r}")
    config = load_config()
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    if len(jobs) != 1:
        raise ValueError(f"{CONFIG} must hold exactly one scrape job named {JOB!r}")
    jobs[0]["static_configs"] = [{"targets": [target]}]
    if interval_s is not None:
        interval = f"{round(interval_s * 1000)}ms"
        config["global"]["scrape_interval"] = interval
        config["global"]["evaluation_interval"] = interval
    return config


def write_config(dest: Path, target: str, interval_s: float | None = None) -> Path:
    """Write the config for ``target`` into the folder ``dest``, with its rule files."""
    dest.mkdir(parents=True, exist_ok=True)
    config = render_config(target, interval_s)
    for rule_file in config.get("rule_files", []):
        shutil.copyfile(HERE / rule_file, dest / rule_file)
    return write_text(dest / CONFIG.name, yaml.safe_dump(config, sort_keys=False))

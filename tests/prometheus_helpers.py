"""PromQL read out of the alert rules and the Grafana dashboard, checked with promtool.

promtool has no "check this expression" command: expressions are checked by loading them as
recording rules into a temporary rules file (``promtool check rules`` parses every one).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from ops.prometheus.config import RULES
from tests.conftest import REPO

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
NO_PROMTOOL = "promtool not installed (Debian's prometheus package: make setup installs it)"
NO_PROMETHEUS = "prometheus not installed (Debian's prometheus package: make setup installs it)"
DASHBOARD = REPO / "ops" / "grafana" / "imageclf.json"

# What Grafana puts in place of its variables when it runs a panel's query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".+"}
# Series Prometheus makes itself for every target (not on the service's /metrics).
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS |= {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def alert_exprs(path: Path = RULES) -> dict[str, str]:
    """Each alert's name and expression."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL query of the dashboard (panels in rows included), variables filled in."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(path.read_text())["panels"])
    filled = []
    for expr in found:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        filled.append(expr)
    return filled


def check_exprs(exprs: list[str], folder: Path) -> subprocess.CompletedProcess:
    """``promtool check rules`` on ``exprs`` as recording rules: fails on any that won't parse."""
    rules = [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = folder / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    return promtool("check", "rules", path)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, labels, keywords or numbers)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
    expr = re.sub(grouping, " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(match.group())
    return names


def exposed_names(metrics_text: str) -> set[str]:
    """The metric names (with their _bucket/_count/_sum/_total suffixes) in a /metrics page."""
    return {
        line.split("{")[0].split(" ")[0]
        for line in metrics_text.splitlines()
        if line and not line.startswith("#")
    }


def worker_readiness(multiproc_dir: Path) -> dict[int, tuple[float, bool]]:
    """{pid: (imageclf_model_ready it last wrote, still alive)} for every process with a
    readiness file in a server's PROMETHEUS_MULTIPROC_DIR: what a failed readiness assertion
    needs to say which worker reported 0, and whether it is gone."""
    from prometheus_client.mmap_dict import MmapedDict

    readiness = {}
    for path in multiproc_dir.glob("gauge_livemin_*.db"):
        pid = int(path.stem.rsplit("_", 1)[-1])
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[0] == "imageclf_model_ready":
                readiness[pid] = (value, Path(f"/proc/{pid}").exists())
    return readiness

"""prefect.yaml, read: the one declaration of the project's deployments.

Both ways of running them read it: ``python -m pipelines.deployments_runner`` (one machine,
``.serve()``) and team mode's ``prefect deploy --all`` (ops/team.py). Light on purpose (no Prefect
import), so the team commands stay quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PREFECT_FILE = "prefect.yaml"
# The deployments' names in prefect.yaml (flow/deployment in the UI: imageclf-training/train).
TRAINING = "train"
MONITORING = "monitor"


def declared_deployments(root: Path) -> dict[str, dict[str, Any]]:
    """prefect.yaml's deployments by name."""
    path = root / PREFECT_FILE
    try:
        declared = yaml.safe_load(path.read_text())["deployments"]
        return {item["name"]: item for item in declared}
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise RuntimeError(f"{path} is missing or declares no deployments ({exc}).") from exc


def work_pool(root: Path) -> str:
    """The work pool of prefect.yaml's deployments (one pool serves them all)."""
    pools = {d["work_pool"]["name"] for d in declared_deployments(root).values()}
    if len(pools) != 1:
        raise RuntimeError(f"{root / PREFECT_FILE}: the deployments must share one work pool.")
    return pools.pop()

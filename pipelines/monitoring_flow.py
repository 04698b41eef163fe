"""The monitoring flow: compare the service's recent predictions with the training reference.

    python -m pipelines.monitoring_flow --last 500 [--retrain-on-drift]

Run by ``python -m pipelines.deployments_runner`` on a schedule
(``monitoring.check_every_minutes``). On drift it records a Prefect artifact with the verdict
and, when asked, starts the training flow.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from imageclf.config import load_params
from imageclf.paths import get_paths
from monitoring.report import run_monitoring


@task(name="check-drift", cache_policy=NO_CACHE)
def check_drift(last: int) -> dict[str, Any]:
    paths = get_paths()
    result = run_monitoring(paths, load_params(paths.params), last)
    get_run_logger().info(
        "window of %d: %s", result["window_size"], "; ".join(result["reasons"]) or "no drift"
    )
    return result


@flow(name="imageclf-monitoring")
def monitoring_flow(last: int = 500, retrain_on_drift: bool = False) -> dict[str, Any]:
    """Drift verdict on the last ``last`` predictions; artifact (and retraining) on drift."""
    result = check_drift(last)
    if result["drift"]:
        reasons = "\n".join(f"- {r}" for r in result["reasons"])
        create_markdown_artifact(
            key="drift-report",
            markdown=(
                f"# Drift detected\n\nWindow: {result['window_size']} predictions of "
                f"model version(s) {', '.join(result['model_versions'])}.\n\n{reasons}\n\n"
                f"Full report: `{result['report']}`\n"
            ),
            description="Monitoring verdict",
        )
        if retrain_on_drift:
            from pipelines.training_flow import training_flow

            get_run_logger().info("drift: starting the training flow")
            result["training"] = training_flow()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.monitoring_flow", description=__doc__
    )
    parser.add_argument("--last", type=int, default=500)
    parser.add_argument("--retrain-on-drift", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(monitoring_flow(args.last, args.retrain_on_drift), indent=2, default=str))


if __name__ == "__main__":
    main()

"""Run the flows' deployments in this process, so runs can be started from the Prefect UI.

    prefect server start                     # terminal 1: the API and UI on http://127.0.0.1:4200
    python -m pipelines.deployments_runner   # terminal 2: registers the deployments, runs them
    open http://127.0.0.1:4200/deployments -> imageclf-training/train -> Run -> Custom run

Prefect calls this "serving" the deployments (``prefect.serve``, which starts a Prefect Runner):
nothing here serves HTTP requests or a model; that is services/service.py.

This is the single-machine path. The deployments themselves are declared once, in prefect.yaml
(name, description, tags, parameters), which team mode creates with `prefect deploy --all` for
a work pool's workers (``make team-up``). Here the training form also shows the current
params.yaml values, so the UI shows what a run would use; change any of them for one run.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import serve

from imageclf.config import load_params
from imageclf.paths import get_paths
from pipelines.deployments import MONITORING, TRAINING, declared_deployments
from pipelines.training_flow import training_flow

DEPLOYMENT = TRAINING
MONITORING_DEPLOYMENT = MONITORING


def training_form_defaults(root: Path | None = None) -> dict[str, Any]:
    """The training form's fields filled with this checkout's params.yaml values."""
    params = load_params(get_paths(root).params if root else get_paths().params)
    return {
        "model": params.train.model,
        "epochs": params.train.epochs,
        "lr": params.train.lr,
        "batch_size": params.train.batch_size,
        "width": params.train.width,
        "fraction": params.data.fraction,
    }


def training_deployment(limit_concurrency: bool = True):  # type: ignore[no-untyped-def]
    spec = declared_deployments(get_paths().root)[DEPLOYMENT]
    limit = spec.get("concurrency_limit") if limit_concurrency else None
    return training_flow.to_deployment(
        name=DEPLOYMENT,
        description=spec["description"],
        parameters={**training_form_defaults(), **spec["parameters"]},
        tags=spec["tags"],
        concurrency_limit=limit,
    )


def monitoring_deployment():  # type: ignore[no-untyped-def]
    from pipelines.monitoring_flow import monitoring_flow

    spec = declared_deployments(get_paths().root)[MONITORING_DEPLOYMENT]
    params = load_params(get_paths().params)
    return monitoring_flow.to_deployment(
        name=MONITORING_DEPLOYMENT,
        description=spec["description"],
        interval=timedelta(minutes=params.monitoring.check_every_minutes),
        parameters=spec["parameters"],
        tags=spec["tags"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.deployments_runner", description=__doc__
    )
    parser.parse_args(argv)
    serve(training_deployment(), monitoring_deployment(), limit=2)


if __name__ == "__main__":
    main()

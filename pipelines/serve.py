"""Serve the flows as deployments so runs can be started from the Prefect UI with parameters.

    prefect server start                 # terminal 1: the API and UI on http://127.0.0.1:4200
    python -m pipelines.serve            # terminal 2: registers the deployments, runs what's asked
    open http://127.0.0.1:4200/deployments -> imageclf-training/train -> Run -> Custom run

The deployment's default parameters are the current params.yaml values, so the UI form shows
what a run would use; change any of them for one run.
"""

from __future__ import annotations

import argparse

from prefect import serve

from imageclf.config import load_params
from imageclf.paths import get_paths
from pipelines.training_flow import training_flow

DEPLOYMENT = "train"


def training_deployment(limit_concurrency: bool = True):  # type: ignore[no-untyped-def]
    params = load_params(get_paths().params)
    return training_flow.to_deployment(
        name=DEPLOYMENT,
        description="Run dvc.yaml's pipeline as a DVC experiment with these parameters (DVC "
        "skips unchanged stages), register the model, and promote it to champion when it is "
        "comparable with the current one and at least as good. set_params: more overrides "
        "as KEY=VALUE, like `dvc exp run -S`.",
        parameters={
            "model": params.train.model,
            "epochs": params.train.epochs,
            "lr": params.train.lr,
            "batch_size": params.train.batch_size,
            "width": params.train.width,
            "fraction": params.data.fraction,
            "set_params": [],
            "promote": True,
        },
        tags=["imageclf", "training"],
        # Each run has a workspace of its own and promotions are serialized, but two trainings
        # at once on one machine would only slow each other down: one at a time.
        concurrency_limit=1 if limit_concurrency else None,
    )


def monitoring_deployment():  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from pipelines.monitoring_flow import monitoring_flow

    params = load_params(get_paths().params)
    return monitoring_flow.to_deployment(
        name="monitor",
        description="Drift check of the service's recent predictions against the training data.",
        interval=timedelta(minutes=params.monitoring.check_every_minutes),
        parameters={"last": 500, "retrain_on_drift": False},
        tags=["imageclf", "monitoring"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__)
    parser.parse_args(argv)
    serve(training_deployment(), monitoring_deployment(), limit=2)


if __name__ == "__main__":
    main()

"""The training flow: the pipeline's stages as Prefect tasks, then registry and promotion.

Run it locally without a server (Prefect's ephemeral mode)::

    python -m pipelines.training_flow --epochs 3 --lr 0.1

or serve it as a deployment and start runs from the Prefect UI (see README). Parameters left
empty keep their params.yaml value; the overrides apply to this run only (the committed
params.yaml is not edited) and are recorded in MLflow with the run.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from imageclf.config import Params, apply_overrides, load_params
from imageclf.paths import ProjectPaths, get_paths
from stages import (
    benchmark,
    dataloader_check,
    download,
    evaluate,
    export,
    optimize,
    profile,
    train,
    validate,
)

# (stage module, retries): only fetching data can be helped by trying again.
STAGES: list[tuple[str, Any, int]] = [
    ("download", download, 2),
    ("validate", validate, 0),
    ("dataloader_check", dataloader_check, 0),
    ("train", train, 0),
    ("evaluate", evaluate, 0),
    ("profile", profile, 0),
    ("optimize", optimize, 0),
    ("export", export, 0),
    ("benchmark", benchmark, 0),
]


def _stage_task(name: str, module: Any, retries: int) -> Callable[..., dict[str, Any]]:
    """A Prefect task that calls ``stages.<name>.run``: the same code DVC runs."""

    @task(name=name, retries=retries, retry_delay_seconds=5, cache_policy=NO_CACHE)
    def run_stage(params: Params, paths: ProjectPaths) -> dict[str, Any]:
        logger = get_run_logger()
        logger.info("stage %s: starting", name)
        result = module.run(params, paths)
        summary = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}
        logger.info("stage %s: done %s", name, json.dumps(summary, default=str)[:1500])
        return result

    return run_stage


STAGE_TASKS = {name: _stage_task(name, module, retries) for name, module, retries in STAGES}


@task(name="register", cache_policy=NO_CACHE)
def register_task(params: Params, paths: ProjectPaths, run_id: str) -> str:
    """Log the verified ONNX model to the training run and register it as challenger."""
    from imageclf.registry import register_workspace

    version = register_workspace(
        paths,
        params,
        run_id,
        extra_tags={
            "source": "prefect",
            "prefect_flow_run_id": str(runtime.flow_run.id or "none"),
            "prefect_flow_run_name": str(runtime.flow_run.name or "none"),
        },
    )
    get_run_logger().info("registered %s v%s as challenger", params.registry.model_name, version)
    return version


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(params: Params, paths: ProjectPaths, version: str) -> dict[str, Any]:
    from dataclasses import asdict

    from imageclf.registry import promote

    decision = promote(paths, params.registry, version)
    get_run_logger().info(
        "v%s %s: %s",
        version,
        "promoted to champion" if decision.promoted else "stays challenger",
        decision.reason,
    )
    return asdict(decision)


@flow(name="imageclf-training", log_prints=True)
def training_flow(
    model: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    fraction: float | None = None,
    width: int | None = None,
    promote: bool = True,
) -> dict[str, Any]:
    """Run every stage with these overrides of params.yaml, register the model, maybe promote it."""
    logger = get_run_logger()
    paths = get_paths()
    overrides = {
        "train.model": model,
        "train.epochs": epochs,
        "train.lr": lr,
        "train.batch_size": batch_size,
        "train.width": width,
        "data.fraction": fraction,
    }
    params = apply_overrides(load_params(paths.params), overrides)
    applied = {k: v for k, v in overrides.items() if v is not None}
    logger.info(
        "project %s; overrides of params.yaml for this run: %s", paths.root, applied or "none"
    )
    results: dict[str, Any] = {}
    for name, _, _ in STAGES:
        results[name] = STAGE_TASKS[name](params, paths)
    run_id = results["train"]["mlflow_run_id"]
    version = register_task(params, paths, run_id)
    decision = promote_task(params, paths, version) if promote else None
    accuracy = results["evaluate"]["test_accuracy"]
    create_markdown_artifact(
        key="training-summary",
        markdown=(
            f"# Training run\n\n| | |\n|---|---|\n| overrides | `{applied or 'none'}` |\n"
            f"| test accuracy | {accuracy:.4f} |\n| MLflow run | `{run_id}` |\n"
            f"| registered version | {version} |\n"
            f"| promotion | {decision['reason'] if decision else 'skipped'} |\n"
        ),
        description="What this run trained and whether it became champion",
    )
    return {
        "run_id": run_id,
        "version": version,
        "test_accuracy": accuracy,
        "promoted": bool(decision and decision["promoted"]),
        "overrides": applied,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.training_flow", description=training_flow.__doc__
    )
    parser.add_argument("--model")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--fraction", type=float)
    parser.add_argument("--width", type=int)
    parser.add_argument("--no-promote", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("imageclf").setLevel(logging.INFO)
    result = training_flow(
        model=args.model,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        fraction=args.fraction,
        width=args.width,
        promote=not args.no_promote,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

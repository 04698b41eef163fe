"""The training flow: the pipeline of dvc.yaml as a DVC experiment, one Prefect task per stage.

    python -m pipelines.training_flow --lr 0.1 --set train.optimizer=adamw

A run is what ``dvc exp run --set-param ...`` is, in a workspace of its own (see
:mod:`pipelines.dvc_experiment`): the user's checkout is not touched, DVC skips the stages
whose deps and params did not change, and the result is a DVC experiment named after the flow
run (``dvc exp show`` lists it with its Prefect flow-run id). Then the model is registered in
MLflow as challenger and promoted when it is comparable with the champion and as good.

The stage list is dvc.yaml's: this file names no stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from imageclf.config import load_overrides, load_params, parse_assignments
from imageclf.io import read_json
from imageclf.paths import get_paths
from imageclf.tracking import tracking_uri
from pipelines.dvc_experiment import (
    StageFailed,
    StageOutcome,
    StageSpec,
    Workspace,
    create_workspace,
    default_remote,
    experiment_name,
    pipeline_stages,
    pull_outputs,
    push_outputs,
    remove_workspace,
    repro_stage,
    save_experiment,
    stage_env,
    write_params,
)


@task(name="prepare-workspace", cache_policy=NO_CACHE)
def prepare(overrides: dict[str, Any]) -> Workspace:
    """Clone the project into the experiment's own workspace and apply the overrides there."""
    logger = get_run_logger()
    project = get_paths().root
    label = f"prefect-{runtime.flow_run.name or 'run'}"
    workspace = create_workspace(project, experiment_name(label))
    try:
        applied = write_params(workspace, overrides)
    except Exception:
        remove_workspace(workspace)  # nothing ran: nothing to inspect
        raise
    logger.info(
        "experiment %s in %s (baseline %s); overrides: %s",
        workspace.name,
        workspace.root,
        workspace.baseline[:8],
        applied or "none",
    )
    return workspace


@task(name="dvc-pull", cache_policy=NO_CACHE)
def pull(workspace: Workspace) -> str | None:
    """Start from the team's outputs: pull what dvc.lock names from the default DVC remote."""
    logger = get_run_logger()
    remote = default_remote(workspace.root)
    if remote is None:
        logger.info("no DVC remote configured: starting from this machine's cache")
        return None
    if pull_outputs(workspace, remote, on_line=logger.info):
        logger.info("pulled from DVC remote %s (missing objects are recomputed)", remote)
    else:
        logger.info("nothing to pull from DVC remote %s: no dvc.lock on this branch yet", remote)
    return remote


@task(name="dvc-push", cache_policy=NO_CACHE)
def push(workspace: Workspace, remote: str) -> None:
    """Publish this run's outputs to the team's DVC remote."""
    logger = get_run_logger()
    push_outputs(workspace, remote, on_line=logger.info)
    logger.info("pushed the outputs to DVC remote %s", remote)


@dataclass(frozen=True)
class StageFailure:
    """A failed stage's message, carried from its task to the flow, which shows it once (as
    its own state's message). Out of ``repr``, so Prefect's log of the task's state is short."""

    stage: str
    message: str = field(repr=False)


@task(cache_policy=NO_CACHE)
def dvc_stage(workspace: Workspace, stage: str, tracking: str) -> StageOutcome | State:
    """One stage of dvc.yaml, run (or skipped) by DVC; its output is this task's log."""
    logger = get_run_logger()
    try:
        outcome = repro_stage(workspace, stage, stage_env(workspace, tracking), on_line=logger.info)
    except StageFailed as exc:
        # Failed, not raised: a raised error is logged with its traceback by the task, again by
        # the flow, and once more by the caller. The flow run's state message says it instead.
        return Failed(message=f"stage {stage} failed", data=StageFailure(stage, str(exc)))
    logger.info(
        "stage %s: %s in %.1fs", stage, "ran" if outcome.ran else "skipped", outcome.seconds
    )
    return outcome


@task(name="save-experiment", cache_policy=NO_CACHE)
def save(workspace: Workspace) -> str:
    origin = {
        "source": "prefect",
        "prefect_flow_run_id": str(runtime.flow_run.id or "none"),
        "prefect_flow_run_name": str(runtime.flow_run.name or "none"),
    }
    commit = save_experiment(
        workspace, origin, f"Prefect flow run {origin['prefect_flow_run_name']}"
    )
    get_run_logger().info("saved DVC experiment %s (%s)", workspace.name, commit[:8])
    return commit


@task(name="register", cache_policy=NO_CACHE)
def register(workspace: Workspace, commit: str, tracking: str) -> dict[str, str]:
    """Register the workspace's verified ONNX model (and its monitoring reference) as challenger,
    tagged with the DVC experiment and the Prefect run that made it."""
    from imageclf.registry import register_workspace

    paths = get_paths(workspace.root)
    params = load_params(paths.params)
    run_id = read_json(paths.train_report)["mlflow_run_id"]
    tags = {
        "source": "prefect",
        "dvc_exp_name": workspace.name,
        "dvc_exp_commit": commit,
        "dvc_exp_baseline": workspace.baseline,
        "prefect_flow_run_id": str(runtime.flow_run.id or "none"),
        "prefect_flow_run_name": str(runtime.flow_run.name or "none"),
    }
    version = register_workspace(paths, params, run_id, extra_tags=tags, tracking=tracking)
    get_run_logger().info("registered %s v%s as challenger", params.registry.model_name, version)
    return {"version": version, "run_id": run_id}


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(workspace: Workspace, version: str, tracking: str) -> dict[str, Any]:
    from imageclf.registry import promote

    params = load_params(get_paths(workspace.root).params)
    decision = promote(params.registry, version, tracking=tracking)
    get_run_logger().info(
        "v%s %s: %s",
        version,
        "promoted to champion" if decision.promoted else "stays challenger",
        decision.reason,
    )
    return asdict(decision)


def _run_stage(workspace: Workspace, spec: StageSpec, tracking: str) -> StageOutcome | StageFailure:
    """One stage as its own named task with its retries; its StageFailure if the stage failed."""
    stage_task = dvc_stage.with_options(name=spec.name, retries=spec.retries, retry_delay_seconds=5)
    state = stage_task(workspace, spec.name, tracking, return_state=True)
    failure = state.result(raise_on_failure=False) if state.is_failed() else None
    if isinstance(failure, StageFailure):
        return failure
    return state.result()


def _summary_markdown(result: dict[str, Any], promotion: str) -> str:
    """The run's summary table, the artifact a person reads in the Prefect UI."""
    return (
        f"# Training run\n\n| | |\n|---|---|\n| overrides | `{result['overrides'] or 'none'}` |\n"
        f"| DVC experiment | `{result['experiment']}` ({result['experiment_commit'][:8]}) |\n"
        f"| stages run | {', '.join(result['stages_run']) or 'none'} |\n"
        f"| stages skipped (unchanged) | {', '.join(result['stages_skipped']) or 'none'} |\n"
        f"| DVC remote (pulled, pushed) | {result['dvc_remote'] or 'none'} |\n"
        f"| test accuracy | {result['test_accuracy']:.4f} |\n"
        f"| MLflow run | `{result['run_id']}` |\n"
        f"| registered version | {result['version']} |\n"
        f"| promotion | {promotion} |\n"
    )


def _publish(
    workspace: Workspace,
    remote: str | None,
    outcomes: list[StageOutcome],
    overrides: dict[str, Any],
    tracking: str,
    promote: bool,
) -> dict[str, Any]:
    """After the stages: save, push, register and maybe promote, then summarise the run."""
    logger = get_run_logger()
    commit = save(workspace)
    if remote is not None:
        push(workspace, remote)
    registered = register(workspace, commit, tracking)
    decision = promote_task(workspace, registered["version"], tracking) if promote else None
    accuracy = read_json(get_paths(workspace.root).evaluate_report)["test_accuracy"]
    remove_workspace(workspace)
    ran = [o.stage for o in outcomes if o.ran]
    skipped = [o.stage for o in outcomes if not o.ran]
    logger.info("stages run: %s; skipped by DVC: %s", ran, skipped or "none")
    result = {
        "experiment": workspace.name,
        "experiment_commit": commit,
        "run_id": registered["run_id"],
        "version": registered["version"],
        "test_accuracy": accuracy,
        "promoted": bool(decision and decision["promoted"]),
        "overrides": overrides,
        "stages_run": ran,
        "stages_skipped": skipped,
        "dvc_remote": remote,
    }
    create_markdown_artifact(
        key="training-summary",
        markdown=_summary_markdown(result, decision["reason"] if decision else "skipped"),
        description="What this run trained and whether it became champion",
    )
    return result


@flow(name="imageclf-training", log_prints=True)
def training_flow(
    model: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    fraction: float | None = None,
    width: int | None = None,
    set_params: list[str] | None = None,
    promote: bool = True,
    config: str | None = None,
) -> dict[str, Any]:
    """Run dvc.yaml's pipeline as a DVC experiment with these overrides of params.yaml (empty:
    keep the file's value; ``set_params``: more as KEY=VALUE; ``config``: a file of them, such
    as configs/photos.yaml, applied first), register the model, maybe promote it."""
    logger = get_run_logger()
    # The named parameters are the form fields the UI shows; anything else goes in set_params.
    named = {
        "train.model": model,
        "train.epochs": epochs,
        "train.lr": lr,
        "train.batch_size": batch_size,
        "train.width": width,
        "data.fraction": fraction,
    }
    overrides = {
        **(load_overrides(config) if config else {}),
        **{k: v for k, v in named.items() if v is not None},
        **parse_assignments(set_params),
    }
    tracking = tracking_uri(get_paths())
    workspace = prepare(overrides)
    outcomes: list[StageOutcome] = []
    try:
        remote = pull(workspace)
        for spec in pipeline_stages(workspace.root):
            outcome = _run_stage(workspace, spec, tracking)
            if isinstance(outcome, StageFailure):
                logger.error(
                    "the experiment's workspace is kept for inspection: %s", workspace.root
                )
                # The stage's message, once: this flow run's state message (and its exception).
                return Failed(
                    message=outcome.message, data=StageFailed(outcome.stage, outcome.message)
                )
            outcomes.append(outcome)
    except Exception:
        logger.error("the experiment's workspace is kept for inspection: %s", workspace.root)
        raise
    return _publish(workspace, remote, outcomes, overrides, tracking, promote)


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
    parser.add_argument(
        "--set",
        "-S",
        dest="set_params",
        action="append",
        metavar="KEY=VALUE",
        help="any other params.yaml override, as `dvc exp run -S` (repeatable)",
    )
    parser.add_argument(
        "--config", help="a YAML file of dotted overrides applied first (configs/photos.yaml)"
    )
    parser.add_argument("--no-promote", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("imageclf").setLevel(logging.INFO)
    try:
        result = training_flow(
            model=args.model,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            fraction=args.fraction,
            width=args.width,
            set_params=args.set_params,
            promote=not args.no_promote,
            config=args.config,
        )
    except StageFailed:
        sys.exit(1)  # its message is the flow run's final log line, "Finished in state Failed"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Stage train: train the model named in params.train, checkpoint every epoch, log to MLflow.

``torchrun --standalone --nproc_per_node N -m stages.train`` trains the same way with DDP over N
processes (see imageclf.training.distributed); rank 0 does all the logging and writing.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from imageclf.config import Params, TrainParams, ensemble_members
from imageclf.data.loaders import LoaderSettings, load_loader_settings
from imageclf.data.store import load_dataset
from imageclf.io import write_json
from imageclf.models.checkpoint import ModelSpec, save_checkpoint
from imageclf.models.ensemble import ensemble
from imageclf.models.zoo import count_parameters
from imageclf.paths import ProjectPaths
from imageclf.stage import main
from imageclf.tracking import experiment_tags, flatten, git_commit, params_hash, setup_mlflow
from imageclf.training import distributed
from imageclf.training.engine import EpochMetrics, chosen_weights, set_threads, train_model
from imageclf.training.resume import fingerprint, finished_member, member_file, resume_state
from imageclf.training.spec import PreparedRun, prepare_run
from imageclf.training.watch import build_observers

log = logging.getLogger(__name__)


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Train, write models/model.pt and reports/train.json, and return the final metrics."""

    joined = distributed.init_from_env()
    try:
        return _run(params, paths)
    finally:
        if joined:
            distributed.shutdown()


def _train_one(
    index: int,
    member: PreparedRun,
    wanted: dict[str, Any],
    paths: ProjectPaths,
    loader: LoaderSettings,
    active: Any,
    tmp: str,
    step0: int,
    ensembled: bool,
) -> tuple[nn.Module, list[dict[str, Any]], dict[str, Any]]:
    """Train one run inside the stage's MLflow run: (the weights to keep, its epoch rows, its
    outcome). Epoch metrics go to MLflow at steps from ``step0`` on (an ensemble's members
    follow one another); an ensemble's rows carry their member's index."""
    import mlflow

    cfg = member.params.train
    tag = {"member": index} if ensembled else {}
    # models/checkpoints/last.pt of a killed run with the same parameters and data: continue it
    # (every rank reads it: each has its own random states in it).
    resume = resume_state(paths.last_checkpoint, wanted, cfg.resume)
    rows: list[dict[str, Any]] = [
        {**EpochMetrics(**row).as_dict(), **tag} for row in (resume["history"] if resume else [])
    ]
    if resume is not None:  # the killed run's epochs are logged again, in this MLflow run
        key = f"resumed_after_epoch_member_{index}" if tag else "resumed_after_epoch"
        mlflow.set_tag(key, resume["epoch"])
    for i, row in enumerate(rows):
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step0 + i)
    folder = f"checkpoints/member-{index}" if tag else "checkpoints"

    def on_epoch_end(metrics: EpochMetrics, model_: Any, _opt: Any) -> None:
        row = {**metrics.as_dict(), **tag}
        rows.append(row)
        step = step0 + len(rows) - 1
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step)
        epoch_copy = Path(tmp) / f"epoch_{metrics.epoch:03d}.pt"
        save_checkpoint(epoch_copy, model_, member.spec, extra={"epoch": metrics.epoch})
        mlflow.log_artifact(str(epoch_copy), artifact_path=folder)

    def save_state(state: dict[str, Any]) -> None:
        # models/model.pt is replaced only when training completes; a crash leaves the last
        # good model in place and the latest epoch, with all it takes to continue, in
        # models/checkpoints/last.pt (written atomically: never half a file).
        save_checkpoint(
            paths.last_checkpoint,
            member.model,
            member.spec,
            extra={"epoch": state["epoch"], "resume": {**state, "fingerprint": wanted}},
        )

    # TensorBoard, gradient flow, activation statistics (rank 0 only; train_model closes
    # them); the TensorBoard folder is named after this MLflow run (and member).
    run_name = f"{active.info.run_name}-{active.info.run_id[:8]}"
    observers = build_observers(cfg, paths, f"{run_name}-member-{index}" if tag else run_name)
    history = train_model(
        member.model,
        member.train,
        member.val,
        cfg,
        seed=member.params.seed,
        loader=loader,
        on_epoch_end=on_epoch_end,
        observers=observers,
        resume=resume,
        save_state=save_state,
    )
    for report in (
        paths.gradient_flow_plot,
        paths.gradient_flow_report,
        paths.activation_stats_report,
    ):
        if report.is_file():
            mlflow.log_artifact(str(report), artifact_path="debugging")
    final = history.final
    weights = chosen_weights(history)
    kept = history.ema.module if weights == "ema" and history.ema is not None else member.model
    outcome = {
        "seed": member.params.seed,
        "epochs": len(history.epochs),
        "train_seconds": history.seconds,
        "train_loss": final.train_loss,
        "train_accuracy": final.train_accuracy,
        "val_accuracy": final.val_accuracy if final.val_accuracy is not None else -1.0,
        "images_per_second": float(np.mean([e.images_per_second for e in history.epochs])),
        # Which weights are kept: the trained ones or their EMA (train.ema_decay), whichever
        # validated better in the last epoch.
        "weights": weights,
        "ema_val_accuracy": final.ema_val_accuracy if final.ema_val_accuracy is not None else -1.0,
        "best_epoch": history.best_epoch if history.best_epoch is not None else -1,
        "stopped_early": history.stopped_early,
        "resumed_after_epoch": history.resumed_after_epoch,
    }
    return kept, rows, outcome


def _result(
    cfg: TrainParams, model: nn.Module, members: list[dict[str, Any]], run_id: str
) -> dict[str, Any]:
    """reports/train.json: one run's outcome; for an ensemble, the sums (epochs, seconds), the
    members' mean (losses, accuracies, images/s) and every member's outcome under "members".
    An ensemble's val_accuracy is its members' mean: each member has its own validation split
    (its seed's), which the other members trained on, so no split scores the ensemble; the
    evaluate stage's test accuracy does."""
    first = members[0]
    result: dict[str, Any] = {"model": cfg.model, "parameters": count_parameters(model)}
    if len(members) == 1:
        result.update(first)
    else:

        def mean(key: str) -> float:
            return float(np.mean([m[key] for m in members]))

        result.update(
            {
                "epochs": sum(m["epochs"] for m in members),
                "train_seconds": sum(m["train_seconds"] for m in members),
                **{
                    k: mean(k)
                    for k in ("train_loss", "train_accuracy", "val_accuracy", "images_per_second")
                },
                "weights": "ensemble",
                "ema_val_accuracy": mean("ema_val_accuracy")
                if all(m["ema_val_accuracy"] >= 0 for m in members)
                else -1.0,
                "best_epoch": -1,
                "stopped_early": any(m["stopped_early"] for m in members),
                "resumed_after_epoch": first["resumed_after_epoch"],
                "members": members,
            }
        )
    result.update({"mlflow_run_id": run_id, "world_size": distributed.world_size()})
    result.pop("seed", None)
    return result


def _run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    import mlflow

    cfg = params.train
    set_threads(cfg.threads)
    dataset = load_dataset(paths.dataset)
    runs = ensemble_members(params)
    ensembled = len(runs) > 1
    loader = load_loader_settings(paths.loader_config)
    world = distributed.world_size()
    train_hash = str(dataset.meta.get("train_hash"))

    def wanted(index: int, member: PreparedRun) -> dict[str, Any]:
        found = fingerprint(member.params, train_hash, world)
        return {**found, "ensemble_member": repr(index)} if ensembled else found

    if not distributed.is_main():  # a DDP worker: train its shards, leave the records to rank 0
        for index, run_params in enumerate(runs):
            member = prepare_run(run_params, dataset, paths)
            if ensembled and finished_member(
                member_file(paths.last_checkpoint, index), wanted(index, member), cfg.resume
            ):
                continue
            resume = resume_state(paths.last_checkpoint, wanted(index, member), cfg.resume)
            train_model(
                member.model,
                member.train,
                member.val,
                member.params.train,
                seed=member.params.seed,
                loader=loader,
                resume=resume,
            )
        return {"rank": distributed.rank()}
    setup_mlflow(paths, cfg.mlflow_experiment)
    history_rows: list[dict[str, Any]] = []
    kept_models: list[nn.Module] = []
    members: list[dict[str, Any]] = []
    specs: list[ModelSpec] = []
    name = f"{cfg.model}-w{cfg.width}-e{cfg.epochs}" + (f"-x{len(runs)}" * ensembled)
    with (
        mlflow.start_run(run_name=name) as active,
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.set_tags(
            {
                "git_commit": git_commit(paths.root),
                "data_train_hash": dataset.meta["train_hash"],
                "data_test_hash": dataset.meta["test_hash"],
                "params_hash": params_hash(params),
                "stage": "train",
                # Set by `dvc exp run` and by the Prefect flow's experiment workspace.
                **experiment_tags(),
            }
        )
        mlflow.log_params(
            {
                k: v
                for k, v in flatten("", params.model_dump(by_alias=True)).items()
                if k.split(".")[0] in ("train", "data", "seed") and k != "data.sources"
            }
        )
        mlflow.log_params({"loader." + k: v for k, v in loader.as_dict().items()})
        mlflow.log_param("world_size", world)
        for index, run_params in enumerate(runs):
            member = prepare_run(run_params, dataset, paths)
            specs.append(member.spec)
            done = (
                finished_member(
                    member_file(paths.last_checkpoint, index), wanted(index, member), cfg.resume
                )
                if ensembled
                else None
            )
            if done is not None:  # trained before this run was killed: reuse it
                log.info("ensemble member %d: trained by the killed run, reused", index)
                member.model.load_state_dict(done["state_dict"])
                rows, outcome = done["history"], done["outcome"]
                for row in rows:
                    mlflow.log_metrics(
                        {k: v for k, v in row.items() if k != "epoch"}, step=len(history_rows)
                    )
                    history_rows.append(row)
                kept_models.append(member.model)
                members.append(outcome)
                continue
            kept, rows, outcome = _train_one(
                index,
                member,
                wanted(index, member),
                paths,
                loader,
                active,
                tmp,
                len(history_rows),
                ensembled,
            )
            history_rows.extend(rows)
            kept_models.append(kept)
            members.append(outcome)
            if ensembled:  # a killed run continues after the members it finished
                save_checkpoint(
                    member_file(paths.last_checkpoint, index),
                    kept,
                    member.spec,
                    extra={
                        "fingerprint": wanted(index, member),
                        "history": rows,
                        "outcome": outcome,
                    },
                )
        # The ensemble's input contract is its first member's (all share the architecture and
        # the data; each member's own normalisation travels in its weights).
        spec = replace(specs[0], members=len(runs))
        final_model = ensemble(kept_models) if ensembled else kept_models[0]
        save_checkpoint(paths.checkpoint, final_model, spec, extra={"epoch": members[-1]["epochs"]})
        for index in range(len(runs)):
            member_file(paths.last_checkpoint, index).unlink(missing_ok=True)
        result = _result(cfg, final_model, members, active.info.run_id)
        mlflow.log_metrics(
            {"train_seconds": result["train_seconds"], "parameters": result["parameters"]}
        )
        mlflow.log_dict(spec.input_contract(), "input_contract.json")
    write_json(paths.train_history, history_rows)
    write_json(paths.train_report, result)
    return result


if __name__ == "__main__":
    main(run)

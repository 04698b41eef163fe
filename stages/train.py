"""Stage train: train the model named in params.train, checkpoint every epoch, log to MLflow.

``torchrun --standalone --nproc_per_node N -m stages.train`` trains the same way with DDP over N
processes (see imageclf.training.distributed); rank 0 does all the logging and writing.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from imageclf.config import Params, ensemble_members
from imageclf.data.loaders import LoaderSettings, load_loader_settings
from imageclf.data.store import Dataset, load_dataset
from imageclf.io import write_json
from imageclf.models.checkpoint import ModelSpec, save_checkpoint
from imageclf.models.ensemble import ensemble
from imageclf.paths import ProjectPaths
from imageclf.stage import main
from imageclf.tracking import setup_mlflow
from imageclf.training import distributed
from imageclf.training.callbacks import (
    LastCheckpoint,
    MlflowEpochLog,
    log_debugging_reports,
    log_epoch_rows,
    log_run_setup,
)
from imageclf.training.engine import set_threads, train_model
from imageclf.training.outcome import run_outcome, train_report
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


def _members(
    runs: list[Params], dataset: Dataset, paths: ProjectPaths, resume: str
) -> Iterator[tuple[int, PreparedRun, dict[str, Any], dict[str, Any] | None]]:
    """Each run to train (the one, or an ensemble's members), prepared: (its index, the run, the
    fingerprint a checkpoint must match to resume it, and for an ensemble member that a killed
    run finished, what it left in models/checkpoints/member-<i>.pt; else None)."""
    train_hash, world = str(dataset.meta.get("train_hash")), distributed.world_size()
    for index, run_params in enumerate(runs):
        member = prepare_run(run_params, dataset, paths)
        wanted = fingerprint(member.params, train_hash, world)
        if len(runs) == 1:
            yield index, member, wanted, None
            continue
        wanted = {**wanted, "ensemble_member": repr(index)}
        done = finished_member(member_file(paths.last_checkpoint, index), wanted, resume)
        yield index, member, wanted, done


def _train_one(
    member: PreparedRun,
    index: int | None,
    wanted: dict[str, Any],
    paths: ProjectPaths,
    loader: LoaderSettings,
    run_name: str,
    tmp: str,
    step0: int,
) -> tuple[nn.Module, list[dict[str, Any]], dict[str, Any]]:
    """Train one run (ensemble member ``index``) inside the stage's MLflow run ``run_name``:
    (the weights to keep, its epoch rows, its outcome)."""
    cfg = member.params.train
    # models/checkpoints/last.pt of a killed run with the same parameters and data: continue it
    # (every rank reads it: each has its own random states in it).
    resume = resume_state(paths.last_checkpoint, wanted, cfg.resume)
    epochs = MlflowEpochLog(member.spec, Path(tmp), step0, resume, index)
    last = LastCheckpoint(paths.last_checkpoint, member.model, member.spec, wanted)
    # TensorBoard (its folder named after the MLflow run and member), gradient flow, activations.
    board = run_name if index is None else f"{run_name}-member-{index}"
    history = train_model(
        member.model,
        member.train,
        member.val,
        cfg,
        seed=member.params.seed,
        loader=loader,
        observers=[epochs, last, *build_observers(cfg, paths, board)],
        resume=resume,
    )
    log_debugging_reports(
        (paths.gradient_flow_plot, paths.gradient_flow_report, paths.activation_stats_report)
    )
    kept, outcome = run_outcome(history, member.model, member.params.seed)
    if index is not None:  # an ensemble's killed run continues after the members it finished
        extra = {"fingerprint": wanted, "history": epochs.rows, "outcome": outcome}
        save_checkpoint(member_file(paths.last_checkpoint, index), kept, member.spec, extra=extra)
    return kept, epochs.rows, outcome


def _run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    import mlflow

    cfg = params.train
    set_threads(cfg.threads)
    dataset = load_dataset(paths.dataset)
    runs = ensemble_members(params)
    ensembled = len(runs) > 1
    loader = load_loader_settings(paths.loader_config)
    if not distributed.is_main():  # a DDP worker: train its shards, leave the records to rank 0
        for _, member, wanted, done in _members(runs, dataset, paths, cfg.resume):
            if done is None:  # as rank 0 trains it, without the records
                resume = resume_state(paths.last_checkpoint, wanted, cfg.resume)
                args = (member.model, member.train, member.val, member.params.train)
                train_model(*args, seed=member.params.seed, loader=loader, resume=resume)
        return {"rank": distributed.rank()}
    setup_mlflow(paths, cfg.mlflow_experiment)
    rows: list[dict[str, Any]] = []
    models: list[nn.Module] = []
    specs: list[ModelSpec] = []
    outcomes: list[dict[str, Any]] = []
    name = f"{cfg.model}-w{cfg.width}-e{cfg.epochs}" + (f"-x{len(runs)}" * ensembled)
    with mlflow.start_run(run_name=name) as active, tempfile.TemporaryDirectory() as tmp:
        log_run_setup(params, paths, dataset.meta, loader, distributed.world_size())
        run_name = f"{active.info.run_name}-{active.info.run_id[:8]}"
        for index, member, wanted, done in _members(runs, dataset, paths, cfg.resume):
            if done is not None:  # trained before this run was killed: reuse it
                log.info("ensemble member %d: trained by the killed run, reused", index)
                member.model.load_state_dict(done["state_dict"])
                log_epoch_rows(done["history"], len(rows))
                model, member_rows, outcome = member.model, done["history"], done["outcome"]
            else:
                tag = index if ensembled else None
                trained = _train_one(member, tag, wanted, paths, loader, run_name, tmp, len(rows))
                model, member_rows, outcome = trained
            rows += member_rows
            models.append(model)
            specs.append(member.spec)
            outcomes.append(outcome)
        # The ensemble's input contract is its first member's (all share the architecture and
        # the data; each member's own normalisation travels in its weights).
        spec = replace(specs[0], members=len(runs))
        final_model = ensemble(models) if ensembled else models[0]
        epochs = outcomes[-1]["epochs"]
        save_checkpoint(paths.checkpoint, final_model, spec, extra={"epoch": epochs})
        for index in range(len(runs)):
            member_file(paths.last_checkpoint, index).unlink(missing_ok=True)
        result = train_report(cfg, final_model, outcomes, active.info.run_id)
        mlflow.log_metrics({k: result[k] for k in ("train_seconds", "parameters")})
        mlflow.log_dict(spec.input_contract(), "input_contract.json")
    write_json(paths.train_history, rows)
    write_json(paths.train_report, result)
    return result


if __name__ == "__main__":
    main(run)

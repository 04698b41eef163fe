"""The train stage's observers (imageclf.training.observers' interface) and its MLflow records:
each epoch's metrics and weights in the MLflow run, the resumable state in
models/checkpoints/last.pt, the run's tags and parameters, the debugging reports.

MLflow is imported when first used (the stage does the same): a DDP worker never logs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from imageclf.config import Params
from imageclf.data.loaders import LoaderSettings
from imageclf.models.checkpoint import ModelSpec, save_checkpoint
from imageclf.paths import ProjectPaths
from imageclf.tracking import experiment_tags, flatten, git_commit, params_hash
from imageclf.training.observers import TrainingObserver


def log_run_setup(
    params: Params, paths: ProjectPaths, data: Mapping[str, Any], loader: LoaderSettings, world: int
) -> None:
    """The active MLflow run's tags (code, data and parameter hashes) and training parameters;
    ``data``: the dataset's meta."""
    import mlflow

    mlflow.set_tags(
        {
            "git_commit": git_commit(paths.root),
            "data_train_hash": data["train_hash"],
            "data_test_hash": data["test_hash"],
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


def log_epoch_rows(rows: list[dict[str, Any]], step0: int) -> None:
    """Epoch rows as MLflow metrics at steps ``step0``, ``step0 + 1``, ... (an ensemble's
    members follow one another); the epoch number is the step's, not a metric."""
    import mlflow

    for i, row in enumerate(rows):
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step0 + i)


def log_debugging_reports(reports: Iterable[Path]) -> None:
    """The gradient-flow and activation reports the observers wrote, as MLflow artifacts (the
    stage names them: they are its declared outputs)."""
    import mlflow

    for report in reports:
        if report.is_file():
            mlflow.log_artifact(str(report), artifact_path="debugging")


class MlflowEpochLog(TrainingObserver):
    """Each epoch's metrics to the active MLflow run at steps from ``step0`` on, and its weights
    as ``checkpoints/epoch_NNN.pt`` (``checkpoints/member-<i>/`` and a ``member`` column for
    ensemble member i). ``rows`` are every epoch's metrics (reports/train_history.json): those
    of the killed run a ``resume`` state continues, logged again in this MLflow run, then this
    run's own."""

    def __init__(
        self,
        spec: ModelSpec,
        tmp: Path,
        step0: int,
        resume: dict[str, Any] | None,
        member: int | None = None,
    ) -> None:
        import mlflow

        self.spec, self.tmp, self.step0 = spec, tmp, step0
        self.tag = {} if member is None else {"member": member}
        self.folder = "checkpoints" if member is None else f"checkpoints/member-{member}"
        earlier = resume["history"] if resume is not None else []
        # EpochMetrics.as_dict() of each saved row: what is None is left out.
        self.rows = [{**{k: v for k, v in r.items() if v is not None}, **self.tag} for r in earlier]
        if resume is not None:
            suffix = "" if member is None else f"_member_{member}"
            mlflow.set_tag(f"resumed_after_epoch{suffix}", resume["epoch"])
        log_epoch_rows(self.rows, step0)

    def on_epoch_end(self, epoch: int, scalars: Mapping[str, float], model: nn.Module) -> None:
        import mlflow

        self.rows.append({**scalars, **self.tag})
        log_epoch_rows(self.rows[-1:], self.step0 + len(self.rows) - 1)
        epoch_copy = self.tmp / f"epoch_{epoch:03d}.pt"
        save_checkpoint(epoch_copy, model, self.spec, extra={"epoch": epoch})
        mlflow.log_artifact(str(epoch_copy), artifact_path=self.folder)


class LastCheckpoint(TrainingObserver):
    """The resumable state after every epoch, with the weights of ``model``, into ``path``
    (models/checkpoints/last.pt) under the ``fingerprint`` a run must match to continue it.

    models/model.pt is replaced only when training completes; a crash leaves the last good
    model in place and the latest epoch, with all it takes to continue, here (written
    atomically: never half a file)."""

    def __init__(
        self, path: Path, model: nn.Module, spec: ModelSpec, fingerprint: dict[str, Any]
    ) -> None:
        self.path, self.model, self.spec, self.fingerprint = path, model, spec, fingerprint

    def save_state(self, state: dict[str, Any]) -> None:
        resume = {**state, "fingerprint": self.fingerprint}
        extra = {"epoch": state["epoch"], "resume": resume}
        save_checkpoint(self.path, self.model, self.spec, extra=extra)

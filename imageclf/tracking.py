"""MLflow set-up in one place: which store, which experiment, which tags tie a run to code and data.

MLflow's default URI is relative to the current directory, so processes started elsewhere would
silently write to another database. We resolve it to an absolute path once, here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from imageclf.paths import ProjectPaths

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]*)@")
# Query parameters that carry a secret: passwords and tokens, and the signatures and credentials
# of signed URLs (S3's X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token; GCS's
# X-Goog-Signature and X-Goog-Credential; Azure SAS's sig): any key that ends in one of these.
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;][\w.-]*?(?:password|passwd|pwd|token|secret|signature|credential|sig|key"
    r"|keyid)=)[^&;#\s]*",
    re.IGNORECASE,
)


def redact_uri(uri: str) -> str:
    """``uri`` fit to show: a password or token in it (``http://user:secret@host``,
    ``postgresql://u:p@db/x``, ``?password=``) replaced by ``***``; the rest kept, so a message
    still says which server it meant."""
    return scrub_credentials(uri)


def scrub_credentials(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***`` (for messages that
    may quote a tracking URI, a database URL or an exception that does)."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)


def tracking_uri(paths: ProjectPaths) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a SQLite file in the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_db}"


def artifact_folder(uri: str, paths: ProjectPaths) -> Path | None:
    """Where a SQLite store's artifacts go: an absolute folder beside the database
    (``paths.mlflow_artifacts`` for the project's own store).

    MLflow's own default is ``./mlruns``, relative to whichever directory a process runs in: a
    stage running in a DVC experiment's workspace would leave its checkpoints and plots in a
    folder deleted with the workspace. A tracking server (None here) decides for itself.
    """
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / paths.mlflow_artifacts.name
    return None


def setup_mlflow(paths: ProjectPaths, experiment: str) -> str:
    """Point MLflow at the project's store and experiment; return the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(paths))
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        mlflow.set_experiment(experiment)
        return found.experiment_id
    folder = artifact_folder(tracking_uri(paths), paths)
    artifacts = None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        artifacts = folder.as_uri()
    experiment_id = mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    return experiment_id


def git_commit(root: Path) -> str:
    """The commit the code came from, with ``-dirty`` when the work tree has changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def experiment_tags() -> dict[str, str]:
    """The DVC experiment a stage runs in, when it runs in one (DVC sets ``DVC_EXP_NAME`` and
    ``DVC_EXP_BASELINE_REV`` for `dvc exp run`; the Prefect flow's workspace sets them too)."""
    names = {"DVC_EXP_NAME": "dvc_exp_name", "DVC_EXP_BASELINE_REV": "dvc_exp_baseline"}
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


def params_hash(params: Any) -> str:
    """Stable short hash of the full parameter set (pydantic model or plain dict)."""
    data = params.model_dump(by_alias=True) if hasattr(params, "model_dump") else params
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1} for mlflow.log_params."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: value}


def log_to_run(
    paths: ProjectPaths,
    run_id: str | None,
    metrics: dict[str, float],
    artifacts: list[Path] | None = None,
    prefix: str = "",
) -> bool:
    """Add a later stage's metrics and files to the training run (skipped when there is none).

    Evaluation and benchmark numbers belong to the run that produced the model, so the MLflow UI
    shows one row per model with all of its numbers.
    """
    if not run_id:
        return False
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(paths))
    client = mlflow.MlflowClient()
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    with mlflow.start_run(run_id=run_id):
        numeric = {
            f"{prefix}{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if numeric:
            mlflow.log_metrics(numeric)
        for path in artifacts or []:
            if path.is_file():
                mlflow.log_artifact(str(path))
    return True

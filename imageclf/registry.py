"""The MLflow model registry: register challengers, promote a champion, roll back.

Aliases only (``champion``, ``challenger``); the deprecated registry stages are never used. What
is served is whatever ``models:/<name>@champion`` points to, so promotion and rollback are one
alias move each, recorded on the versions and the model so the UI shows why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imageclf.config import Params, RegistryParams, load_params
from imageclf.paths import ProjectPaths, get_paths
from imageclf.tracking import tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
ACCURACY_METRIC = "test_accuracy"
LATENCY_METRIC = "bench.onnxruntime_fp32.batch_1.p50_ms"


class RegistryError(RuntimeError):
    """A registry action that cannot be done, with what to do instead."""


@dataclass
class Decision:
    version: str
    promoted: bool
    reason: str
    champion_before: str | None
    accuracy: float | None
    champion_accuracy: float | None
    latency_ms: float | None


def client(paths: ProjectPaths) -> Any:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(paths))
    return mlflow.MlflowClient()


def dvc_data_hash(root: Path) -> str | None:
    """DVC's hash of data/dataset from dvc.lock (what `dvc` itself uses to identify the data)."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for out in stages.get("download", {}).get("outs", []):
        if out.get("path") == "data/dataset":
            return out.get("md5")
    return None


def log_and_register(
    paths: ProjectPaths,
    params: Params,
    run_id: str,
    onnx_path: Path,
    example: np.ndarray,
    tags: dict[str, str] | None = None,
) -> str:
    """Log the ONNX model (signature + input example) to ``run_id`` and register a new version.

    The new version gets the alias ``challenger``; returns its version number.
    """
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    from imageclf.export import ort_session

    registry = client(paths)
    session = ort_session(onnx_path)
    names = [o.name for o in session.get_outputs()]
    output = dict(zip(names, session.run(None, {"images": example}), strict=True))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="onnx_model",
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=["onnxruntime", "numpy"],
            save_as_external_data=False,
            registered_model_name=params.registry.model_name,
            await_registration_for=60,
        )
        if tags:
            mlflow.set_tags(tags)
    version = str(info.registered_model_version)
    registry.set_registered_model_alias(params.registry.model_name, CHALLENGER, version)
    for key, value in (tags or {}).items():
        registry.set_model_version_tag(params.registry.model_name, version, key, value)
    log.info("registered %s version %s as %s", params.registry.model_name, version, CHALLENGER)
    return version


def _metric(registry: Any, name: str, version: str, metric: str) -> float | None:
    run_id = registry.get_model_version(name, version).run_id
    return registry.get_run(run_id).data.metrics.get(metric) if run_id else None


def _alias_version(registry: Any, name: str, alias: str) -> str | None:
    import mlflow

    try:
        return str(registry.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def _history(registry: Any, name: str) -> list[str]:
    tags = registry.get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def promote(paths: ProjectPaths, cfg: RegistryParams, version: str | None = None) -> Decision:
    """Make ``version`` (default: the challenger) champion if it is as good and fast enough."""
    registry = client(paths)
    name = cfg.model_name
    version = version or _alias_version(registry, name, CHALLENGER)
    if version is None:
        raise RegistryError(f"{name} has no {CHALLENGER}: run the training flow first.")
    accuracy = _metric(registry, name, version, ACCURACY_METRIC)
    latency = _metric(registry, name, version, LATENCY_METRIC)
    champion = _alias_version(registry, name, CHAMPION)
    champion_accuracy = _metric(registry, name, champion, ACCURACY_METRIC) if champion else None
    problems = []
    if accuracy is None:
        problems.append(f"version {version} has no {ACCURACY_METRIC} (run evaluate)")
    elif champion_accuracy is not None and accuracy < champion_accuracy - cfg.accuracy_tolerance:
        problems.append(
            f"test accuracy {accuracy:.4f} is below champion v{champion}'s "
            f"{champion_accuracy:.4f} by more than {cfg.accuracy_tolerance}"
        )
    if latency is None:
        problems.append(f"version {version} has no benchmark latency (run benchmark)")
    elif latency > cfg.max_latency_ms:
        problems.append(f"p50 latency {latency:.2f} ms exceeds the {cfg.max_latency_ms} ms budget")
    if champion == version:
        problems.append(f"version {version} is already {CHAMPION}")
    if problems:
        reason = "; ".join(problems)
        registry.set_model_version_tag(name, version, "promotion", f"rejected: {reason}")
        log.info("version %s stays %s: %s", version, CHALLENGER, reason)
        return Decision(version, False, reason, champion, accuracy, champion_accuracy, latency)
    reason = (
        f"test accuracy {accuracy:.4f} vs champion "
        + (f"v{champion} {champion_accuracy:.4f}" if champion else "none")
        + f", p50 latency {latency:.2f} ms within {cfg.max_latency_ms} ms"
    )
    registry.set_registered_model_alias(name, CHAMPION, version)
    if _alias_version(registry, name, CHALLENGER) == version:
        registry.delete_registered_model_alias(name, CHALLENGER)
    history = [*_history(registry, name), version]
    registry.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    registry.set_model_version_tag(name, version, "promotion", f"promoted: {reason}")
    log.info("version %s is now %s (%s)", version, CHAMPION, reason)
    return Decision(version, True, reason, champion, accuracy, champion_accuracy, latency)


def rollback(paths: ProjectPaths, cfg: RegistryParams, reason: str) -> str:
    """Move ``champion`` back to the previous champion and record why; returns that version."""
    registry = client(paths)
    name = cfg.model_name
    history = _history(registry, name)
    current = _alias_version(registry, name, CHAMPION)
    if current is None or len(history) < 2:
        raise RegistryError(
            f"{name} has no previous champion to roll back to (history: {history or 'empty'})."
        )
    if history[-1] != current:  # someone moved the alias by hand: trust the alias
        history.append(current)
    history.pop()
    previous = history[-1]
    registry.set_registered_model_alias(name, CHAMPION, previous)
    registry.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    registry.set_model_version_tag(name, current, "rolled_back", reason)
    registry.set_model_version_tag(
        name, previous, "restored_by_rollback", f"from v{current}: {reason}"
    )
    log.info("rolled %s back from v%s to v%s: %s", CHAMPION, current, previous, reason)
    return previous


def status(paths: ProjectPaths, cfg: RegistryParams) -> dict[str, Any]:
    registry = client(paths)
    name = cfg.model_name
    versions = registry.search_model_versions(f"name = '{name}'")
    return {
        "model": name,
        CHAMPION: _alias_version(registry, name, CHAMPION),
        CHALLENGER: _alias_version(registry, name, CHALLENGER),
        "history": _history(registry, name) if versions else [],
        "versions": sorted(int(v.version) for v in versions),
    }


def register_workspace(
    paths: ProjectPaths,
    params: Params,
    run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Register the workspace's verified models/model.onnx as challenger (DVC and the flow both
    come here), attached to the MLflow run that trained it (default: reports/train.json's).

    The same ONNX file is never registered twice: its SHA-256 is a version tag.
    """
    from imageclf.data.store import load_dataset
    from imageclf.io import read_json
    from imageclf.tracking import git_commit, params_hash
    from imageclf.transforms import to_model_array

    train_report = paths.reports / "train.json"
    if not paths.onnx.is_file() or (run_id is None and not train_report.is_file()):
        raise RegistryError(
            "No exported model in this workspace: run `make run` (dvc repro) first."
        )
    run_id = run_id or read_json(train_report)["mlflow_run_id"]
    digest = hashlib.sha256(paths.onnx.read_bytes()).hexdigest()
    tags = {
        "git_commit": git_commit(paths.root),
        "params_hash": params_hash(params),
        "dvc_data_hash": dvc_data_hash(paths.root) or "none",
        "source": "dvc repro",
        **(extra_tags or {}),
        "onnx_sha256": digest,
    }
    name = params.registry.model_name
    registry = client(paths)
    if registry.search_registered_models(f"name = '{name}'"):
        for version in registry.search_model_versions(f"name = '{name}'"):
            if version.tags.get("onnx_sha256") == digest:
                for key, value in tags.items():  # the run still records where it came from
                    registry.set_tag(run_id, key, value)
                log.info("this model is already version %s: nothing to register", version.version)
                return str(version.version)
    example = to_model_array(load_dataset(paths.dataset).test.images[:2])
    return log_and_register(paths, params, run_id, paths.onnx, example, tags)


def main(argv: list[str] | None = None) -> None:
    """`python -m imageclf.registry {status,register,promote,rollback}`."""
    parser = argparse.ArgumentParser(prog="python -m imageclf.registry", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="show champion, challenger and history")
    sub.add_parser("register", help="register the workspace's exported model as challenger")
    p = sub.add_parser("promote", help="promote the challenger (or --version) if it qualifies")
    p.add_argument("--version")
    r = sub.add_parser("rollback", help="move champion back to the previous champion")
    r.add_argument("--reason", required=True, help="why (recorded on the version)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = get_paths()
    params = load_params(paths.params)
    cfg = params.registry
    try:
        if args.command == "status":
            print(json.dumps(status(paths, cfg), indent=2))
        elif args.command == "register":
            print(f"the workspace model is version {register_workspace(paths, params)}")
        elif args.command == "promote":
            print(json.dumps(asdict(promote(paths, cfg, args.version)), indent=2))
        else:
            print(f"{CHAMPION} is now version {rollback(paths, cfg, args.reason)}")
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

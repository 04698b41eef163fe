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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imageclf.config import Params, RegistryParams, load_params
from imageclf.metric_names import SERVED_LATENCY_METRIC
from imageclf.paths import ProjectPaths, get_paths
from imageclf.tracking import tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
ACCURACY_METRIC = "test_accuracy"
LATENCY_METRIC = SERVED_LATENCY_METRIC


class RegistryError(RuntimeError):
    """A registry action that cannot be done, with what to do instead."""


# Version tags that say what a version's test accuracy was measured on and what input it takes.
# Accuracy is only comparable between versions whose three tags agree.
COMPARABLE_BY = {
    "test_data_hash": "test data",
    "classes": "class list",
    "input_contract": "input contract",
}
# The version tag naming the run artifact that holds its monitoring reference.
REFERENCE_TAG = "monitoring_reference"
# The version tag naming the run artifact that holds the test images its web page shows.
EXAMPLES_TAG = "example_images"
# The version tag holding the SHA-256 of the ONNX file as stored in the artifact store: the
# service refuses a file that does not hash to it (corrupt or tampered), and registering the
# same file twice is recognised by it.
SHA256_TAG = "onnx_sha256"


@dataclass
class Decision:
    version: str
    promoted: bool
    reason: str
    champion_before: str | None
    accuracy: float | None
    champion_accuracy: float | None
    latency_ms: float | None


def client(tracking: str) -> Any:
    import mlflow

    mlflow.set_tracking_uri(tracking)
    return mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)


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


def comparability_tags(onnx_path: Path, classes: list[str], test_hash: str) -> dict[str, str]:
    """The tags of :data:`COMPARABLE_BY` for a model file and the test set it was evaluated on."""
    from imageclf.onnx_runtime import onnx_metadata

    meta = onnx_metadata(onnx_path)
    contract = json.loads(meta["input"]) if "input" in meta else {"unknown": str(onnx_path)}
    return {
        "test_data_hash": test_hash,
        "classes": json.dumps(list(classes)),
        "input_contract": json.dumps(contract, sort_keys=True),
    }


def log_and_register(
    tracking: str,
    params: Params,
    run_id: str,
    onnx_path: Path,
    example: np.ndarray,
    tags: dict[str, str] | None = None,
    reference: Path | None = None,
    examples: Path | None = None,
) -> str:
    """Log the ONNX model (signature + input example) to ``run_id`` and register a new version.

    The new version gets the alias ``challenger``; its monitoring ``reference`` (the summaries
    of the training data made with this very model) is stored with it, so whichever version is
    served is watched against its own reference, and so are its ``examples`` (test images of
    its own classes and input size for the web page). The stored file's SHA-256 is recorded
    as the version tag ``onnx_sha256``, which the service verifies before serving it. Returns
    the version number.
    """
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    from imageclf.onnx_runtime import ort_session

    registry = client(tracking)
    session = ort_session(onnx_path)
    names = [o.name for o in session.get_outputs()]
    output = dict(zip(names, session.run(None, {"images": example}), strict=True))
    proto = onnx.load(str(onnx_path))
    # MLflow writes the file from this proto (onnx.save_model, no external data): these bytes.
    digest = hashlib.sha256(proto.SerializeToString()).hexdigest()
    # Resuming a run needs its own experiment active: whatever this process set active before
    # (another store, another project) would make MLflow refuse the run.
    mlflow.set_experiment(experiment_id=registry.get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            proto,
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
    name = params.registry.model_name
    for tag, kind, path in (
        (REFERENCE_TAG, "monitoring", reference),
        (EXAMPLES_TAG, "examples", examples),
    ):
        if path is not None and path.is_file():
            folder = f"{kind}/v{version}"
            registry.log_artifact(run_id, str(path), artifact_path=folder)
            registry.set_model_version_tag(name, version, tag, f"{folder}/{path.name}")
            digest_of_file = hashlib.sha256(path.read_bytes()).hexdigest()
            registry.set_model_version_tag(name, version, artifact_sha256_tag(tag), digest_of_file)
    registry.set_registered_model_alias(name, CHALLENGER, version)
    for key, value in (tags or {}).items():
        registry.set_model_version_tag(name, version, key, value)
    if (tags or {}).get(SHA256_TAG, digest) != digest:
        log.warning("%s differs from the stored file's: recording the stored file's", onnx_path)
    registry.set_model_version_tag(name, version, SHA256_TAG, digest)
    log.info("registered %s version %s as %s", name, version, CHALLENGER)
    return version


def download_reference(tracking: str, name: str, version: str, dest: Path) -> Path | None:
    """The monitoring reference registered with ``version`` (None for a version without one)."""
    return _download_tagged(tracking, name, version, REFERENCE_TAG, dest)


def download_examples(tracking: str, name: str, version: str, dest: Path) -> Path | None:
    """The web page's example images registered with ``version`` (None: it has none)."""
    return _download_tagged(tracking, name, version, EXAMPLES_TAG, dest)


def artifact_sha256_tag(tag: str) -> str:
    """The version tag holding the SHA-256 of the artifact ``tag`` names (every file of a
    version is verified, not only the model)."""
    return f"{tag}_sha256"


class ArtifactMismatch(ValueError):
    """A version's file differs from the one registered: changed in the store since."""


def _download_tagged(tracking: str, name: str, version: str, tag: str, dest: Path) -> Path | None:
    registry = client(tracking)
    mv = registry.get_model_version(name, version)
    artifact = mv.tags.get(tag)
    if not artifact or not mv.run_id:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    path = Path(registry.download_artifacts(mv.run_id, artifact, str(dest)))
    recorded = mv.tags.get(artifact_sha256_tag(tag))
    if recorded and hashlib.sha256(path.read_bytes()).hexdigest() != recorded:
        raise ArtifactMismatch(
            f"{name} v{version}'s {artifact} does not match the SHA-256 recorded at "
            "registration: it was changed or tampered with in the artifact store."
        )
    return path


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


def _incomparable(registry: Any, name: str, version: str, champion: str) -> list[str]:
    """Why ``version``'s test accuracy cannot be compared with ``champion``'s (empty: it can)."""
    mine = registry.get_model_version(name, version).tags
    theirs = registry.get_model_version(name, champion).tags
    problems = []
    for tag, what in COMPARABLE_BY.items():
        a, b = mine.get(tag), theirs.get(tag)
        if a is None or b is None:
            missing = version if a is None else champion
            problems.append(f"v{missing} does not record its {what} ({tag})")
        elif a != b:
            shown = (a[:12], b[:12]) if tag == "test_data_hash" else (a, b)
            problems.append(
                f"its {what} differs from champion v{champion}'s ({shown[0]} vs {shown[1]})"
            )
    return problems


@contextmanager
def promotion_lock(tracking: str, timeout_s: float = 600.0) -> Iterator[None]:
    """Serialize promotions: read champion, compare, move the alias, extend the history as one step.

    An exclusive file lock beside the SQLite store, or, for a tracking server, in the user's
    cache folder keyed by its URI (which serializes the promotions of one machine: run the
    flows of a team through one work pool, or promote from one place).
    """
    import fcntl

    if tracking.startswith("sqlite:///"):
        lock_path = Path(tracking.removeprefix("sqlite:///") + ".promotion.lock")
    else:
        key = hashlib.sha256(tracking.encode()).hexdigest()[:16]
        lock_path = Path.home() / ".cache" / "imageclf" / f"promotion-{key}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with lock_path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"another promotion has held {lock_path} for {timeout_s:.0f} s: "
                        "check for a stuck process, then retry."
                    ) from exc
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def promote(
    cfg: RegistryParams, version: str | None = None, tracking: str = "", force: bool = False
) -> Decision:
    """Make ``version`` (default: the challenger) champion if it is comparable with the champion
    (same test data, classes and input contract), as accurate, and fast enough.

    ``force`` (an operator's decision) skips the comparison with the champion, never the
    latency budget. Concurrent promotions are serialized: each is judged against the champion
    of the moment, and the history keeps every promotion.
    """
    with promotion_lock(tracking):
        return _promote(cfg, version, tracking, force)


def _promote(cfg: RegistryParams, version: str | None, tracking: str, force: bool) -> Decision:
    registry = client(tracking)
    name = cfg.model_name
    version = version or _alias_version(registry, name, CHALLENGER)
    if version is None:
        raise RegistryError(f"{name} has no {CHALLENGER}: run the training flow first.")
    accuracy = _metric(registry, name, version, ACCURACY_METRIC)
    latency = _metric(registry, name, version, LATENCY_METRIC)
    champion = _alias_version(registry, name, CHAMPION)
    champion_accuracy = _metric(registry, name, champion, ACCURACY_METRIC) if champion else None
    problems = []
    if champion == version:
        problems.append(f"version {version} is already {CHAMPION}")
    elif champion and not force:
        incomparable = _incomparable(registry, name, version, champion)
        if incomparable:
            problems.append(
                "not comparable with the champion: "
                + "; ".join(incomparable)
                + " (evaluate both on the same test set, or promote with --force)"
            )
    if accuracy is None:
        problems.append(f"version {version} has no {ACCURACY_METRIC} (run evaluate)")
    elif (
        not force
        and champion_accuracy is not None
        and accuracy < champion_accuracy - cfg.accuracy_tolerance
    ):
        problems.append(
            f"test accuracy {accuracy:.4f} is below champion v{champion}'s "
            f"{champion_accuracy:.4f} by more than {cfg.accuracy_tolerance}"
        )
    if latency is None:
        problems.append(f"version {version} has no benchmark latency (run benchmark)")
    elif latency > cfg.max_latency_ms:
        problems.append(f"p50 latency {latency:.2f} ms exceeds the {cfg.max_latency_ms} ms budget")
    if problems:
        reason = "; ".join(problems)
        registry.set_model_version_tag(name, version, "promotion", f"rejected: {reason}")
        log.info("version %s stays %s: %s", version, CHALLENGER, reason)
        return Decision(version, False, reason, champion, accuracy, champion_accuracy, latency)
    reason = (
        ("forced by operator; " if force else "")
        + f"test accuracy {accuracy:.4f} vs champion "
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


def rollback(cfg: RegistryParams, reason: str, tracking: str) -> str:
    """Move ``champion`` back to the previous champion and record why; returns that version."""
    with promotion_lock(tracking):
        registry = client(tracking)
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


def status(cfg: RegistryParams, tracking: str) -> dict[str, Any]:
    registry = client(tracking)
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
    tracking: str | None = None,
) -> str:
    """Register the workspace's verified models/model.onnx as challenger (DVC and the flow both
    come here), attached to the MLflow run that trained it (default: reports/train.json's), with
    its monitoring reference and the tags that make it comparable.

    ``tracking`` defaults to the workspace's store; a flow's experiment workspace passes the
    project's. The same ONNX file is never registered twice: its SHA-256 is a version tag.
    """
    from imageclf.data.store import load_dataset
    from imageclf.data.transforms import to_model_array
    from imageclf.io import read_json
    from imageclf.tracking import git_commit, params_hash

    tracking = tracking or tracking_uri(paths)
    if not paths.onnx.is_file() or (run_id is None and not paths.train_report.is_file()):
        raise RegistryError(
            "No exported model in this workspace: run `make run` (dvc repro) first."
        )
    run_id = run_id or read_json(paths.train_report)["mlflow_run_id"]
    digest = hashlib.sha256(paths.onnx.read_bytes()).hexdigest()
    dataset = load_dataset(paths.dataset)
    tags = {
        "git_commit": git_commit(paths.root),
        "params_hash": params_hash(params),
        "dvc_data_hash": dvc_data_hash(paths.root) or "none",
        "source": "dvc repro",
        **comparability_tags(paths.onnx, list(dataset.classes), dataset.meta["test_hash"]),
        **(extra_tags or {}),
        SHA256_TAG: digest,
    }
    name = params.registry.model_name
    registry = client(tracking)
    if registry.search_registered_models(f"name = '{name}'"):
        for version in registry.search_model_versions(f"name = '{name}'"):
            if version.tags.get(SHA256_TAG) == digest:
                for key, value in tags.items():  # the run still records where it came from
                    registry.set_tag(run_id, key, value)
                log.info("this model is already version %s: nothing to register", version.version)
                return str(version.version)
    example = to_model_array(dataset.test.images[:2])
    return log_and_register(
        tracking, params, run_id, paths.onnx, example, tags, paths.reference, paths.examples
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m imageclf.registry {status,register,promote,rollback}`."""
    parser = argparse.ArgumentParser(prog="python -m imageclf.registry", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="show champion, challenger and history")
    sub.add_parser("register", help="register the workspace's exported model as challenger")
    p = sub.add_parser("promote", help="promote the challenger (or --version) if it qualifies")
    p.add_argument("--version")
    p.add_argument(
        "--force",
        action="store_true",
        help="an operator's decision: skip the comparison with the champion "
        "(not the latency budget)",
    )
    r = sub.add_parser("rollback", help="move champion back to the previous champion")
    r.add_argument("--reason", required=True, help="why (recorded on the version)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = get_paths()
    params = load_params(paths.params)
    cfg = params.registry
    tracking = tracking_uri(paths)
    try:
        if args.command == "status":
            print(json.dumps(status(cfg, tracking), indent=2))
        elif args.command == "register":
            print(f"the workspace model is version {register_workspace(paths, params)}")
        elif args.command == "promote":
            decision = promote(cfg, args.version, tracking, force=args.force)
            print(json.dumps(asdict(decision), indent=2))
        else:
            print(f"{CHAMPION} is now version {rollback(cfg, args.reason, tracking)}")
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Follow the registry's champion without a restart.

A service worker asks the registry every ``serving.poll_seconds`` which version the alias names.
When it moved (promotion, rollback), the new version is downloaded into a folder this worker
owns, verified against the SHA-256 recorded at registration, loaded, and handed back for the
caller to swap in; the previous version's folder is removed. Workers poll on their own, so for
at most one poll interval they may serve different versions (every response names its version).

Nothing here raises out of a poll: a registry that does not answer, a version without a file, a
corrupt or tampered file all become a one-sentence ``reason``, and whatever is being served
keeps being served. Kept free of any web framework so it is tested without BentoML.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from imageclf.config import ServingParams
from imageclf.deploy.inference import (
    Example,
    ModelRef,
    ModelRejected,
    ModelUnavailable,
    OnnxClassifier,
    load_examples,
    lookup_version,
    resolve_model,
)
from imageclf.registry import SHA256_TAG
from imageclf.tracking import scrub_credentials

log = logging.getLogger(__name__)

# Each worker's model folders live in one folder named after its process id, so a worker that
# died without cleaning up (SIGKILL, OOM) is recognised and its leftovers removed by the next.
FOLDER_PREFIX = "imageclf-models-"


def bound_registry_calls(timeout_s: int) -> None:
    """Make MLflow's HTTP calls in this process give up after ``timeout_s`` without retrying.

    MLflow otherwise retries a refused connection with exponential backoff for minutes, so a
    service started while the tracking server is down would hang instead of answering
    not-ready; the poll is the retry. Variables the user set explicitly are kept."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def remove_orphaned_folders(parent: Path) -> list[Path]:
    """Remove model folders left in ``parent`` by worker processes that no longer exist."""
    removed = []
    for folder in parent.glob(f"{FOLDER_PREFIX}*-*"):
        pid = folder.name.removeprefix(FOLDER_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except PermissionError:  # alive, someone else's
            pass
    return removed


@dataclass
class LoadedVersion:
    """One model version, downloaded, verified and loaded: everything a swap hands over."""

    ref: ModelRef
    model: OnnxClassifier
    examples: list[Example]
    folder: Path


@dataclass
class Refusal:
    """A version the alias names that is not served, and why (shown by /model_info)."""

    version: str
    reason: str
    # What the registry said the file should hash to when it was refused: a new recorded hash
    # (the version re-tagged) earns a new try, the same one does not (no download every poll).
    recorded_sha256: str | None = field(default=None, repr=False)


class ChampionWatcher:
    """The alias's current version, loaded; ``poll`` looks again (blocking: run it off the
    event loop). Not thread-safe: one poller per watcher."""

    def __init__(
        self,
        tracking_uri: str,
        name: str,
        alias: str,
        limits: ServingParams,
        parent: Path | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.name = name
        self.alias = alias
        self.limits = limits
        parent = Path(parent or tempfile.gettempdir())
        remove_orphaned_folders(parent)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=parent))
        self.current: LoadedVersion | None = None
        self.refused: Refusal | None = None
        self.problem = ""  # the last poll's problem (registry down, no champion...), or ""
        self._serial = itertools.count(1)

    @property
    def reason(self) -> str:
        """Why nothing is served, or what is wrong besides what is served ("" when nothing)."""
        parts = [self.problem] if self.problem else []
        if self.refused is not None:
            parts.append(f"refused v{self.refused.version}: {self.refused.reason}")
        if self.current is not None and not self.current.ref.verified:
            parts.append(
                f"v{self.current.ref.version} is served unverified (no {SHA256_TAG} recorded)"
            )
        return "; ".join(parts)

    def poll(self) -> LoadedVersion | None:
        """Look up the alias once; a newly loaded version to swap in, else None (unchanged, or
        a problem that ``reason`` now tells). The previous version's files are removed."""
        try:
            wanted = lookup_version(self.tracking_uri, self.name, self.alias)
        except ModelUnavailable as exc:
            self._note(str(exc))
            return None
        self.problem = ""
        version = str(wanted.version)
        if self.current is not None and version == self.current.ref.version:
            self.refused = None  # back on the served version (e.g. a rollback): nothing pending
            return None
        recorded = wanted.tags.get(SHA256_TAG)
        if self.refused and (self.refused.version, self.refused.recorded_sha256) == (
            version,
            recorded,
        ):
            return None
        folder = self.folder / f"v{version}-{next(self._serial)}"
        try:
            loaded = self._load(wanted, folder)
        except ModelRejected as exc:
            shutil.rmtree(folder, ignore_errors=True)
            self.refused = Refusal(version, str(exc), recorded)
            log.error("refused %s v%s: %s", self.name, version, exc)
            return None
        except ModelUnavailable as exc:
            shutil.rmtree(folder, ignore_errors=True)
            self._note(str(exc))
            return None
        except Exception as exc:  # anything else about this version: never a worker's crash
            shutil.rmtree(folder, ignore_errors=True)
            reason = scrub_credentials(f"it does not load: {type(exc).__name__}: {exc}")
            self.refused = Refusal(version, reason, recorded)
            log.error("refused %s v%s: %s", self.name, version, reason)
            return None
        previous, self.current, self.refused = self.current, loaded, None
        if previous is not None:
            # ONNX Runtime holds the model in memory: the file is not needed by requests still
            # running on the previous session, so its folder can go now.
            shutil.rmtree(previous.folder, ignore_errors=True)
        log.info("loaded %s v%s (@%s)", self.name, version, self.alias)
        return loaded

    def close(self) -> None:
        """Remove every file this watcher downloaded (the service's shutdown)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _note(self, problem: str) -> None:
        if problem != self.problem:
            log.warning("%s", problem)
        self.problem = problem

    def _load(self, wanted: object, folder: Path) -> LoadedVersion:
        ref = resolve_model(
            self.tracking_uri,
            self.name,
            self.alias,
            folder / "model",
            require_sha256=self.limits.require_sha256,
            version=wanted,
        )
        try:
            model = OnnxClassifier(ref.path, self.limits.threads)
        except ModelUnavailable as exc:
            raise ModelRejected(str(exc), ref.version) from exc
        except Exception as exc:  # ONNX Runtime's own errors: a file that is not a usable model
            raise ModelRejected(
                f"{self.name} v{ref.version} does not load in ONNX Runtime: {exc}", ref.version
            ) from exc
        return LoadedVersion(ref, model, self._examples(ref, folder / "examples"), folder)

    def _examples(self, ref: ModelRef, folder: Path) -> list[Example]:
        """The test images registered with this version, for the web page: they follow the
        version (its classes, its input size). Missing or unreadable ones cost only the
        examples; a file that differs from the one registered refuses the version."""
        from imageclf.registry import ArtifactMismatch, download_examples

        try:
            path = download_examples(self.tracking_uri, ref.name, ref.version, folder)
            return load_examples(path) if path is not None else []
        except ArtifactMismatch as exc:
            raise ModelRejected(str(exc), ref.version) from exc
        except Exception as exc:  # a registry hiccup or a broken file: the page has no examples
            log.warning(
                "no example images for %s v%s: %s",
                ref.name,
                ref.version,
                scrub_credentials(str(exc)),
            )
            return []

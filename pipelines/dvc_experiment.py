"""A DVC experiment run one stage at a time, in a workspace of its own.

This is what `dvc exp run --temp --set-param k=v` does, opened up so that an orchestrator can
show each stage as its own task with its own log:

1. :func:`create_workspace` clones the project at ``HEAD`` (plus the uncommitted changes of its
   tracked files, as ``dvc exp run`` does) into ``.dvc/tmp/flows/<name>``, shares the
   project's DVC cache and checks out the outputs it already has. The user's checkout is
   never touched.
2. :func:`write_params` edits the workspace's params.yaml (comments kept), validated by
   :mod:`imageclf.config` first.
3. :func:`repro_stage` runs ``dvc repro --single-item <stage>`` for each stage of
   :func:`pipeline_stages`, the order read from dvc.yaml: DVC skips a stage whose deps and
   params did not change and reuses its outputs from the shared cache.
4. :func:`save_experiment` saves the result as a named DVC experiment (``dvc exp save``) and
   pushes its ref into the project, so ``dvc exp show`` there lists it and ``dvc exp apply``
   restores it (the outputs are already in the shared cache).

With a default DVC remote (team mode: ``team`` in .dvc/config.local), :func:`pull_outputs` fills
the cache from it before step 3 (a worker on another machine starts from what the team already
computed; an object the remote lacks is simply recomputed) and :func:`push_outputs` publishes the
run's outputs after step 4.

Nothing here imports Prefect: ``pipelines/training_flow.py`` wires it into tasks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageclf.config import apply_overrides, load_params
from imageclf.io import write_json
from imageclf.paths import ProjectPaths, get_paths

# Where experiment workspaces live: inside the project (git-ignored by DVC's own .dvc/.gitignore),
# so the stages' `bin/python` finds the project's .venv by walking up.
WORKSPACES = Path(".dvc") / "tmp" / "flows"
# Written into the workspace before `dvc exp save` (a top-level metrics file in dvc.yaml), so
# `dvc exp show` has a column saying which orchestrator run made each experiment.
ORIGIN_FILE = ProjectPaths(Path()).run_origin
# DVC's advice to a person at a terminal, which means nothing inside a flow's log.
HINTS = re.compile(
    r"^\s*(To track the changes with git|git add |To enable auto staging|dvc config core\.autostage"
    r"|Use `dvc push`)"
)
SKIPPED = re.compile(r"Stage '[^']+' didn't change, skipping|is cached - skipping run")
# A stage's own failure (imageclf.stage.main): one message on stderr, then DVC's verdict.
STAGE_FAILED = re.compile(r"^stage \S+ failed: ")
DVC_ERROR = re.compile(r"^ERROR: ")


class ExperimentError(RuntimeError):
    """The experiment could not be set up, a stage failed, or it could not be saved."""


class StageFailed(ExperimentError):
    """A stage exited non-zero; its message is what the stage said (its one sentence), or for
    a crash the last line of its traceback."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.stage, str(self))


@dataclass(frozen=True)
class StageSpec:
    """A stage of dvc.yaml as the orchestrator needs it."""

    name: str
    retries: int  # dvc.yaml's `meta: {retries: N}`: only worth it where a retry can help


@dataclass(frozen=True)
class Workspace:
    project: Path  # the user's checkout
    root: Path  # the experiment's own clone
    name: str  # the DVC experiment name
    baseline: str  # the commit it starts from (the project's HEAD)


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    ran: bool  # False: DVC found nothing changed and skipped it
    seconds: float


def _git(cwd: Path, *args: str, input_: bytes | None = None) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=cwd, input=input_, capture_output=True, timeout=300, check=False
    )
    if proc.returncode != 0:
        raise ExperimentError(
            f"git {' '.join(args)} failed in {cwd}: {proc.stderr.decode(errors='replace').strip()}"
        )
    return proc.stdout.decode(errors="replace").strip()


def _dvc_bin() -> str:
    """The dvc next to this interpreter (the project's venv), not whichever is on PATH."""
    candidate = Path(sys.executable).parent / "dvc"
    return str(candidate) if candidate.is_file() else "dvc"


def pipeline_stages(root: Path) -> list[StageSpec]:
    """The stages of ``root``'s dvc.yaml in an order that respects their dependencies (ties
    broken by their order in the file), with the retries their ``meta`` allows."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = [s for s in repo.index.stages if getattr(s, "cmd", None)]
        position = {s.name: i for i, s in enumerate(stages)}
        graph = repo.index.graph.reverse(copy=True)  # edges now point dependency -> dependent
        graph.remove_nodes_from(
            [n for n in list(graph) if getattr(n, "name", None) not in position]
        )
        order = nx.lexicographical_topological_sort(graph, key=lambda s: position[s.name])
        return [StageSpec(s.name, int((s.meta or {}).get("retries", 0))) for s in order]


def experiment_name(label: str) -> str:
    """A valid, unique-enough DVC experiment (git ref) name from an orchestrator's run name."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", label).strip("-") or "run"
    return f"{cleaned}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_workspace(project: Path, name: str) -> Workspace:
    """Clone ``project`` into a workspace of its own that shares the project's DVC cache."""
    from dvc.repo import Repo

    project = project.resolve()
    if not (project / ".git").exists():
        raise ExperimentError(
            f"{project} is not a Git repository: DVC experiments need one with at least one "
            "commit (git init && git add -A && git commit -m init)."
        )
    try:
        baseline = _git(project, "rev-parse", "HEAD")
    except ExperimentError as exc:
        raise ExperimentError(
            f"{project} has no commit yet: commit once, then run again ({exc})."
        ) from exc
    with Repo(str(project)) as repo:
        cache_dir = str(repo.cache.local_cache_dir)
    root = project / WORKSPACES / name
    if root.exists():
        raise ExperimentError(f"workspace {root} already exists: choose another run name.")
    root.parent.mkdir(parents=True, exist_ok=True)
    _git(project, "clone", "--quiet", str(project), str(root))
    for key, fallback in (("user.name", "imageclf flow"), ("user.email", "flow@localhost")):
        # `dvc exp save` commits: a worker without a Git identity gets one in the clone only.
        if subprocess.run(["git", "config", key], cwd=root, capture_output=True).returncode:
            _git(root, "config", key, fallback)
    # The experiment starts from what the user sees: HEAD plus uncommitted changes to tracked
    # files (what `dvc exp run` takes too; untracked files stay out unless `git add`ed).
    changes = subprocess.run(
        ["git", "diff", "HEAD", "--binary"], cwd=project, capture_output=True, check=True
    ).stdout
    if changes.strip():
        _git(root, "apply", "--whitespace=nowarn", "-", input_=changes)
    local_config = project / ".dvc" / "config.local"
    if local_config.is_file():  # remotes' credentials and the like
        shutil.copy(local_config, root / ".dvc" / "config.local")
    _run_dvc(root, ["cache", "dir", "--local", cache_dir], os.environ.copy())
    _run_dvc(root, ["checkout", "--allow-missing", "--quiet"], os.environ.copy())
    return Workspace(project=project, root=root, name=name, baseline=baseline)


def write_params(workspace: Workspace, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply ``{"train.lr": 0.1}``-style overrides to the workspace's params.yaml.

    They are checked against the typed parameters first (a typo or a bad value fails here,
    before anything runs); the file is edited in place with its comments kept.
    """
    from ruamel.yaml import YAML

    applied = {k: v for k, v in overrides.items() if v is not None}
    path = get_paths(workspace.root).params
    apply_overrides(load_params(path), applied)  # raises ParamsError on a bad key or value
    yaml = YAML()
    yaml.preserve_quotes = True
    data = yaml.load(path.read_text())
    for dotted, value in applied.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = value
    with path.open("w") as handle:
        yaml.dump(data, handle)
    return applied


def stage_env(workspace: Workspace, tracking_uri: str) -> dict[str, str]:
    """The environment of the workspace's stage commands.

    The MLflow store is the project's (not a copy inside the workspace), the interpreter is this
    one, and DVC_EXP_NAME tells the train stage which experiment its MLflow run belongs to.
    """
    env = {k: v for k, v in os.environ.items() if k != "IMAGECLF_ROOT"}
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri,
        IMAGECLF_PYTHON=sys.executable,
        DVC_EXP_NAME=workspace.name,
        DVC_EXP_BASELINE_REV=workspace.baseline,
    )
    return env


def _stream_dvc(
    cwd: Path,
    args: list[str],
    env: Mapping[str, str],
    on_line: Callable[[str], None] | None = None,
) -> tuple[int, list[str]]:
    """Run dvc, streaming its output line by line; its exit status and every line."""
    proc = subprocess.Popen(
        [_dvc_bin(), *args],
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        if on_line and line.strip() and not HINTS.match(line):
            on_line(line)
    return proc.wait(), lines


def _run_dvc(
    cwd: Path,
    args: list[str],
    env: Mapping[str, str],
    on_line: Callable[[str], None] | None = None,
) -> str:
    """Run dvc, streaming its output line by line; raise with the tail of it on failure."""
    code, lines = _stream_dvc(cwd, args, env, on_line)
    if code != 0:
        tail = "\n".join(lines[-40:])
        raise ExperimentError(f"dvc {' '.join(args)} failed (exit {code}):\n{tail}")
    return "\n".join(lines)


def stage_message(stage: str, lines: list[str]) -> str:
    """What a failed ``dvc repro`` of ``stage`` has to say, once: the stage's own message
    (from ``stage NAME failed:`` to DVC's ERROR line), else the last line of its traceback,
    else DVC's error."""
    ends = [i for i, line in enumerate(lines) if DVC_ERROR.match(line)]
    end = ends[-1] if ends else len(lines)
    start = next((i for i, line in enumerate(lines[:end]) if STAGE_FAILED.match(line)), None)
    if start is not None:
        return "\n".join(lines[start:end]).strip()
    ran = next((i for i, line in enumerate(lines[:end]) if line.startswith("> ")), None)
    said = [line.strip() for line in lines[(ran or 0) + 1 : end] if line.strip()]
    if ran is not None and said:
        return f"stage {stage} crashed: {said[-1]} (its traceback is in the stage's log)"
    if ends:
        return f"stage {stage} could not run: {DVC_ERROR.sub('', lines[end]).strip()}"
    return f"stage {stage} failed: " + " ".join(line.strip() for line in lines[-5:])


def repro_stage(
    workspace: Workspace,
    stage: str,
    env: Mapping[str, str],
    on_line: Callable[[str], None] | None = None,
) -> StageOutcome:
    """``dvc repro --single-item <stage>`` in the workspace: DVC decides whether it runs.

    A failure raises :class:`StageFailed` with the stage's message; that message is not also
    passed to ``on_line``, so whoever reports the failure shows it once.
    """
    started = time.perf_counter()
    held = False

    def forward(line: str) -> None:
        nonlocal held
        held = held or bool(STAGE_FAILED.match(line))
        if on_line and not held:
            on_line(line)

    code, lines = _stream_dvc(workspace.root, ["repro", "--single-item", stage], env, forward)
    if code != 0:
        raise StageFailed(stage, stage_message(stage, lines))
    output = "\n".join(lines)
    ran = not SKIPPED.search(output)
    return StageOutcome(stage, ran, round(time.perf_counter() - started, 2))


def default_remote(root: Path) -> str | None:
    """The name of the checkout's default DVC remote (``core.remote``), None without one."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.config["core"].get("remote") or None


def pull_outputs(
    workspace: Workspace, remote: str, on_line: Callable[[str], None] | None = None
) -> bool:
    """Fetch and check out the outputs dvc.lock names from ``remote``; objects the remote does
    not have are no error: their stages run and produce them. False: no dvc.lock, nothing to
    pull (the pipeline never ran on this branch)."""
    if not (workspace.root / "dvc.lock").is_file():
        return False
    _run_dvc(workspace.root, ["pull", "--allow-missing", "-r", remote], os.environ, on_line)
    return True


def push_outputs(
    workspace: Workspace, remote: str, on_line: Callable[[str], None] | None = None
) -> None:
    """Upload the cached outputs of the workspace's dvc.lock to ``remote``."""
    _run_dvc(workspace.root, ["push", "-r", remote], os.environ, on_line)


def uncached_outputs(root: Path) -> list[str]:
    """The pipeline's `cache: false` outputs (metrics, plots) that exist: Git carries them, so
    `dvc exp save` must include them even where the branch does not track them yet."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        found = {
            str(Path(out.fs_path).relative_to(root))
            for stage in repo.index.stages
            for out in stage.outs
            if not out.use_cache and Path(out.fs_path).exists()
        }
    return sorted(found)


def save_experiment(workspace: Workspace, origin: dict[str, Any], message: str) -> str:
    """Save the workspace as DVC experiment ``workspace.name`` and publish it to the project.

    ``origin`` (e.g. the orchestrator's run id) goes into reports/run_origin.json, which
    dvc.yaml declares as metrics, so it becomes a column of ``dvc exp show``. Returns the
    experiment's commit.
    """
    write_json(workspace.root / ORIGIN_FILE, origin)
    env = os.environ.copy()
    include = [str(ORIGIN_FILE), *uncached_outputs(workspace.root)]
    _run_dvc(
        workspace.root,
        ["exp", "save", "--force", "-n", workspace.name, "-m", message]
        + [arg for path in include for arg in ("-I", path)],
        env,
    )
    # The outputs are already in the shared cache: only the Git ref travels.
    _run_dvc(
        workspace.root, ["exp", "push", "--no-cache", "--force", "origin", workspace.name], env
    )
    refs = _git(workspace.root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps")
    for line in refs.splitlines():
        sha, ref = line.split(" ", 1)
        if ref.endswith(f"/{workspace.name}"):
            return sha
    raise ExperimentError(f"dvc exp save did not create experiment {workspace.name}")


def remove_workspace(workspace: Workspace) -> None:
    """Delete the clone (its outputs live on in the shared cache and the experiment ref)."""
    shutil.rmtree(workspace.root, ignore_errors=True)

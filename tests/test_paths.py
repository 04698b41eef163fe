"""Every output path is named once, in ``imageclf.paths.ProjectPaths``, and dvc.yaml agrees.

dvc.yaml has to spell the paths too; these tests keep both spellings the same, and check that
what each stage module touches is what dvc.yaml says it depends on or produces (a stage writing
an undeclared file, or reading one, would make `dvc repro` skip or keep stale work).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from imageclf.paths import ProjectPaths
from tests.conftest import REPO

DVC: dict[str, Any] = yaml.safe_load((REPO / "dvc.yaml").read_text())
PATHS = ProjectPaths(REPO)
PROPERTIES: dict[str, str] = {
    name: getattr(PATHS, name).relative_to(REPO).as_posix()
    for name, value in vars(ProjectPaths).items()
    if isinstance(value, property)
}
# Properties a stage may use without dvc.yaml declaring them, and why.
UNDECLARED = {
    "params": "its keys are declared under `params:`",
    "reports": "the folder of many outputs, not an output",
    "models": "the folder of many outputs, not an output",
    "plots": "the folder of many outputs, not an output",
    "validation_failed": "written only when validation fails, and then the stage fails",
    "mlflow_db": "MLflow's store: runs are tracked there, not by DVC",
    "mlflow_artifacts": "MLflow's store: runs are tracked there, not by DVC",
}
# Folders of code, searched for output file names spelled outside imageclf/paths.py.
CODE = ("imageclf", "stages", "monitoring", "services", "benchmarks", "pipelines")


def entries(items: list[Any] | None) -> list[str]:
    """The paths of a dvc.yaml list whose items are ``path`` or ``{path: options}``."""
    out = []
    for item in items or []:
        out.extend(item if isinstance(item, dict) else [item])
    return [str(p) for p in out]


def outputs(stage: dict[str, Any]) -> list[str]:
    return entries(stage.get("outs")) + entries(stage.get("metrics")) + entries(stage.get("plots"))


def within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def referenced_properties(module: Path) -> set[str]:
    """The ProjectPaths properties ``module`` reads as ``paths.<name>``."""
    tree = ast.parse(module.read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "paths"
        and node.attr in PROPERTIES
    }


def stage_module(name: str) -> Path:
    found = re.search(r"-m\s+stages\.(\w+)", DVC["stages"][name]["cmd"])
    assert found, f"stage {name}: cannot tell its module from {DVC['stages'][name]['cmd']!r}"
    return REPO / "stages" / f"{found.group(1)}.py"


def declared_outputs() -> list[tuple[str, str]]:
    """(who, path) for every out, metric and plot in dvc.yaml, the top-level ones included."""
    found = [(name, p) for name, stage in DVC["stages"].items() for p in outputs(stage)]
    found += [("top-level metrics", p) for p in entries(DVC.get("metrics"))]
    found += [("top-level plots", p) for p in entries(DVC.get("plots"))]
    return found


@pytest.mark.parametrize(("who", "path"), declared_outputs())
def test_every_dvc_output_is_a_project_path(who: str, path: str) -> None:
    assert path in PROPERTIES.values(), (
        f"dvc.yaml ({who}) declares {path}, which no ProjectPaths property names: add one in "
        "imageclf/paths.py and write it through that property"
    )


@pytest.mark.parametrize("name", sorted(DVC["stages"]))
def test_stage_uses_only_paths_dvc_declares_for_it(name: str) -> None:
    """Each ``paths.<x>`` a stage module uses is a dep or an output of that stage in dvc.yaml
    (or inside one): reading an undeclared file, DVC would not rerun it when the file changes;
    writing one, DVC would neither cache nor restore it."""
    stage = DVC["stages"][name]
    declared = [str(d) for d in stage.get("deps", [])] + outputs(stage)
    undeclared = {
        prop: PROPERTIES[prop]
        for prop in referenced_properties(stage_module(name))
        if prop not in UNDECLARED and not any(within(PROPERTIES[prop], d) for d in declared)
    }
    assert not undeclared, f"stage {name} uses paths that dvc.yaml does not declare for it: " + (
        ", ".join(f"paths.{k} ({v})" for k, v in sorted(undeclared.items()))
    )


@pytest.mark.parametrize("name", sorted(DVC["stages"]))
def test_stage_writes_its_declared_outputs_through_project_paths(name: str) -> None:
    """Each output dvc.yaml declares for a stage is reached through a property its module uses
    (the output itself or a file inside it), not a path spelled in the stage."""
    used = [PROPERTIES[p] for p in referenced_properties(stage_module(name))]
    unnamed = [
        out for out in outputs(DVC["stages"][name]) if not any(within(path, out) for path in used)
    ]
    assert not unnamed, f"stage {name}: no ProjectPaths property of its module names {unnamed}"


def test_output_file_names_are_spelled_only_in_paths_module() -> None:
    """No code outside imageclf/paths.py spells an output's file name ("model.onnx",
    "reports/train.json"...): it uses the ProjectPaths property instead."""
    names = {Path(p).name for p in PROPERTIES.values() if Path(p).suffix}
    offenders = []
    for folder in CODE:
        for module in sorted((REPO / folder).rglob("*.py")):
            if module == REPO / "imageclf" / "paths.py":
                continue
            for node in ast.walk(ast.parse(module.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    text = node.value
                    if text in names or any(text.endswith("/" + n) for n in names):
                        rel = module.relative_to(REPO).as_posix()
                        offenders.append(f"{rel}:{node.lineno}: {text!r}")
    assert not offenders, "output file names spelled outside imageclf/paths.py:\n" + "\n".join(
        offenders
    )


def test_a_dvc_experiment_workspace_tracks_into_its_projects_store(tmp_path):
    """`dvc exp run --temp/--queue` and the training flow run stages in <project>/.dvc/tmp/...:
    their MLflow runs must land in the project's store, not in one deleted with the workspace."""
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    workspace = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    workspace.mkdir(parents=True)
    (workspace / "params.yaml").write_text("seed: 1\n")
    assert ProjectPaths(workspace).mlflow_db == tmp_path / "mlflow.db"
    assert ProjectPaths(workspace).mlflow_artifacts == tmp_path / "mlartifacts"
    assert ProjectPaths(tmp_path).mlflow_db == tmp_path / "mlflow.db"


def test_artifacts_of_a_sqlite_store_live_beside_it_whatever_the_cwd(tmp_path, monkeypatch):
    """Not MLflow's `./mlruns` default: a stage in a DVC workspace would lose them with it."""
    from imageclf.tracking import artifact_folder

    paths = ProjectPaths(tmp_path)
    assert artifact_folder(f"sqlite:///{paths.mlflow_db}", paths) == paths.mlflow_artifacts
    other = tmp_path / "elsewhere" / "runs.db"
    assert artifact_folder(f"sqlite:///{other}", paths) == other.parent / "mlartifacts"
    assert artifact_folder("http://127.0.0.1:5000", paths) is None

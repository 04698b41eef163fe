"""docs/course-map.md names only files, functions and tests that exist: a renamed test or a
moved module makes the map lie, and this test says which reference broke."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.conftest import REPO

MAP = REPO / "docs" / "course-map.md"
# `path/to/file.py`, `path/to/file.py::name`, and `::name` (in the file named just before it).
REFERENCE = re.compile(r"`((?:[\w./-]+/[\w.-]+\.\w+)?(?:::[\w\[\]-]+)*)`")


def references() -> list[tuple[str, str | None]]:
    """(file, name or None) for every code reference of the map, row by row."""
    found: list[tuple[str, str | None]] = []
    for row in MAP.read_text().splitlines():
        current: str | None = None
        for match in REFERENCE.finditer(row):
            path, _, name = match.group(1).partition("::")
            if path:
                current = path
            if current is None or not (path or name):
                continue
            found.append((current, name.split("[")[0].split("::")[-1] or None))
    return found


def pipeline_outputs() -> set[str]:
    """Files a DVC stage writes: a clean clone has none of them until `make run`, yet the map
    may name them, as long as dvc.yaml declares the stage that makes them."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs: set[str] = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                outs.add(next(iter(out)) if isinstance(out, dict) else out)
    return outs


def tracked_files() -> set[str]:
    """What a clean clone has: a file that exists only in this checkout must not count."""
    listing = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return set(listing.stdout.splitlines())


def test_every_file_function_and_test_the_map_names_exists():
    refs = references()
    assert len(refs) > 50  # the pattern still finds the map's references
    outputs, tracked = pipeline_outputs(), tracked_files()
    broken = []
    for path, name in refs:
        file = REPO / path
        if path not in tracked and not (name is None and path in outputs):
            broken.append(f"{path}: no such file, and no stage of dvc.yaml writes it")
        definition = rf"^\s*(?:async )?(?:def|class) {name}\b"
        if file.is_file() and name and not re.search(definition, file.read_text(), re.M):
            broken.append(f"{path}::{name}: no such function, class or test")
    assert not broken, "docs/course-map.md names what does not exist:\n" + "\n".join(broken)

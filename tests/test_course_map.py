"""docs/course-map.md names only files, functions and tests that exist: a renamed test or a
moved module makes the map lie, and this test says which reference broke."""

from __future__ import annotations

import re

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


def test_every_file_function_and_test_the_map_names_exists():
    refs = references()
    assert len(refs) > 50  # the pattern still finds the map's references
    broken = []
    for path, name in refs:
        file = REPO / path
        if not file.is_file():
            broken.append(f"{path}: no such file")
        definition = rf"^\s*(?:async )?(?:def|class) {name}\b"
        if file.is_file() and name and not re.search(definition, file.read_text(), re.M):
            broken.append(f"{path}::{name}: no such function, class or test")
    assert not broken, "docs/course-map.md names what does not exist:\n" + "\n".join(broken)

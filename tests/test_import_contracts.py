"""The layer rules of pyproject.toml's [tool.importlinter], checked by the real `lint-imports`.

CI runs pytest (`make test`), so this is where a broken layer rule fails the build; `make lint`
runs the same command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("imageclf", "stages", "pipelines", "services", "monitoring", "ops", "course")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.is_file(), (
        f"{LINT_IMPORTS} is missing: install the dev extra (make setup, or "
        "`.venv/bin/pip install -e '.[dev]'`)"
    )
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_project_keeps_its_import_contracts() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("importer", "imported", "contract"),
    [
        ("imageclf", "monitoring", "The library (imageclf) imports no stage"),
        ("imageclf", "stages", "The library (imageclf) imports no stage"),
        ("services", "stages", "Services import no stage"),
        ("stages", "pipelines", "Stages import no flow"),
        ("imageclf", "course", "The product imports no course-only code"),
        ("services", "course", "The product imports no course-only code"),
    ],
)
def test_contracts_catch_a_violation(
    tmp_path: Path, importer: str, imported: str, contract: str
) -> None:
    """The same contracts over stub packages with one forbidden import, function-local as the
    project's lazy imports are: `lint-imports` must report that contract broken."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "mod.py").write_text("")
    (tmp_path / importer / "bad.py").write_text(f"def f():\n    from {imported} import mod\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert broken and all(line.startswith(contract) for line in broken), result.stdout

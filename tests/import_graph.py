"""Which of the project's files a module runs, found statically (ast), for tests about dvc.yaml.

Every ``import`` and ``from ... import`` anywhere in a file counts, function-local (lazy) imports
and ``TYPE_CHECKING`` blocks included: a stage that imports a module only inside a function still
runs it. Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first, so those count
too. Only the project's own packages are followed; ``importlib`` calls are not seen.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PROJECT_PACKAGES = ("imageclf", "stages", "pipelines", "services", "monitoring")


def module_file(root: Path, dotted: str) -> Path | None:
    """The file of module or package ``dotted`` under ``root``; None if not one of ours."""
    parts = dotted.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def module_name(root: Path, path: Path) -> str:
    """``imageclf/data/store.py`` -> ``imageclf.data.store`` (a package: its own name)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, root: Path) -> set[str]:
    """Every dotted name an import statement in ``path`` may load (relative imports resolved).

    ``from a.b import c`` yields ``a.b`` and ``a.b.c``: ``c`` may be a submodule or a name in
    ``a.b``; :func:`files_run_by` keeps what exists as a file."""
    this = module_name(root, path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..a import b
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base == "__future__":
                continue
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def files_run_by(root: Path, dotted: str) -> set[Path]:
    """The project files importing ``dotted`` executes: each enclosing package, then it."""
    parts = dotted.split(".")
    found = (module_file(root, ".".join(parts[:i])) for i in range(1, len(parts) + 1))
    return {f for f in found if f is not None}


def import_closure(root: Path, start: Iterable[Path]) -> set[Path]:
    """``start`` and every project file they import, directly or not."""
    todo = [Path(p) for p in start]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path, root):
            todo.extend(files_run_by(root, name) - seen)
    return seen


def module_closure(root: Path, dotted: str) -> set[str]:
    """What ``python -m <dotted>`` runs of the project, as sorted-friendly posix paths."""
    return {
        p.relative_to(root).as_posix() for p in import_closure(root, files_run_by(root, dotted))
    }

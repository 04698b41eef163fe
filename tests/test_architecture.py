"""The library's inside: layers in one order, and no import cycle between its modules.

pyproject.toml's import-linter contracts (tests/test_import_contracts.py) keep imageclf/ from
importing stages, flows and services; this test is about the modules inside imageclf/. Imports
are found statically (ast), so a function-local (lazy) import counts like a module-level one: it
runs just the same, only later. ``import imageclf.a.b`` and ``from imageclf.a import b`` (``b`` a
module) count as importing ``imageclf.a.b``; the packages on the way run first, but that is not a
dependency of the importer. Imports inside a module's ``if __name__ == "__main__":`` block do
not count: they run only when the module is the program (``python -m ...``), never when the
library imports it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

PACKAGE = "imageclf"

# The library's layers, lowest first: a module imports only from its own layer and the layers
# below it, so each layer works (and is tested) without anything above it. Every top-level module
# and subpackage of imageclf/ is named once; a new one must be placed here on purpose.
LAYERS: tuple[tuple[str, ...], ...] = (
    # Base: building blocks with no model, dataset or training logic, which every layer uses.
    # paths and config (where files are; what params.yaml says), io (atomic writes), metric_names
    # (shared spellings), errors (the expected failures every layer raises), seeding, tracking
    # (MLflow set-up), onnx_runtime (sessions and metadata without torch: serving and the
    # registry read exported models through it).
    ("paths", "io", "metric_names", "config", "errors", "seeding", "tracking", "onnx_runtime"),
    # Getting images in (fetch, the on-disk dataset, transforms, loaders): needs no model.
    ("data",),
    # Architectures, pretrained backbones, checkpoints: tensors in, no dataset or loader.
    ("models",),
    # The training loop and its tools: fits models (models) on loaders (data).
    ("training",),
    # Scoring a trained model on the test split: models and data, never training.
    ("evaluation",),
    # MLflow champion/challenger over exported ONNX files; reads the test data to register them.
    ("registry",),
    # Export, optimization, distillation (it trains), inference and the champion watcher (it
    # follows the registry's champion).
    ("deploy",),
    # Programs on top of the library, imported by no library module: the stage CLI harness, the
    # reports for a person (summary reads the registry). Starting local server processes (for
    # team mode, tests, benchmarks) is not the library's: ops/local_servers.py.
    ("stage", "summary", "compare"),
)

HOW_TO_FIX = (
    "Move what the lower module needs down into its own layer or a base module, or pass it in "
    "as an argument; if the layer order itself is wrong, move the module in LAYERS and say why "
    "in the comment there."
)


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module names
    imported: str
    path: Path
    line: int

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root).as_posix()}:{self.line}"


def module_name(root: Path, path: Path) -> str:
    """``imageclf/data/store.py`` -> ``imageclf.data.store`` (a package: its own name)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(root: Path, dotted: str) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def deepest_module(root: Path, dotted: str) -> str:
    """The longest prefix of ``dotted`` that is a module or package (``a.b.name`` -> ``a.b``)."""
    parts = dotted.split(".")
    while len(parts) > 1 and not is_module(root, ".".join(parts)):
        parts.pop()
    return ".".join(parts)


def main_block_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes inside top-level ``if __name__ == "__main__":`` blocks."""
    skipped: set[int] = set()
    for statement in tree.body:
        if isinstance(statement, ast.If) and "__main__" in ast.unparse(statement.test):
            skipped.update(id(node) for node in ast.walk(statement))
    return skipped


def imports_in(root: Path, path: Path, package: str = PACKAGE) -> list[Import]:
    """Every import of ``package``'s modules in ``path``, wherever in the file it is."""
    this = module_name(root, path)
    here = this if path.name == "__init__.py" else this.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = main_block_nodes(tree)
    found: list[Import] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [deepest_module(root, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x, from ..a import b
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(
                    submodule if is_module(root, submodule) else deepest_module(root, base)
                )
        for target in targets:
            if target.split(".")[0] == package and target != this:
                found.append(Import(this, target, path, node.lineno))
    return list(dict.fromkeys(found))  # `from a import b, c` of one module: once


def library_imports(root: Path, package: str = PACKAGE) -> list[Import]:
    return [i for p in sorted((root / package).rglob("*.py")) for i in imports_in(root, p, package)]


def cycles(imports: Iterable[Import]) -> list[list[Import]]:
    """One cycle (as its imports, in order) for each group of modules that import each other."""
    graph: dict[str, dict[str, Import]] = {}
    for i in imports:
        graph.setdefault(i.importer, {}).setdefault(i.imported, i)
    # Tarjan's strongly connected components, then a shortest way round each.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for group in groups:
        start = min(group)
        paths: dict[str, list[Import]] = {start: []}
        todo = [start]
        while todo:  # breadth first from start, inside the group, back to start
            node = todo.pop(0)
            for nxt, edge in sorted(graph.get(node, {}).items()):
                if nxt == start:
                    found.append([*paths[node], edge])
                    todo = []
                    break
                if nxt in group and nxt not in paths:
                    paths[nxt] = [*paths[node], edge]
                    todo.append(nxt)
    return found


def layer_unit(dotted: str) -> str:
    """The LAYERS name of a module: ``imageclf.models.zoo`` -> ``models``; the root -> ``""``."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(
    imports: Iterable[Import], layers: Sequence[Sequence[str]]
) -> list[tuple[Import, str, str]]:
    """(import, importer's unit, imported unit) for each import of a higher layer."""
    rank = {unit: n for n, layer in enumerate(layers) for unit in layer}
    bad = []
    for i in imports:
        low, high = layer_unit(i.importer), layer_unit(i.imported)
        if low in rank and high in rank and rank[high] > rank[low]:
            bad.append((i, low, high))
    return bad


def package_units(root: Path, package: str = PACKAGE) -> set[str]:
    """The top-level modules and subpackages of ``package``: what LAYERS must place."""
    folder = root / package
    modules = {p.stem for p in folder.glob("*.py") if p.name != "__init__.py"}
    return modules | {p.parent.name for p in folder.glob("*/__init__.py")}


def describe_cycle(cycle: list[Import], root: Path) -> str:
    modules = " -> ".join([cycle[0].importer, *(i.imported for i in cycle)])
    steps = "; ".join(f"{i.where(root)} imports {i.imported}" for i in cycle)
    return f"{modules} ({steps})"


def describe_violation(violation: tuple[Import, str, str], root: Path) -> str:
    i, low, high = violation
    return f"{i.where(root)} imports {i.imported}: layer {low!r} sits below {high!r}"


def test_layers_place_every_module_of_the_library_once() -> None:
    named = [unit for layer in LAYERS for unit in layer]
    twice = sorted({unit for unit in named if named.count(unit) > 1})
    assert not twice, f"LAYERS names these more than once: {twice}"
    units = package_units(REPO)
    unplaced, stale = sorted(units - set(named)), sorted(set(named) - units)
    assert not unplaced, (
        f"imageclf/ has modules or subpackages that LAYERS in {Path(__file__).name} does not "
        f"place: {unplaced}. Add each to the lowest layer whose modules it needs, and say why."
    )
    assert not stale, f"LAYERS names modules imageclf/ no longer has: {stale}; remove them."


def test_the_library_has_no_import_cycle() -> None:
    found = cycles(library_imports(REPO))
    assert not found, (
        "Modules of imageclf/ import each other (directly or round a loop): "
        + " | ".join(describe_cycle(c, REPO) for c in found)
        + ". Break each loop: the lower module must not import the higher one. "
        + HOW_TO_FIX
    )


def test_each_layer_imports_only_from_itself_and_below() -> None:
    bad = layer_violations(library_imports(REPO), LAYERS)
    assert not bad, (
        "Imports from a higher layer (LAYERS, lowest first): "
        + "; ".join(describe_violation(v, REPO) for v in bad)
        + ". "
        + HOW_TO_FIX
    )


def test_the_package_root_imports_nothing_of_the_library() -> None:
    """imageclf/__init__.py runs before every module of the library, so whatever it imported
    would be a dependency of all of them, the base layer included."""
    root_imports = imports_in(REPO, REPO / PACKAGE / "__init__.py")
    assert not root_imports, [f"{i.where(REPO)} imports {i.imported}" for i in root_imports]


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks themselves, on a stub library: a function-local upward import is a layer
    violation and closes a cycle; a package importing its own submodules is not a cycle, and an
    import in a ``__main__`` block does not count."""
    files = {
        "imageclf/__init__.py": "",
        "imageclf/base.py": "",
        "imageclf/low/__init__.py": "from imageclf.low import a, b\n",
        "imageclf/low/a.py": (
            "from imageclf import base\n\n\ndef f():\n    from imageclf.high import c\n"
        ),
        "imageclf/low/b.py": "from . import a\n",
        "imageclf/high/__init__.py": "",
        "imageclf/high/c.py": (
            "import imageclf.low.b\n\nif __name__ == '__main__':\n    from imageclf import top\n"
        ),
        "imageclf/top.py": "from imageclf.high import c\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    imports = library_imports(tmp_path)
    assert {(i.importer, i.imported) for i in imports} == {
        ("imageclf.low", "imageclf.low.a"),
        ("imageclf.low", "imageclf.low.b"),
        ("imageclf.low.a", "imageclf.base"),
        ("imageclf.low.a", "imageclf.high.c"),
        ("imageclf.low.b", "imageclf.low.a"),
        ("imageclf.high.c", "imageclf.low.b"),
        ("imageclf.top", "imageclf.high.c"),
    }
    [cycle] = cycles(imports)
    assert {i.importer for i in cycle} == {"imageclf.low.a", "imageclf.high.c", "imageclf.low.b"}
    assert describe_cycle(cycle, tmp_path) == (
        "imageclf.high.c -> imageclf.low.b -> imageclf.low.a -> imageclf.high.c "
        "(imageclf/high/c.py:1 imports imageclf.low.b; imageclf/low/b.py:1 imports "
        "imageclf.low.a; imageclf/low/a.py:5 imports imageclf.high.c)"
    )
    layers = (("base",), ("low",), ("high",), ("top",))
    [violation] = layer_violations(imports, layers)
    assert describe_violation(violation, tmp_path) == (
        "imageclf/low/a.py:5 imports imageclf.high.c: layer 'low' sits below 'high'"
    )
    assert package_units(tmp_path) == {"base", "low", "high", "top"}

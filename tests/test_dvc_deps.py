"""dvc.yaml's code deps are exactly what each stage runs, so `dvc repro` reruns a stage whenever
(and only when) a module it imports changes. Found statically: see tests/import_graph.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.import_graph import module_closure

STAGES: dict[str, Any] = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_module(cmd: str) -> str:
    """``bin/python -m stages.train`` -> ``stages.train``."""
    found = re.search(r"(?:^|\s)-m\s+(stages\.\w+)(?:\s|$)", cmd)
    assert found, f"cannot tell which module {cmd!r} runs: expected `... -m stages.<name>`"
    return found.group(1)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_exactly_the_code_it_imports(name: str) -> None:
    stage = STAGES[name]
    module = stage_module(stage["cmd"])
    runs = module_closure(REPO, module)
    declared = {Path(d).as_posix() for d in stage.get("deps", []) if str(d).endswith(".py")}
    missing, unused = sorted(runs - declared), sorted(declared - runs)
    assert not missing, (
        f"dvc.yaml stage {name!r} runs {module}, which imports these files (directly or not) "
        f"that its deps do not list, so changing them would not rerun it: {missing}"
    )
    assert not unused, (
        f"dvc.yaml stage {name!r} lists code deps that {module} never imports (a change to them "
        f"reruns it for nothing): {unused}"
    )


def test_import_graph_follows_lazy_imports_and_packages(tmp_path: Path) -> None:
    """The helper itself: a function-local import, a relative one, and the __init__.py files of
    the packages on the way count; other packages' modules do not."""
    files = {
        "stages/__init__.py": "",
        "stages/one.py": "import os\n\ndef f():\n    from imageclf.data import store\n",
        "imageclf/__init__.py": "",
        "imageclf/data/__init__.py": "",
        "imageclf/data/store.py": "from .. import io as _io\nfrom numpy import array\n",
        "imageclf/io.py": "",
        "imageclf/unused.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert module_closure(tmp_path, "stages.one") == set(files) - {"imageclf/unused.py"}

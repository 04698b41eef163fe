"""Where the project keeps its files, decided in one place.

The project root is found deliberately (``IMAGECLF_ROOT``, else the nearest folder above the
current directory that holds ``params.yaml``), never by accident of the current directory, so a
copy of the repository (a test's temporary clone, a DVC experiment workspace) uses its own files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root(start: Path | None = None) -> Path:
    """Return the project root: ``$IMAGECLF_ROOT``, else the closest ancestor with params.yaml."""
    env = os.environ.get("IMAGECLF_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    return PACKAGE_DIR.parent


@dataclass(frozen=True)
class ProjectPaths:
    """Every path a stage reads or writes, relative to one root."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def dataset(self) -> Path:
        """The canonical dataset every later stage reads (see ``imageclf.data.store``)."""
        return self.root / "data" / "dataset"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def checkpoint(self) -> Path:
        return self.models / "model.pt"

    @property
    def onnx(self) -> Path:
        return self.models / "model.onnx"

    @property
    def optimized_checkpoint(self) -> Path:
        return self.models / "model.optimized.pt"

    @property
    def onnx_int8(self) -> Path:
        return self.models / "model.int8.onnx"

    @property
    def torchscript(self) -> Path:
        return self.models / "model.torchscript.pt"

    @property
    def loader_config(self) -> Path:
        return self.reports / "dataloader_check.json"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"


def get_paths(root: Path | None = None) -> ProjectPaths:
    """Paths under ``root`` (default: :func:`project_root`)."""
    return ProjectPaths((root or project_root()).resolve())

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
    """Every path a stage, service or report reads or writes, relative to one root.

    Each output is named here once; modules use these properties, never literal file names,
    and ``tests/test_paths.py`` checks them against the outs, metrics and plots of dvc.yaml.
    """

    root: Path

    def resolve(self, path: str | Path) -> Path:
        """A path from params.yaml: ``~`` expanded, relative ones under the project root."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.root / path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    # ------------------------------------------------------------------ data (download stage)
    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def fashion_mnist_raw(self) -> Path:
        """The verified Fashion-MNIST IDX files."""
        return self.raw / "fashion-mnist"

    @property
    def imagefolder_source(self) -> Path:
        """Where an ImageFolder dataset was read from, and its classes (provenance)."""
        return self.raw / "imagefolder.json"

    @property
    def dataset(self) -> Path:
        """The canonical dataset every later stage reads (see ``imageclf.data.store``)."""
        return self.root / "data" / "dataset"

    # ------------------------------------------------------------------------------ folders
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def models(self) -> Path:
        return self.root / "models"

    # ------------------------------------------------------------------------------- models
    @property
    def checkpoint(self) -> Path:
        return self.models / "model.pt"

    @property
    def checkpoints(self) -> Path:
        """Per-epoch state of a training run (resumable after a crash)."""
        return self.models / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

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
    def reference(self) -> Path:
        """The training-data summaries monitoring compares production with."""
        return self.models / "reference.npz"

    @property
    def examples(self) -> Path:
        """A few test images per class, registered with the model version for the web page."""
        return self.models / "examples.npz"

    # ------------------------------------------------------------- reports, one per stage
    @property
    def download_report(self) -> Path:
        return self.reports / "download.json"

    @property
    def validate_report(self) -> Path:
        return self.reports / "validate.json"

    @property
    def validation_docs(self) -> Path:
        """Great Expectations' context and Data Docs of the last passing validation."""
        return self.reports / "validation"

    @property
    def data_quality_report(self) -> Path:
        """Counts per kind of data problem (DVC metrics), written by validate."""
        return self.reports / "data_quality.json"

    @property
    def data_quality_html(self) -> Path:
        """The data problems a person reads: thumbnails of the offending files, by problem."""
        return self.reports / "data_quality.html"

    @property
    def validation_failed(self) -> Path:
        """A failed validation's report and Data Docs (not a DVC output: the stage fails)."""
        return self.reports / "validation-failed"

    @property
    def loader_config(self) -> Path:
        """The dataloader_check report, whose chosen loader setting train and profile use."""
        return self.reports / "dataloader_check.json"

    @property
    def train_report(self) -> Path:
        """Final training metrics and the MLflow run id later stages log to."""
        return self.reports / "train.json"

    @property
    def train_history(self) -> Path:
        return self.reports / "train_history.json"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files, one folder per training run (make tensorboard shows them)."""
        return self.root / "logs" / "tensorboard"

    @property
    def gradient_flow_plot(self) -> Path:
        """Mean and max |gradient| per layer, in forward order (train, debugging)."""
        return self.plots / "gradient_flow.png"

    @property
    def gradient_flow_report(self) -> Path:
        """The numbers behind the gradient-flow plot, with the layers flagged zero/vanishing."""
        return self.reports / "gradient_flow.json"

    @property
    def activation_stats_report(self) -> Path:
        """Per activation: mean, std, zeros, dead units, saturation (train, forward hooks)."""
        return self.reports / "activation_stats.json"

    @property
    def evaluate_report(self) -> Path:
        return self.reports / "evaluate.json"

    @property
    def confusion_matrix_plot(self) -> Path:
        return self.plots / "confusion_matrix.png"

    @property
    def top_losses_plot(self) -> Path:
        """The most confidently wrong test images, with true and predicted class."""
        return self.plots / "top_losses.png"

    @property
    def confused_pairs_plot(self) -> Path:
        return self.plots / "confused_pairs.png"

    @property
    def error_analysis_html(self) -> Path:
        """Both of the above and the per-class table in one self-contained page."""
        return self.reports / "errors.html"

    @property
    def error_analysis_report(self) -> Path:
        """The gallery's images and the confused pairs as data (not metrics: lists)."""
        return self.reports / "errors.json"

    @property
    def feature_maps_plot(self) -> Path:
        """A few conv layers' strongest channels for a few test images (evaluate)."""
        return self.plots / "feature_maps.png"

    @property
    def first_layer_filters_plot(self) -> Path:
        return self.plots / "first_layer_filters.png"

    @property
    def attention_rollout_plot(self) -> Path:
        """Where vit_tiny's prediction draws from, over the image (attention rollout)."""
        return self.plots / "attention_rollout.png"

    @property
    def profile_report(self) -> Path:
        return self.reports / "profile.json"

    @property
    def profile_dir(self) -> Path:
        return self.reports / "profile"

    @property
    def profile_trace(self) -> Path:
        """Chrome trace of the profiled training steps."""
        return self.profile_dir / "trace.json"

    @property
    def profile_top_ops(self) -> Path:
        return self.profile_dir / "top_ops.md"

    @property
    def optimize_report(self) -> Path:
        return self.reports / "optimize.json"

    @property
    def compressed_models(self) -> Path:
        """Compression candidates the optimize stage kept (TorchScript, one file each)."""
        return self.models / "compressed"

    @property
    def export_report(self) -> Path:
        return self.reports / "export.json"

    @property
    def benchmark_report(self) -> Path:
        return self.reports / "benchmark.json"

    @property
    def benchmark_plot(self) -> Path:
        return self.plots / "benchmark.png"

    @property
    def reference_report(self) -> Path:
        return self.reports / "reference.json"

    # -------------------------------------------------- outside the pipeline (CLIs, flows)
    @property
    def run_origin(self) -> Path:
        """Which orchestrator run made a DVC experiment (written by the training flow)."""
        return self.reports / "run_origin.json"

    @property
    def lr_find_report(self) -> Path:
        """The LR finder's curve and suggested train.lr (python -m tools.lr_find)."""
        return self.reports / "lr_find.json"

    @property
    def lr_find_plot(self) -> Path:
        """Loss against learning rate, the suggestion marked (python -m tools.lr_find)."""
        return self.reports / "lr_find.png"

    @property
    def monitoring_reports(self) -> Path:
        return self.reports / "monitoring"

    @property
    def monitoring_report_html(self) -> Path:
        return self.monitoring_reports / "report.html"

    @property
    def monitoring_verdict(self) -> Path:
        return self.monitoring_reports / "verdict.json"

    @property
    def compare_markdown(self) -> Path:
        return self.reports / "compare.md"

    @property
    def compare_csv(self) -> Path:
        return self.reports / "compare.csv"

    @property
    def store_root(self) -> Path:
        """Where the MLflow store lives: the root, except in a DVC experiment's temporary
        workspace (``<project>/.dvc/tmp/...``: `dvc exp run --temp/--queue`, the training flow),
        whose runs belong in its project's store, not in a copy deleted with the workspace."""
        for parent in self.root.parents:
            if parent.name == ".dvc" and (parent.parent / "params.yaml").is_file():
                return parent.parent
        return self.root

    @property
    def mlflow_db(self) -> Path:
        return self.store_root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.store_root / "mlartifacts"


def get_paths(root: Path | None = None) -> ProjectPaths:
    """Paths under ``root`` (default: :func:`project_root`)."""
    return ProjectPaths((root or project_root()).resolve())

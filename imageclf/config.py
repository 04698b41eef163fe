"""Typed view of ``params.yaml``: the one source of parameters for stages, flows and the service.

Unknown keys are errors (``extra="forbid"``), so a typo in params.yaml fails loudly instead of
silently training with a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    name: Literal["fashion_mnist", "imagefolder"] = "fashion_mnist"
    sources: list[str] = Field(default_factory=list)
    imagefolder_root: str | None = None
    image_size: int = Field(28, ge=8, le=512)
    channels: Literal[1, 3] = 1
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    download_timeout_s: float = Field(30.0, gt=0)


class ValidateParams(_Section):
    max_class_share_deviation: float = Field(0.02, ge=0.0, le=1.0)
    min_images_per_class: int = Field(1, ge=1)
    allow_train_test_duplicates: bool = False


class LoaderGrid(_Section):
    num_workers: list[int] = Field(default_factory=lambda: [0, 1, 2])
    pin_memory: list[bool] = Field(default_factory=lambda: [False])
    prefetch_factor: list[int] = Field(default_factory=lambda: [2])


class DataloaderCheckParams(_Section):
    overfit_steps: int = Field(60, ge=1)
    overfit_batch_size: int = Field(64, ge=2)
    overfit_lr: float = Field(0.003, gt=0)
    overfit_max_loss: float = Field(0.05, gt=0)
    throughput_batches: int = Field(30, ge=1)
    grid: LoaderGrid = Field(default_factory=LoaderGrid)


class TrainParams(_Section):
    model: str = "resnet_small"
    width: int = Field(32, ge=4)
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(256, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.2, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip_norm: float = Field(5.0, ge=0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    augment: bool = True
    threads: int = Field(0, ge=0)
    max_steps: int | None = Field(None, ge=1)
    mlflow_experiment: str = "imageclf"
    # Transfer learning: start the feature layers from this checkpoint (same model, width and
    # input channels; its classes may differ: the classifier is always new). Relative paths are
    # under the project root. Empty: train from scratch.
    init_from: str = ""
    # With init_from: train only the classifier for this many epochs (a linear probe on frozen
    # features), then fine-tune everything for the rest.
    freeze_epochs: int = Field(0, ge=0)


class EvaluateParams(_Section):
    batch_size: int = Field(1000, ge=1)
    tta_flip: bool = True


class ProfileParams(_Section):
    steps: int = Field(8, ge=1)
    warmup: int = Field(2, ge=0)
    batch_size: int = Field(256, ge=1)
    top_k_ops: int = Field(15, ge=1)


class OptimizeParams(_Section):
    calibration_images: int = Field(512, ge=1)
    max_accuracy_drop: float = Field(0.005, ge=0)
    eval_images: int = Field(10000, ge=1)


class ExportParams(_Section):
    opset: int = Field(18, ge=11)
    compare_images: int = Field(512, ge=1)
    max_abs_diff: float = Field(1e-4, gt=0)
    min_argmax_agreement: float = Field(0.999, ge=0, le=1)


class BenchmarkParams(_Section):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    warmup: int = Field(10, ge=0)
    iterations: int = Field(100, ge=1)
    threads: int = Field(0, ge=0)
    # Time torch.compile (Inductor, C++ codegen) too; compiling costs ~30 s per batch size here.
    torch_compile: bool = True


class RegistryParams(_Section):
    model_name: str = "imageclf-classifier"
    # A challenger is promoted when its test accuracy is at least champion's minus this.
    accuracy_tolerance: float = Field(0.002, ge=0, le=1)
    # ...and its ONNX Runtime FP32 p50 latency at batch 1 (benchmark stage) is within this budget.
    max_latency_ms: float = Field(10.0, gt=0)


class ServingParams(_Section):
    # Which registered model version is served: models:/<registry.model_name>@<alias>.
    alias: str = "champion"
    top_k: int = Field(3, ge=1)
    # Limits that turn abusive or broken input into a 4xx before it costs anything.
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(64, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=64)
    # Adaptive batching: wait at most max_latency_ms to gather up to max_batch_size images.
    max_batch_size: int = Field(64, ge=1)
    max_latency_ms: float = Field(5.0, ge=0)
    workers: int = Field(1, ge=1)
    threads: int = Field(0, ge=0)
    # Where uploads are spooled as request temp files (BentoML hands `Path` inputs to the API as
    # files); a RAM-backed directory avoids a filesystem journal write per request. Empty: the
    # system default. A missing or unwritable directory falls back to the default.
    upload_temp_dir: str = "/dev/shm"
    # One log line per request; the prediction log and /metrics record every request anyway.
    access_log: bool = False


class MonitoringParams(_Section):
    # Probability that a window of in-distribution inputs raises a drift alarm (all tests).
    alpha: float = Field(0.01, gt=0, lt=1)
    max_confidence_drop: float = Field(0.05, ge=0, le=1)
    min_window: int = Field(100, ge=10)
    # Training images summarized by the reference stage.
    reference_size: int = Field(5000, ge=100)
    # How often the served monitoring deployment checks the log.
    check_every_minutes: float = Field(60, gt=0)
    # The service's prediction log (relative paths are under the project root).
    log_predictions: bool = True
    log_path: str = "logs/predictions.sqlite"
    log_max_rows: int = Field(1_000_000, ge=1000)
    # Also keep each (model-sized) input image as PNG: for debugging drift, costs disk and CPU.
    log_images: bool = False


class Params(_Section):
    seed: int = 42
    data: DataParams = Field(default_factory=DataParams)
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate")
    dataloader_check: DataloaderCheckParams = Field(default_factory=DataloaderCheckParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    profile: ProfileParams = Field(default_factory=ProfileParams)
    optimize: OptimizeParams = Field(default_factory=OptimizeParams)
    export: ExportParams = Field(default_factory=ExportParams)
    benchmark: BenchmarkParams = Field(default_factory=BenchmarkParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    serving: ServingParams = Field(default_factory=ServingParams)
    monitoring: MonitoringParams = Field(default_factory=MonitoringParams)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ParamsError(ValueError):
    """params.yaml is missing or holds a value the project cannot use."""


def load_params(path: Path | str | None = None) -> Params:
    """Read and check params.yaml (default: the project's), raising one readable ParamsError."""
    from imageclf.paths import get_paths

    path = Path(path) if path else get_paths().params
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ParamsError(
            f"{path} does not exist: run from the project folder or set IMAGECLF_ROOT."
        ) from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ParamsError(
            f"{path} has invalid parameters: {problems}. Fix them and rerun."
        ) from exc


def apply_overrides(params: Params, overrides: dict[str, object]) -> Params:
    """A copy of ``params`` with dotted keys replaced ({"train.epochs": 3}), validated again.

    This is how a Prefect run changes parameters without touching the committed params.yaml.
    """
    raw = params.model_dump(by_alias=True)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise ParamsError(f"Unknown parameter section {dotted!r}.")
            node = node[key]
        if leaf not in node:
            raise ParamsError(f"Unknown parameter {dotted!r}.")
        node[leaf] = value
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ParamsError(f"Invalid parameter override: {problems}.") from exc

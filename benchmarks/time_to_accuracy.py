"""Time to accuracy: test accuracy against training seconds, with the course's CNN as a yardstick.

One invocation trains, on the same data and threads:

- the baseline: the course's own CNN, PyTorch's MNIST example (pytorch/examples, ``mnist/main.py``:
  conv32-conv64-maxpool-dropout-fc128-dropout-fc10, Adadelta lr 1.0, StepLR gamma 0.7, batch 64,
  14 epochs), reimplemented here line for line;
- one or more project configurations (params.yaml, plus ``--config`` files and ``--set``
  overrides), through the project's own training code (``train_model``, as the train stage
  calls it), with the test accuracy measured after every epoch (flip TTA exactly when the
  evaluate stage uses it), the evaluation kept off the training clock.

    python -m benchmarks.time_to_accuracy                       # baseline + params.yaml
    python -m benchmarks.time_to_accuracy --config configs/long.yaml --skip-default
    python -m benchmarks.time_to_accuracy --subset 0.1 --baseline-epochs 2 --set train.epochs=3

Writes reports/time_to_accuracy.json (``--out``) and prints a markdown table. Machines of this
kind differ 2x in speed and other work on the cores slows a run down, so every time is also given
in units of the baseline's epoch, measured in the same process (``baseline_epochs``), and each
run's speed as a ratio to the baseline's. ``--quiet-reference reports/train.json`` adds an
estimated clock: what the run would take on the quiet machine that wrote that train.json with the
default configuration (its images/s, scaled by this run's speed relative to the default run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imageclf.config import (
    Params,
    ParamsError,
    apply_overrides,
    ensemble_members,
    load_overrides,
    load_params,
    parse_assignments,
)
from imageclf.data.loaders import load_loader_settings
from imageclf.data.store import (
    Dataset,
    Split,
    channel_statistics,
    load_dataset,
    split_train_val,
    stratified_fraction,
)
from imageclf.data.transforms import symmetric_images, to_model_input
from imageclf.io import write_json
from imageclf.models.checkpoint import ModelSpec, save_checkpoint
from imageclf.models.ensemble import ensemble
from imageclf.paths import ProjectPaths
from imageclf.seeding import seed_everything
from imageclf.training.engine import (
    EpochMetrics,
    ema_validated_better,
    make_optimizer,
    predict_logits,
    set_threads,
    train_model,
)
from imageclf.training.spec import prepare_run

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
BASELINE = "baseline"
DEFAULT = "default"


# --- the baseline: pytorch/examples mnist/main.py -------------------------------------------


class CourseCNN(nn.Module):
    """``Net`` of pytorch/examples mnist/main.py, unchanged but for the input normalisation (the
    example's transforms.Normalize((0.1307,), (0.3081,)) holds MNIST's statistics; here the
    training split's, as the project's models use) and the fc1 size for other image sizes."""

    def __init__(
        self, mean: float, std: float, in_channels: int = 1, image_size: int = 28, classes: int = 10
    ) -> None:
        super().__init__()
        self.mean, self.std = mean, std
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        side = (image_size - 4) // 2  # two unpadded 3x3 convs, one 2x2 max-pool: 9216 at 28
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


@dataclass(frozen=True)
class BaselineRecipe:
    """The example's defaults (its argparse): batch 64, test batch 1000, 14 epochs, Adadelta
    lr 1.0, StepLR step 1 gamma 0.7. Only ``epochs`` is ever changed (``--baseline-epochs``)."""

    epochs: int = 14
    batch_size: int = 64
    test_batch_size: int = 1000
    lr: float = 1.0
    gamma: float = 0.7


def train_baseline(
    train: Split,
    recipe: BaselineRecipe,
    seed: int,
    on_epoch_end: Callable[[int, float, nn.Module], None],
) -> None:
    """The example's train loop (shuffled batches, nll_loss, Adadelta, StepLR per epoch);
    ``on_epoch_end(epoch, training seconds of the epoch, model)`` after each epoch."""
    seed_everything(seed)
    mean, std = channel_statistics(train.images)
    _, h, _, c = train.images.shape
    model = CourseCNN(mean[0], std[0], c, h, int(train.labels.max()) + 1)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=recipe.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=recipe.gamma)
    order = torch.Generator().manual_seed(seed)
    labels = torch.from_numpy(train.labels)
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for rows in torch.randperm(len(train), generator=order).split(recipe.batch_size):
            index = np.sort(rows.numpy())  # memory-mapped splits read sorted rows fastest
            data, target = to_model_input(train.images[index]), labels[index]
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            optimizer.step()
        scheduler.step()
        on_epoch_end(epoch, time.perf_counter() - t0, model)


# --- bookkeeping ----------------------------------------------------------------------------


@dataclass
class Run:
    """One training run: (cumulative training seconds, test accuracy) after every epoch."""

    name: str
    description: str
    train_images: int
    seconds: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    # An ensemble's members: index, seed, the run's epoch count when each finished, and each
    # member's own test accuracy.
    members: list[dict[str, Any]] = field(default_factory=list)

    def add(self, epoch_seconds: float, accuracy: float) -> None:
        self.seconds.append((self.seconds[-1] if self.seconds else 0.0) + epoch_seconds)
        self.accuracy.append(accuracy)
        log.warning(
            "%s epoch %d: %.1f s, test accuracy %.4f",
            self.name,
            len(self.seconds),
            self.seconds[-1],
            accuracy,
        )

    @property
    def epoch_seconds(self) -> list[float]:
        return [b - a for a, b in zip([0.0, *self.seconds[:-1]], self.seconds, strict=True)]

    @property
    def images_per_second(self) -> float:
        """Training throughput over the run (median epoch: robust to a burst of other work)."""
        return self.train_images / statistics.median(self.epoch_seconds)


def accuracy_at(seconds: Sequence[float], accuracy: Sequence[float], budget: float) -> float | None:
    """Test accuracy of the last epoch finished within ``budget`` seconds (what stopping there
    would keep); None when not even the first epoch fits."""
    inside = [a for s, a in zip(seconds, accuracy, strict=True) if s <= budget]
    return inside[-1] if inside else None


def time_to(seconds: Sequence[float], accuracy: Sequence[float], target: float) -> float | None:
    """Training seconds at the end of the first epoch whose test accuracy reaches ``target``."""
    return next((s for s, a in zip(seconds, accuracy, strict=True) if a >= target), None)


def summarize(
    run: Run,
    baseline_epoch_s: float,
    baseline_ips: float,
    budgets_s: Sequence[float],
    targets: Sequence[float],
    quiet_scale: float | None,
) -> dict[str, Any]:
    """A run's row: accuracy at each budget and seconds to each target, on this run's clock,
    in baseline epochs, and (``quiet_scale``: quiet seconds per measured second) on the
    estimated quiet clock."""
    units = [s / baseline_epoch_s for s in run.seconds]
    row: dict[str, Any] = {
        "name": run.name,
        "description": run.description,
        "epochs": len(run.seconds),
        "train_images": run.train_images,
        "final_accuracy": run.accuracy[-1],
        "best_accuracy": max(run.accuracy),
        "train_seconds": run.seconds[-1],
        "train_baseline_epochs": units[-1],
        "images_per_second": run.images_per_second,
        "speed_vs_baseline": run.images_per_second / baseline_ips,
        **({"members": run.members} if run.members else {}),
        "history": [
            {"epoch": i + 1, "train_seconds": s, "baseline_epochs": u, "test_accuracy": a}
            for i, (s, u, a) in enumerate(zip(run.seconds, units, run.accuracy, strict=True))
        ],
        "accuracy_at": {},
        "time_to": {},
    }
    clocks = {"measured_s": run.seconds}
    if quiet_scale is not None:  # every epoch at the run's median pace: load bursts drop out
        quiet_epoch = statistics.median(run.epoch_seconds) * quiet_scale
        clocks["quiet_estimate_s"] = [(i + 1) * quiet_epoch for i in range(len(run.seconds))]
    for budget in budgets_s:
        row["accuracy_at"][f"{budget / 60:g}min"] = {
            clock: accuracy_at(values, run.accuracy, budget) for clock, values in clocks.items()
        } | {
            # the budget measured in baseline epochs of the quiet reference, when there is one
            "in_baseline_epochs": budget / baseline_epoch_s / (quiet_scale or 1.0),
        }
    for target in targets:
        reached = time_to(run.seconds, run.accuracy, target)
        quiet = clocks.get("quiet_estimate_s")
        row["time_to"][f"{target:.4f}"] = {
            "measured_s": reached,
            "baseline_epochs": reached / baseline_epoch_s if reached is not None else None,
            "quiet_estimate_s": time_to(quiet, run.accuracy, target) if quiet else None,
        }
    return row


def markdown(report: dict[str, Any]) -> str:
    """The summary table a person reads (full histories are in the JSON)."""
    rows = report["runs"]
    budgets = list(rows[0]["accuracy_at"])
    targets = list(rows[0]["time_to"])
    clock = "quiet_estimate_s" if report.get("quiet_reference") else "measured_s"
    head = (
        ["run", "epochs", "train s", "baseline epochs", "speed vs baseline", "final acc"]
        + [f"acc @ {b}" for b in budgets]
        + [f"s to {float(t):.1%}" for t in targets]
    )

    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["name"],
            str(row["epochs"]),
            f"{row['train_seconds']:.0f}",
            f"{row['train_baseline_epochs']:.1f}",
            f"{row['speed_vs_baseline']:.2f}",
            f"{row['final_accuracy']:.4f}",
            *(cell(row["accuracy_at"][b][clock], ".4f") for b in budgets),
            *(cell(row["time_to"][t][clock], ".0f") for t in targets),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"Budgets and times on the estimated quiet clock ({report['quiet_reference']})."
        if report.get("quiet_reference")
        else "Budgets and times on this run's measured clock."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


# --- runs -----------------------------------------------------------------------------------


def configurations(
    base: Params, configs: Sequence[Path], overrides: dict[str, Any], skip_default: bool
) -> list[tuple[str, str, Params]]:
    """(name, description, params) of each project run: params.yaml (``default``) and each
    config file over it, all with ``overrides`` last; errors name the file or key."""
    runs = []
    if not skip_default:
        runs.append((DEFAULT, "the project parameters", apply_overrides(base, overrides)))
    for path in configs:
        merged = {**load_overrides(path), **overrides}
        runs.append((Path(path).stem, str(path), apply_overrides(base, merged)))
    if not runs:
        raise ParamsError("--skip-default without --config leaves no project run to time.")
    suffix = "".join(f" {k}={v}" for k, v in overrides.items())
    return [(name, description + suffix, params) for name, description, params in runs]


def subset(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """A stratified ``fraction`` of both splits (quick checks; accuracies are then lower)."""
    if fraction >= 1.0:
        return dataset
    return Dataset(
        dataset.train.subset(stratified_fraction(dataset.train.labels, fraction, seed)),
        dataset.test.subset(stratified_fraction(dataset.test.labels, fraction, seed)),
        dataset.meta,
    )


def scored_accuracy(
    model: nn.Module, test: Split, params: Params, tta: bool | None = None
) -> float:
    """Accuracy on ``test`` as the evaluate stage measures it (its test-time augmentation when
    it would use one, unless ``tta`` says otherwise)."""
    views = params.tta_views if tta is None or tta else 1
    logits = predict_logits(model, test.images, params.evaluate.batch_size, views=views)
    return float((logits.argmax(1).numpy() == test.labels).mean())


def run_baseline(dataset: Dataset, train: Split, params: Params, epochs: int) -> Run:
    recipe = BaselineRecipe(epochs=epochs)
    run = Run(
        BASELINE,
        f"course CNN (pytorch/examples mnist), Adadelta, {epochs} epochs",
        len(train),
    )

    def after_epoch(_epoch: int, seconds: float, model: nn.Module) -> None:
        run.add(seconds, scored_accuracy(model, dataset.test, params, tta=False))

    train_baseline(train, recipe, params.seed, after_epoch)
    return run


class EnsembleScore:
    """Test accuracy of an ensemble as it grows, member by member, without rescoring the
    finished members: their log-probabilities per test view (the image, and its symmetric
    views with test-time augmentation) are summed once, and each new model is scored together
    with them, exactly as the ensemble model (``imageclf.models.ensemble``) under ``FlipTTA``
    scores."""

    def __init__(self, test: Split, params: Params) -> None:
        self.labels = torch.from_numpy(test.labels)
        self.views = symmetric_images(test.images, params.tta_views)
        self.batch_size = params.evaluate.batch_size
        self.sums: list[torch.Tensor] = [torch.zeros(0) for _ in self.views]
        self.members = 0

    def log_probs(self, model: nn.Module) -> list[torch.Tensor]:
        return [predict_logits(model, v, self.batch_size).log_softmax(1) for v in self.views]

    def accuracy(self, model: nn.Module | None = None) -> float:
        """The finished members' ensemble with ``model`` as one more member (None: without)."""
        views, count = self.sums, self.members
        if model is not None:
            extra = self.log_probs(model)
            views = [e + s if count else e for s, e in zip(views, extra, strict=True)]
            count += 1
        scores = sum((v / count).log_softmax(1) for v in views) / len(views)
        return float((scores.argmax(1) == self.labels).float().mean())

    def add(self, model: nn.Module) -> None:
        """``model`` is a finished member."""
        extra = self.log_probs(model)
        self.sums = [e + s if self.members else e for s, e in zip(self.sums, extra, strict=True)]
        self.members += 1


def run_project(
    name: str,
    description: str,
    params: Params,
    dataset: Dataset,
    paths: ProjectPaths,
    save_to: Path | None = None,
) -> Run:
    """Train as the train stage does (same split, statistics, seed, loader settings, val).

    An ensemble (``train.ensemble``) is one run whose epochs are its members' epochs one after
    another, on one clock; after each, the test accuracy is that of the finished members with
    the current member's weights as they stand (what stopping there would keep).

    With ``save_to``, the weights the last epoch scored (the EMA when it validated better, as
    the train stage keeps; for an ensemble, the ensemble of them) are written there as a
    checkpoint: an hour-long run's model can then be evaluated, exported or used as a
    distillation teacher without training it again."""
    members = ensemble_members(params)
    if len(members) == 1:
        run, kept, spec = train_project_model(name, description, params, dataset, paths, None)
    else:
        score = EnsembleScore(dataset.test, params)
        kept_models, run = [], None
        for index, member in enumerate(members):
            run, kept, spec = train_project_model(
                name, f"{description} (ensemble of {len(members)})", member, dataset, paths,
                score.accuracy, run,
            )  # fmt: skip
            score.add(kept)
            kept_models.append(kept)
            run.members.append(
                {"member": index, "seed": member.seed, "epochs": len(run.seconds),
                 "accuracy": scored_accuracy(kept, dataset.test, params)}
            )  # fmt: skip
        kept = ensemble(kept_models)
        spec = replace(spec, members=len(members))
    if save_to is not None:
        extra = {"epoch": len(run.accuracy), "test_accuracy": run.accuracy[-1]}
        save_checkpoint(save_to / f"{name}.pt", kept, spec, extra=extra)
    return run


def train_project_model(
    name: str,
    description: str,
    params: Params,
    dataset: Dataset,
    paths: ProjectPaths,
    score: Callable[[nn.Module], float] | None,
    run: Run | None = None,
) -> tuple[Run, nn.Module, ModelSpec]:
    """One training run of :func:`run_project`, its epochs appended to ``run`` (a new one when
    None) and scored by ``score`` (default: the evaluate stage's accuracy); returns the run, the
    weights the train stage would keep and their spec."""
    score = score or (lambda model: scored_accuracy(model, dataset.test, params))
    prepared = prepare_run(params, dataset, paths)
    model = prepared.model
    run = run or Run(name, description, len(prepared.train))
    pending: dict[str, Any] = {}

    def on_epoch_end(metrics: EpochMetrics, model_: nn.Module, _opt: Any) -> None:
        # metrics.seconds is the epoch's training loop alone: validation and this test pass
        # run after its clock stopped.
        pending.update(metrics=metrics, raw=score(model_), kept=model_)
        if params.train.ema_decay <= 0:
            run.add(metrics.seconds, pending["raw"])

    def save_state(state: dict[str, Any]) -> None:
        """With train.ema_decay: the engine hands the EMA weights out only in its resumable
        state; score the weights the train stage would keep (EMA when it validates better)."""
        metrics = pending["metrics"]
        if state.get("ema") is None or not ema_validated_better(metrics):
            pending["kept"] = model
            run.add(metrics.seconds, pending["raw"])
            return
        averaged = copy.deepcopy(model)
        averaged.load_state_dict(state["ema"]["module"])
        pending["kept"] = averaged
        run.add(metrics.seconds, score(averaged))

    train_model(
        model,
        prepared.train,
        prepared.val,
        params.train,
        seed=params.seed,
        loader=load_loader_settings(paths.loader_config),
        on_epoch_end=on_epoch_end,
        progress=False,
        save_state=save_state if params.train.ema_decay > 0 else None,
    )
    return run, pending["kept"], prepared.spec


# --- step times -----------------------------------------------------------------------------

STEP_VARIANTS = ("fp32", "bf16", "contiguous", "batch x2")


def step_time_ratios(
    params: Params, image_shape: tuple[int, int, int], classes: int, rounds: int, steps: int
) -> dict[str, list[float]]:
    """Training-step throughput of ``params.train``'s model in each of STEP_VARIANTS (bf16
    autocast, NCHW instead of channels_last, twice the batch), as a ratio to the plain fp32
    channels_last step, per round. The variants take turns within each round, so a burst of
    other work on the cores slows them alike and the ratios stay meaningful."""
    c, h, w = image_shape
    cfg = params.train
    runners = {}
    for variant in STEP_VARIANTS:
        seed_everything(params.seed)
        spec = ModelSpec(cfg.model, cfg.width, classes, c, h, tuple(map(str, range(classes))),
                         [0.5] * c, [0.25] * c, "")  # fmt: skip
        model = spec.build().train()
        fmt = torch.contiguous_format if variant == "contiguous" else torch.channels_last
        model.to(memory_format=fmt)
        batch = cfg.batch_size * (2 if variant == "batch x2" else 1)
        images = torch.rand(batch, c, h, w).contiguous(memory_format=fmt)
        labels = torch.randint(0, classes, (batch,))
        optimizer = make_optimizer(model, cfg)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

        def step(model=model, images=images, labels=labels, optimizer=optimizer,
                 criterion=criterion, bf16=variant == "bf16") -> None:  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()

        step()  # warm-up: oneDNN picks its kernels on the first call
        runners[variant] = (step, batch)
    ratios: dict[str, list[float]] = {v: [] for v in STEP_VARIANTS}
    for _ in range(rounds):
        speed = {}
        for variant, (step, batch) in runners.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            speed[variant] = steps * batch / (time.perf_counter() - t0)
        for variant in STEP_VARIANTS:
            ratios[variant].append(speed[variant] / speed["fp32"])
    return ratios


def step_table(results: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| run | " + " | ".join(STEP_VARIANTS) + " |", "|---|" + "---:|" * len(STEP_VARIANTS)]
    for name, ratios in results.items():
        cells = [f"{min(r):.2f}-{max(r):.2f}" for r in ratios.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nImages/s of a training step as a ratio to fp32 channels_last.\n"


def quiet_scale(reference: Path, default: Run | None) -> float:
    """Quiet seconds per measured second: the reference train.json's images/s (the default
    configuration on a quiet machine) against the default run's here."""
    if default is None:
        raise ParamsError("--quiet-reference scales by the default run: drop --skip-default.")
    try:
        quiet_ips = float(json.loads(reference.read_text())["images_per_second"])
    except (OSError, ValueError, KeyError) as exc:
        raise ParamsError(
            f"--quiet-reference {reference}: not a train.json with images_per_second ({exc})."
        ) from exc
    return default.images_per_second / quiet_ips


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, action="append", default=[], help="a config file")
    parser.add_argument("--set", "-S", action="append", default=[], help="KEY=VALUE override")
    parser.add_argument("--skip-default", action="store_true", help="no params.yaml run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (issue: 2 cores)")
    parser.add_argument("--budget-minutes", type=float, nargs="+", default=[5.0, 10.0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.935, 0.943, 0.953])
    parser.add_argument("--baseline-epochs", type=int, default=BaselineRecipe.epochs)
    parser.add_argument("--subset", type=float, default=1.0, help="share of train and test")
    parser.add_argument("--quiet-reference", type=Path, help="train.json of a quiet default run")
    parser.add_argument("--root", type=Path, default=REPO, help="project folder (its dataset)")
    parser.add_argument("--out", type=Path, help="JSON report (default reports/...)")
    parser.add_argument(
        "--save-models", type=Path, metavar="DIR",
        help="write each project run's final weights as DIR/<run>.pt (a checkpoint)",
    )  # fmt: skip
    parser.add_argument(
        "--step-times", type=int, default=0, metavar="ROUNDS",
        help="instead of training: step-time ratios of fp32/bf16/NCHW/2x batch, this many rounds",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not 0 < args.subset <= 1 or args.baseline_epochs < 1 or args.threads < 1:
        parser.error("--subset must be in (0, 1], --baseline-epochs and --threads at least 1.")
    if args.save_models is not None and args.save_models.exists() and not args.save_models.is_dir():
        raise ParamsError(f"--save-models {args.save_models} is a file: name a folder.")
    if args.quiet_reference and args.skip_default:  # before any training, not after it
        raise ParamsError("--quiet-reference scales by the default run: drop --skip-default.")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    paths = ProjectPaths(args.root)
    base = load_params(paths.params)
    runs_to_do = configurations(base, args.config, parse_assignments(args.set), args.skip_default)
    dataset = subset(load_dataset(paths.dataset), args.subset, base.seed)
    set_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # refused once parallel work ran (in a test)
        torch.set_num_interop_threads(1)
    if args.step_times > 0:
        return step_times_report(args, argv, runs_to_do, dataset, paths)
    train_idx, _ = split_train_val(dataset.train.labels, base.data.val_fraction, base.seed)
    baseline = run_baseline(dataset, dataset.train.subset(train_idx), base, args.baseline_epochs)
    runs = [baseline] + [
        run_project(*spec, dataset, paths, args.save_models) for spec in runs_to_do
    ]
    baseline_epoch_s = statistics.median(baseline.epoch_seconds)
    default = next((r for r in runs if r.name == DEFAULT), None)
    scale = quiet_scale(args.quiet_reference, default) if args.quiet_reference else None
    budgets = [m * 60 for m in args.budget_minutes]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m benchmarks.time_to_accuracy " + " ".join(argv),
        "threads": args.threads,
        "subset": args.subset,
        "torch": torch.__version__,
        "baseline_epoch_seconds": baseline_epoch_s,
        "quiet_reference": str(args.quiet_reference) if args.quiet_reference else None,
        "quiet_seconds_per_measured_second": scale,
        "runs": [
            summarize(r, baseline_epoch_s, baseline.images_per_second, budgets, args.targets, scale)
            for r in runs
        ],
    }
    table = markdown(report)
    return publish(report, table, args.out or paths.reports / "time_to_accuracy.json")


def step_times_report(
    args: argparse.Namespace,
    argv: list[str],
    runs: list[tuple[str, str, Params]],
    dataset: Dataset,
    paths: ProjectPaths,
) -> dict[str, Any]:
    results = {
        name: step_time_ratios(
            params, dataset.image_shape, dataset.num_classes, args.step_times, args.steps
        )
        for name, _, params in runs
    }
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m benchmarks.time_to_accuracy " + " ".join(argv),
        "threads": args.threads,
        "torch": torch.__version__,
        "step_time_ratios": results,
    }
    return publish(report, step_table(results), args.out or paths.reports / "step_times.json")


def publish(report: dict[str, Any], table: str, out: Path) -> dict[str, Any]:
    """The JSON report, the table beside it (.md), the table on stdout."""
    write_json(out, report)
    out.with_suffix(".md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, FileNotFoundError) as exc:  # what to fix, without a traceback
        sys.exit(f"time_to_accuracy: {exc}")

"""torch.profiler over a few real training steps: where does step time go?

The step is the same as in ``imageclf.training.engine`` (the loader with the train.augment
policy and train.class_balance, forward, backward, step), with each phase wrapped in
``record_function`` so the Chrome trace reads like the code. Augmentation happens inside the
loader (in its workers, if any), so it is part of the data wait; without workers its own
``augment`` range shows inside ``data_wait`` in the trace. The share of time spent waiting for
data is measured with wall-clock timers around ``next(loader)``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function, schedule
from torch.utils.data import DataLoader

from imageclf.config import ProfileParams, TrainParams
from imageclf.data.loaders import LoaderSettings, loss_weights, make_loader
from imageclf.data.store import Split
from imageclf.models.zoo import split_head
from imageclf.seeding import seed_everything
from imageclf.training.engine import make_optimizer


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    """The engine's step with each phase a named range, so the trace reads like the code."""
    with record_function("to_channels_last"):
        images = images.contiguous(memory_format=torch.channels_last)
    with record_function("forward"):
        loss = criterion(model(images), labels)
    with record_function("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with record_function("optimizer_step"):
        optimizer.step()


def _profiled_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    data: DataLoader,
    cfg: ProfileParams,
    trace_path: Path,
) -> tuple[float, float, Any]:
    """The profiled loop: writes the trace; returns data-wait and step seconds, op averages."""
    iterator = iter(data)
    wait_s = step_s = 0.0
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    captured: list[Any] = []

    def on_trace_ready(prof: profile) -> None:
        # Events are cleared when the active cycle ends: take the table and the trace here.
        prof.export_chrome_trace(str(trace_path))
        captured.append(prof.key_averages())

    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=cfg.warmup, active=cfg.steps, repeat=1),
        on_trace_ready=on_trace_ready,
        record_shapes=True,
        profile_memory=True,
    ) as prof:
        for step in range(cfg.warmup + cfg.steps):
            started = time.perf_counter()
            with record_function("data_wait"):
                try:
                    images, labels = next(iterator)
                except StopIteration:
                    iterator = iter(data)
                    images, labels = next(iterator)
            waited = time.perf_counter() - started
            _train_step(model, optimizer, criterion, images, labels)
            elapsed = time.perf_counter() - started
            if step >= cfg.warmup:
                wait_s += waited
                step_s += elapsed
            prof.step()
    if not captured:
        raise RuntimeError("the profiler recorded no cycle; raise profile.steps")
    return wait_s, step_s, captured[0]


def _top_ops(averages: Any, cfg: ProfileParams) -> list[dict[str, Any]]:
    """The ops with the most self CPU time, per measured step, for the report's table."""
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in averages) or 1.0
    return [
        {
            "op": e.key,
            "calls": int(e.count),
            "self_cpu_ms": e.self_cpu_time_total / 1000 / cfg.steps,
            "cpu_total_ms": e.cpu_time_total / 1000 / cfg.steps,
            "self_cpu_share": e.self_cpu_time_total / total_self,
        }
        for e in rows
        if not e.key.startswith("ProfilerStep")
    ][: cfg.top_k_ops]


def profile_training(
    model: nn.Module,
    split: Split,
    cfg: ProfileParams,
    train_cfg: TrainParams,
    loader: LoaderSettings,
    trace_path: Path,
    seed: int,
) -> dict[str, Any]:
    """Profile ``cfg.steps`` steps after ``cfg.warmup``, write a Chrome trace, return numbers."""
    seed_everything(seed)
    model.train().to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, train_cfg)
    criterion = nn.CrossEntropyLoss(
        weight=loss_weights(train_cfg, split.labels, split_head(model)[1].out_features),
        label_smoothing=train_cfg.label_smoothing,
    )
    data = make_loader(
        split,
        cfg.batch_size,
        shuffle=True,
        seed=seed,
        settings=loader,
        augment=train_cfg.augment,
        balance=train_cfg.class_balance == "sampler",
    )
    wait_s, step_s, averages = _profiled_steps(model, optimizer, criterion, data, cfg, trace_path)
    return {
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "step_ms": 1000 * step_s / cfg.steps,
        "data_wait_ms": 1000 * wait_s / cfg.steps,
        "data_wait_share": wait_s / max(step_s, 1e-9),
        "images_per_second": cfg.batch_size * cfg.steps / max(step_s, 1e-9),
        "threads": torch.get_num_threads(),
        "top_ops": _top_ops(averages, cfg),
    }


def top_ops_markdown(top: list[dict[str, Any]]) -> str:
    lines = [
        "| op | calls | self CPU ms/step | total CPU ms/step | self share |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in top:
        lines.append(
            f"| `{row['op']}` | {row['calls']} | {row['self_cpu_ms']:.2f} | "
            f"{row['cpu_total_ms']:.2f} | {100 * row['self_cpu_share']:.1f}% |"
        )
    return "\n".join(lines) + "\n"

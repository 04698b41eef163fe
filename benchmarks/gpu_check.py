"""One-shot check of the project's GPU code paths on a lent CUDA machine (minutes of device time,
so everything is measured in one run and reported as ratios against a baseline of that run).

    python3 benchmarks/gpu_check.py --out DIR [--quick] [--budget-s 220]

Sections, each written to ``DIR/gpu_check.json`` as soon as it finishes (a run cut short by a
timeout still leaves the sections it got through):

* ``engine``     :func:`imageclf.training.engine.train_model` itself on synthetic
                 Fashion-MNIST-shaped data. On CUDA it always trains channels_last with fp16
                 autocast and a GradScaler (it has no switch for fp32 or bf16), data from a CPU
                 DataLoader.
* ``precision``  the script's loop, not the engine's: the same model, optimizer, LR schedule,
                 loss and clipping as ``train_model``, with data already on the device, so that
                 fp32 / bf16 / fp16+GradScaler / channels_last can be compared (the engine
                 cannot be told to run them). Each step also reads its loss and correct count
                 with ``.item()``, as the engine once did every step; the engine now keeps its
                 running sums on the device and reads them once an epoch (a step's loss and
                 grad norm only when an observer looks; ``check_finite`` still reads one bool
                 per micro-batch). The "no per-step .item() sync" variant drops those reads.
* ``compile``    torch.compile: compile time and steady-state images/s against eager, for
                 inference (default and reduce-overhead) and for the engine's training step.
* ``ddp``        DDP over NCCL through :mod:`imageclf.training.distributed`: two ranks on the
                 one GPU (NCCL usually refuses: "Duplicate GPU"), then world_size=1 NCCL if so,
                 and two ranks on the GPU over gloo running ``train_model`` (the project's DDP
                 path).
* ``onnx``       :func:`imageclf.deploy.export.export_onnx` of the trained serving graph, the
                 project's :func:`~imageclf.deploy.export.verify_onnx`, ONNX Runtime providers
                 and timings.

Without CUDA it runs a tiny plan and marks CUDA-only sections "skipped: no CUDA", so it can be
smoke-tested anywhere. It imports only library modules free of MLflow/DVC/Prefect/BentoML, so
the GPU machine needs just pydantic and friends besides torch (see ``.whl/``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from imageclf.config import Params, TrainParams, apply_overrides, load_params
from imageclf.data.store import Split
from imageclf.deploy.export import export_onnx, verify_onnx
from imageclf.models.zoo import ServingGraph, build_model
from imageclf.onnx_runtime import INPUT_NAME, ort_session
from imageclf.training import distributed
from imageclf.training.engine import make_optimizer, make_scheduler, train_model

NUM_CLASSES = 10  # Fashion-MNIST
NO_CUDA = "skipped: no CUDA"
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Plan:
    """Step counts: the full plan fits a few minutes of an H200, the quick one a CPU smoke test."""

    images: int
    steps: int  # timed steps per repeat
    warmup: int
    repeats: int  # the median of these repeats is reported (and their spread)
    engine_steps: int
    ddp_steps: int
    infer_iters: int
    ort_iters: int
    batch: int | None = None  # None: params.yaml train.batch_size


FULL = Plan(60_000, 100, 15, 3, 200, 40, 100, 50)
QUICK = Plan(2_048, 3, 1, 1, 4, 3, 3, 3, batch=64)


class Run:
    """The state every section shares: device, plan, parameters, deadline and the report."""

    def __init__(self, out: Path, plan: Plan, budget_s: float, force_ddp: bool) -> None:
        self.out = out
        self.plan = plan
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        params = load_params()
        if plan.batch:
            params = apply_overrides(params, {"train.batch_size": plan.batch})
        self.params: Params = params
        self.cfg: TrainParams = params.train
        self.channels = self.params.data.channels
        self.size = self.params.data.image_size
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.force_ddp = force_ddp
        self.report: dict[str, Any] = {}
        self.trained: nn.Module | None = None  # the engine's model, exported by the onnx section

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def model(self, seed: int = 0) -> nn.Module:
        """The project's configured model (params.yaml train.model/width), seeded init."""
        torch.manual_seed(seed)
        return build_model(
            self.cfg.model,
            NUM_CLASSES,
            in_channels=self.channels,
            width=self.cfg.width,
            image_size=self.size,
        )

    def save(self, name: str, value: Any) -> None:
        """Record a section and rewrite the JSON at once, so a later timeout loses nothing."""
        self.report[name] = value
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        tmp.replace(path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic(n: int, channels: int, size: int, device: torch.device, seed: int = 0):
    """Random uint8 NCHW images and int64 labels shaped like Fashion-MNIST (no download)."""
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(
        0, 256, (n, channels, size, size), dtype=torch.uint8, device=device, generator=g
    )
    labels = torch.randint(0, NUM_CLASSES, (n,), device=device, generator=g)
    return images, labels


def as_split(images: torch.Tensor, labels: torch.Tensor) -> Split:
    """The engine's input: uint8 NHWC and int64 labels as NumPy arrays."""
    return Split(
        images.permute(0, 2, 3, 1).contiguous().cpu().numpy(), labels.cpu().numpy().astype(np.int64)
    )


def make_train_step(
    model: nn.Module,
    params_of: nn.Module,
    cfg: TrainParams,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    total_steps: int,
    sync_each_step: bool = True,
) -> Step:
    """One optimizer step as ``train_model`` takes it (same optimizer groups, LR schedule, loss,
    GradScaler and clipping), with a choosable precision/layout. ``sync_each_step`` adds two
    ``.item()`` reads a step (loss, correct count): the engine's syncs before it kept its running
    sums on the device; it now reads them once an epoch, and one bool a micro-batch
    (``check_finite``).

    ``model`` runs the forward pass (possibly compiled or DDP-wrapped); ``params_of`` owns the
    parameters the optimizer and clipping see."""
    optimizer = make_optimizer(params_of, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    amp = amp_dtype is not None

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32).div_(255.0).contiguous(memory_format=fmt)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = criterion(logits, labels)
        scaler.scale(loss).backward()
        if cfg.grad_clip_norm > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params_of.parameters(), cfg.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if sync_each_step:  # what train_model's running loss/accuracy once cost it every step
            loss.item()
            (logits.argmax(1) == labels).sum().item()
        return loss

    return step


class Batches:
    """Shuffled batches cut from device-resident data (the script's loop: no loader cost)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int) -> None:
        self.images, self.labels, self.batch = images, labels, batch
        self.order = torch.randperm(len(labels), device=labels.device)
        self.cursor = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor + self.batch > len(self.labels):
            self.cursor = 0
        idx = self.order[self.cursor : self.cursor + self.batch]
        self.cursor += self.batch
        return self.images[idx], self.labels[idx]


def measure(
    fn: Callable[[], Any], device: torch.device, steps: int, warmup: int, repeats: int, batch: int
) -> dict[str, Any]:
    """Median images/s over ``repeats`` synchronized runs of ``steps`` calls, after a warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    rates, last = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            last = fn()
        sync(device)
        rates.append(batch * steps / max(time.perf_counter() - t0, 1e-9))
    median = statistics.median(rates)
    out: dict[str, Any] = {
        "images_per_s": round(median, 1),
        "ms_per_step": round(1e3 * batch / median, 3),
        "spread": round((max(rates) - min(rates)) / median, 3),
    }
    if isinstance(last, torch.Tensor) and last.numel() == 1:
        out["final_loss"] = round(float(last.detach()), 4)
    return out


# ----------------------------------------------------------------------------------- sections
def section_meta(run: Run) -> dict[str, Any]:
    """Versions, device and the numerics flags that change what the timings mean."""

    def version(module: str) -> str | None:
        try:
            return getattr(__import__(module), "__version__", "?")
        except Exception as exc:  # a missing optional package is a finding, not a failure
            return f"not importable: {type(exc).__name__}: {exc}"[:200]

    meta: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if run.cuda else None,
        "cuda_available": run.cuda,
        "plan": asdict(run.plan),
        "budget_s": run.budget_s,
        "model": {"name": run.cfg.model, "width": run.cfg.width, "batch_size": run.cfg.batch_size},
        "packages": {m: version(m) for m in ("numpy", "onnx", "onnxscript", "onnxruntime")}
        | {m: version(m) for m in ("pydantic", "pydantic_core", "triton")},
        "flags": {
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
    }
    if run.cuda:
        try:
            meta["gpu"] = _gpu_info()
        except Exception as exc:
            meta["gpu"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return meta


def _gpu_info() -> dict[str, Any]:
    """Name, capability, memory, NCCL version and nvidia-smi's view of device 0."""
    props = torch.cuda.get_device_properties(0)
    nccl = torch.cuda.nccl.version() if dist.is_nccl_available() else None
    info: dict[str, Any] = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return info


def section_engine(run: Run, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """train_model itself: what `dvc repro train` would get per epoch on this device."""
    split = as_split(images, labels)
    model = run.model()
    out: dict[str, Any] = {
        "what": "imageclf.training.engine.train_model (CPU DataLoader, default LoaderSettings); "
        "on CUDA it trains channels_last + fp16 autocast + GradScaler, not configurable",
        "images": len(split),
    }
    runs = [("warmup", run.plan.warmup, []), ("no_augment", run.plan.engine_steps, [])]
    runs.append(("augment (params.yaml)", run.plan.engine_steps, run.cfg.augment))
    for name, steps, augment in runs:
        if name != "warmup" and run.left() < 20:
            out[name] = {"skipped": "time budget"}
            continue
        overrides = {"train.epochs": 1, "train.max_steps": steps, "train.augment": augment}
        cfg = apply_overrides(run.params, overrides).train
        sync(run.device)
        t0 = time.perf_counter()
        history = train_model(
            model, split, None, cfg, seed=run.params.seed, device=run.device, progress=False
        )
        sync(run.device)
        wall = time.perf_counter() - t0
        if name == "warmup":
            continue
        final = history.final
        out[name] = {
            "steps": steps,
            "augment": augment,
            "images_per_s": round(final.images_per_second, 1),
            "wall_s": round(wall, 2),
            "train_loss": round(final.train_loss, 4),
        }
    run.trained = model
    return out


PRECISIONS: list[tuple[str, torch.dtype | None, bool]] = [
    ("fp32", None, False),
    ("fp32+channels_last", None, True),
    ("bf16_autocast", torch.bfloat16, False),
    ("fp16_autocast+GradScaler", torch.float16, False),
    ("bf16_autocast+channels_last", torch.bfloat16, True),
    ("fp16_autocast+GradScaler+channels_last (engine config)", torch.float16, True),
]


def _precision_variants(
    run: Run,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    variants: list[tuple[str, torch.dtype | None, bool, bool]],
) -> dict[str, Any]:
    """Time each (name, autocast dtype, channels_last, per-step sync) variant at ``batch``;
    ratios are against the first variant (fp32), measured in the same call."""
    p = run.plan
    total = p.warmup + p.repeats * p.steps + 8
    out: dict[str, Any] = {}
    for name, dtype, channels_last, sync_each in variants:
        if run.left() < 15:
            out[name] = {"skipped": "time budget"}
            continue
        if dtype == torch.float16 and not run.cuda:  # CPU fp16 autocast: slow, and not a path
            out[name] = {"skipped": NO_CUDA + " (fp16+GradScaler is the CUDA path)"}
            continue
        try:
            model = run.model().to(run.device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            step = make_train_step(
                model, model, run.cfg, run.device, dtype, channels_last, total, sync_each
            )
            batches = Batches(images, labels, batch)
            if run.cuda:
                torch.cuda.reset_peak_memory_stats()
            res = measure(
                lambda step=step, b=batches: step(*b.next()),
                run.device,
                p.steps,
                p.warmup,
                p.repeats,
                batch,
            )
            if run.cuda:
                res["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        except Exception as exc:
            res = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        out[name] = res
    base = out.get(variants[0][0], {}).get("images_per_s")
    for res in out.values():
        if base and "images_per_s" in res:
            res["ratio_vs_fp32"] = round(res["images_per_s"] / base, 3)
    return out


def section_precision(run: Run, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Training throughput per precision/layout, as ratios against fp32 from the same run.

    At the project's batch a model this small may be launch-bound on a big GPU (AMP cannot
    help then), so on CUDA a 4x batch repeats the key variants to show where the time goes."""
    batch = run.cfg.batch_size
    variants = [(*v, True) for v in PRECISIONS]
    variants.append(("engine config, no per-step .item() sync", torch.float16, True, False))
    out: dict[str, Any] = {
        "what": "the script's loop, not the engine's: train_model's step (optimizer, OneCycle, "
        "label-smoothed CE, clipping) plus two per-step .item() syncs (the engine's before it "
        "kept its running sums on the device) on device-resident data",
        "batch_size": batch,
        "variants": _precision_variants(run, images, labels, batch, variants),
    }
    if run.cuda:
        big = [variants[0], variants[4], variants[5]]
        out[f"variants_batch_{4 * batch}"] = _precision_variants(
            run, images, labels, 4 * batch, big
        )
    return out


def section_compile(run: Run, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """torch.compile against eager, same run: inference (default, reduce-overhead) and the
    engine-config training step. The first call's wall time is reported as compile time."""
    if not run.cuda:
        return {"skipped": NO_CUDA + " (Inductor's CPU path is not what this checks)"}
    import torch._dynamo

    p, batch, dev = run.plan, run.cfg.batch_size, run.device
    out: dict[str, Any] = {"batch_size": batch, "inference": {}, "train_step": {}}
    x = images[:batch].to(torch.float32).div(255.0).contiguous(memory_format=torch.channels_last)

    model = run.model().to(dev, memory_format=torch.channels_last).eval()
    with torch.no_grad():
        eager = measure(lambda: model(x), dev, p.infer_iters, 10, p.repeats, batch)
        out["inference"]["eager"] = eager
        for mode in ("default", "reduce-overhead"):
            if run.left() < 45:
                out["inference"][mode] = {"skipped": "time budget"}
                continue
            try:
                torch._dynamo.reset()
                compiled = torch.compile(copy.deepcopy(model), mode=mode)
                t0 = time.perf_counter()
                compiled(x)
                sync(dev)
                compile_s = time.perf_counter() - t0
                res = measure(lambda c=compiled: c(x), dev, p.infer_iters, 5, p.repeats, batch)
                res["compile_s"] = round(compile_s, 2)
                res["ratio_vs_eager"] = round(res["images_per_s"] / eager["images_per_s"], 3)
                diff = (compiled(x).float() - model(x).float()).abs().max()
                res["max_abs_diff_vs_eager"] = float(diff)
            except Exception as exc:
                res = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            out["inference"][mode] = res

    if run.left() < 60:
        out["train_step"] = {"skipped": "time budget"}
        return out
    total = 3 + p.warmup + p.repeats * p.steps + 8
    try:
        torch._dynamo.reset()
        eager_model = run.model().to(dev, memory_format=torch.channels_last)
        step = make_train_step(eager_model, eager_model, run.cfg, dev, torch.float16, True, total)
        batches = Batches(images, labels, batch)
        eager_t = measure(lambda: step(*batches.next()), dev, p.steps, p.warmup, p.repeats, batch)
        out["train_step"]["eager"] = eager_t
        base = run.model().to(dev, memory_format=torch.channels_last)
        compiled = torch.compile(base)
        cstep = make_train_step(compiled, base, run.cfg, dev, torch.float16, True, total)
        t0 = time.perf_counter()
        cstep(*batches.next())  # forward and backward graphs are compiled here
        sync(dev)
        compile_s = time.perf_counter() - t0
        res = measure(lambda: cstep(*batches.next()), dev, p.steps, p.warmup, p.repeats, batch)
        res["compile_s"] = round(compile_s, 2)
        res["ratio_vs_eager"] = round(res["images_per_s"] / eager_t["images_per_s"], 3)
        out["train_step"]["compiled (default)"] = res
    except Exception as exc:
        out["train_step"]["error"] = f"{type(exc).__name__}: {exc}"[:800]
    out["what"] = "train_step: engine config (fp16 autocast+GradScaler+channels_last), script loop"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, mode: str, steps: int, results: Any) -> None:
    """One rank (a spawned process). Every rank sits on cuda:0 (LOCAL_RANK=0): one GPU here."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",
    )
    res: dict[str, Any] = {"rank": rank}
    try:
        params = load_params()
        cfg = params.train
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if mode == "project_init":  # imageclf.training.distributed picks NCCL on CUDA, gloo on CPU
            res["joined"] = distributed.init_from_env()
        else:
            if cuda:
                torch.cuda.set_device(0)
            backend = "gloo" if mode == "gloo_train_model" or not cuda else "nccl"
            dist.init_process_group(backend, timeout=timedelta(seconds=90))
        res["backend"] = str(dist.get_backend())
        res["world_size"] = distributed.world_size()
        torch.manual_seed(0)
        model = build_model(
            cfg.model,
            NUM_CLASSES,
            params.data.channels,
            cfg.width,
            image_size=params.data.image_size,
        )
        n = 8192 if steps > 5 else 2048
        images, labels = synthetic(n, params.data.channels, params.data.image_size, device, rank)
        if mode == "gloo_train_model":  # the whole project path: shard, wrap, reduce, sync check
            run_cfg = apply_overrides(
                params, {"train.epochs": 1, "train.max_steps": steps, "train.augment": []}
            ).train
            t0 = time.perf_counter()
            history = train_model(
                model,
                as_split(images, labels),
                None,
                run_cfg,
                seed=params.seed,
                device=device,
                progress=False,
            )
            res["train_model"] = {
                "steps": steps,
                "images_per_s_all_ranks": round(history.final.images_per_second, 1),
                "wall_s": round(time.perf_counter() - t0, 2),
                "replicas_in_sync": True,  # train_model raises otherwise
            }
        else:
            model.to(device, memory_format=torch.channels_last)
            wrapped = distributed.wrap(model, device)
            res["project_wrap_returned_ddp"] = isinstance(
                wrapped, nn.parallel.DistributedDataParallel
            )
            if not res["project_wrap_returned_ddp"]:  # wrap() is a no-op at world_size 1
                wrapped = nn.parallel.DistributedDataParallel(
                    model, device_ids=[0] if cuda else None
                )
            amp = torch.float16 if cuda else None
            step = make_train_step(wrapped, model, cfg, device, amp, True, steps + 20)
            batches = Batches(images, labels, cfg.batch_size)
            res["ddp_step"] = measure(
                lambda: step(*batches.next()), device, steps, 3, 1, cfg.batch_size
            )
            probe = torch.full((1,), rank + 1.0, device=device)
            dist.all_reduce(probe)
            res["all_reduce_probe"] = {"got": float(probe), "expected": world * (world + 1) / 2}
            res["all_reduce_sum_helper"] = distributed.all_reduce_sum([1.0], device)
            distributed.check_replicas_in_sync(model, device)
            res["replicas_in_sync"] = True
    except BaseException as exc:  # NCCL's refusal is the expected outcome on one GPU
        res["error"] = f"{type(exc).__name__}: {exc}"[:1500]
    results.put(res)  # before shutdown: a broken communicator may hang or abort there
    with contextlib.suppress(Exception):
        distributed.shutdown()


def _spawn_ranks(mode: str, world: int, steps: int, timeout_s: float) -> dict[str, Any]:
    """Run ``world`` ranks of ``mode``; whatever happens, every spawned process is ended."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_ddp_worker, args=(r, world, port, mode, steps, results))
        for r in range(world)
    ]
    t0 = time.perf_counter()
    for proc in procs:
        proc.start()
    ranks: dict[int, Any] = {}
    deadline = t0 + timeout_s
    while len(ranks) < world and time.perf_counter() < deadline:
        try:
            res = results.get(timeout=max(0.5, deadline - time.perf_counter()))
        except queue.Empty:
            break
        ranks[res["rank"]] = res
    for proc in procs:
        proc.join(timeout=15)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [r.get("error") for r in ranks.values() if r.get("error")]
    return {
        "mode": mode,
        "world_size": world,
        "ok": len(ranks) == world and not errors,
        "wall_s": round(time.perf_counter() - t0, 1),
        "timed_out": len(ranks) < world,
        "exit_codes": [proc.exitcode for proc in procs],
        "ranks": [
            ranks.get(r, {"rank": r, "error": "no result (hung or died)"}) for r in range(world)
        ],
    }


def section_ddp(run: Run) -> dict[str, Any]:
    """NCCL DDP on one GPU, as far as NCCL allows, plus the project's DDP path over gloo."""
    if not run.cuda and not run.force_ddp:
        return {"skipped": NO_CUDA + " (run with --force-ddp to try the gloo path on CPU)"}
    steps = run.plan.ddp_steps
    out: dict[str, Any] = {
        "note": "all ranks on cuda:0 (LOCAL_RANK=0); ddp_step is the script's loop in the "
        "engine config, gloo_train_model is imageclf.training.engine.train_model under DDP",
    }
    first = _spawn_ranks("project_init", 2, steps, timeout_s=60)
    out["two_ranks_project_init"] = first
    if not first["ok"] and run.left() > 30:
        out["world1_nccl"] = _spawn_ranks("world1", 1, steps, timeout_s=90)
    if run.left() > 45:
        out["gloo_train_model_two_ranks"] = _spawn_ranks(
            "gloo_train_model", 2, steps, timeout_s=min(120, run.left())
        )
    else:
        out["gloo_train_model_two_ranks"] = {"skipped": "time budget"}
    return out


def section_onnx(run: Run, images: torch.Tensor) -> dict[str, Any]:
    """The project's export and verification, then ONNX Runtime per provider vs PyTorch."""
    import onnxruntime as ort

    out: dict[str, Any] = {"onnxruntime": ort.__version__, "ort_device": ort.get_device()}
    providers = ort.get_available_providers()
    out["available_providers"] = providers
    trained = run.trained if run.trained is not None else run.model()
    serving = ServingGraph(copy.deepcopy(trained).cpu(), run.params.tta_views).eval()
    path = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "gpu_check.onnx"
    shape = (run.channels, run.size, run.size)
    t0 = time.perf_counter()
    export_onnx(copy.deepcopy(serving), path, shape, run.params.export.opset)
    out["export_s"] = round(time.perf_counter() - t0, 2)
    nhwc = images[: run.params.export.compare_images].permute(0, 2, 3, 1).cpu().numpy()
    out["verify_onnx (project, CPU EP)"] = verify_onnx(path, serving, nhwc)

    batches = {1: images[:1], 256: images[:256]}
    inputs = {b: (t.float() / 255.0).cpu().numpy() for b, t in batches.items()}
    with torch.inference_mode():
        ref_cpu = {b: serving(torch.from_numpy(x))[0].numpy() for b, x in inputs.items()}

    sessions: dict[str, Any] = {"CPUExecutionProvider": ort_session(path)}
    if "CUDAExecutionProvider" in providers:
        try:
            if hasattr(ort, "preload_dlls"):  # use the CUDA/cuDNN libraries torch brought
                ort.preload_dlls()
            cuda_sess = ort.InferenceSession(
                str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
            )
            out["cuda_session_providers"] = cuda_sess.get_providers()
            if cuda_sess.get_providers()[0] == "CUDAExecutionProvider":
                sessions["CUDAExecutionProvider"] = cuda_sess
        except Exception as exc:
            out["cuda_session_error"] = f"{type(exc).__name__}: {exc}"[:800]
    else:
        out["cuda_ep"] = "CUDAExecutionProvider not available: this is the CPU build of ORT"

    timings: dict[str, Any] = {}
    for name, sess in sessions.items():
        for b, x in inputs.items():
            run_once = lambda s=sess, x=x: s.run(None, {INPUT_NAME: x})  # noqa: E731
            res = measure(run_once, torch.device("cpu"), run.plan.ort_iters, 5, 1, b)
            got = run_once()[0]
            res["max_abs_diff_vs_torch_cpu"] = float(np.abs(got - ref_cpu[b]).max())
            timings[f"{name} b{b}"] = res
    if run.cuda:  # PyTorch on the GPU, same graph, for scale (and its agreement with ORT)
        gpu = copy.deepcopy(serving).to(run.device, memory_format=torch.channels_last)
        for b, x in inputs.items():
            xt = torch.from_numpy(x).to(run.device, memory_format=torch.channels_last)
            with torch.inference_mode():
                res = measure(lambda xt=xt: gpu(xt), run.device, run.plan.ort_iters, 5, 1, b)
                got = gpu(xt)[0].float().cpu().numpy()
            res["max_abs_diff_vs_torch_cpu"] = float(np.abs(got - ref_cpu[b]).max())
            timings[f"torch CUDA eager b{b}"] = res
    cpu_ep = timings.get("CPUExecutionProvider b256", {}).get("images_per_s")
    for res in timings.values():
        if cpu_ep and "images_per_s" in res:
            res["ratio_vs_ort_cpu_b256"] = round(res["images_per_s"] / cpu_ep, 3)
    out["timings"] = timings
    out["note"] = "ORT timings include host<->device copies (numpy in/out, no IOBinding)"
    shutil.rmtree(path.parent, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------ report
def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The numbers worth reading at a glance, one (section, item, value) per row."""
    rows: list[tuple[str, str, str]] = []

    def fmt(res: dict[str, Any], ratio_key: str | None = None) -> str:
        if "error" in res or "skipped" in res:
            return str(res.get("error") or res.get("skipped"))[:90]
        text = f"{res.get('images_per_s', '?')} img/s"
        if ratio_key and ratio_key in res:
            text += f"  x{res[ratio_key]}"
        if "compile_s" in res:
            text += f"  compile {res['compile_s']} s"
        return text

    meta = report.get("meta", {})
    gpu = meta.get("gpu", {})
    rows.append(("meta", "torch / CUDA", f"{meta.get('torch')} / {meta.get('torch_cuda')}"))
    rows.append(("meta", "device", gpu.get("name", "CPU (no CUDA)")))
    for section, body in report.items():
        if not isinstance(body, dict) or section in ("meta", "seconds"):
            continue
        if "skipped" in body or "error" in body:
            rows.append((section, "-", fmt(body)))
            continue
        if section == "engine":
            for key, res in body.items():
                if isinstance(res, dict):
                    rows.append((section, key, fmt(res)))
        elif section == "precision":
            for part, variants in body.items():
                if part.startswith("variants"):
                    suffix = part.removeprefix("variants").replace("_", " ")
                    for key, res in variants.items():
                        rows.append((section, key + suffix, fmt(res, "ratio_vs_fp32")))
        elif section == "compile":
            for part in ("inference", "train_step"):
                for key, res in body.get(part, {}).items():
                    if isinstance(res, dict):
                        rows.append((section, f"{part} {key}", fmt(res, "ratio_vs_eager")))
        elif section == "ddp":
            for key, res in body.items():
                if not isinstance(res, dict):
                    continue
                if "ranks" not in res:
                    rows.append((section, key, fmt(res)))
                    continue
                r0 = res["ranks"][0]
                value = "ok" if res["ok"] else f"FAILED: {r0.get('error', '?')}"
                if res["ok"]:
                    got = r0.get("ddp_step") or r0.get("train_model") or {}
                    ips = got.get("images_per_s") or got.get("images_per_s_all_ranks")
                    value += f" ({r0.get('backend')}, {ips} img/s rank 0)"
                rows.append((section, key, value[:160]))
        elif section == "onnx":
            rows.append((section, "providers", ", ".join(body.get("available_providers", []))))
            check = body.get("verify_onnx (project, CPU EP)", {})
            rows.append((section, "verify_onnx max_abs_diff", str(check.get("max_abs_diff"))))
            for key, res in body.get("timings", {}).items():
                diff = res.get("max_abs_diff_vs_torch_cpu")
                rows.append((section, key, f"{fmt(res, 'ratio_vs_ort_cpu_b256')}  diff {diff:.2e}"))
            if "cuda_ep" in body:
                rows.append((section, "CUDA EP", body["cuda_ep"]))
    return rows


def print_table(rows: list[tuple[str, str, str]]) -> None:
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    for section, item, value in rows:
        print(f"{section:<{w1}}  {item:<{w2}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="tiny step counts (implied on CPU)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=220.0,
        help="sections that would start past this many seconds are skipped",
    )
    parser.add_argument(
        "--force-ddp",
        action="store_true",
        help="run the DDP section without CUDA too (gloo on CPU, smoke test)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = QUICK if args.quick or not torch.cuda.is_available() else FULL
    run = Run(args.out, plan, args.budget_s, args.force_ddp)
    seconds: dict[str, float] = {}

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        print(f"[gpu_check] {name} ... (t={run.elapsed():.0f}s)", flush=True)
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:
            value = {
                "error": f"{type(exc).__name__}: {exc}"[:1500],
                "traceback": traceback.format_exc()[-3000:],
            }
        seconds[name] = round(time.perf_counter() - t0, 1)
        run.save(name, value)
        run.save("seconds", seconds)

    section("meta", lambda: section_meta(run))
    images, labels = synthetic(plan.images, run.channels, run.size, run.device)
    section("engine", lambda: section_engine(run, images, labels))
    section("precision", lambda: section_precision(run, images, labels))
    section("onnx", lambda: section_onnx(run, images))
    section("ddp", lambda: section_ddp(run))
    section("compile", lambda: section_compile(run, images, labels))
    seconds["total"] = round(run.elapsed(), 1)
    run.save("seconds", seconds)
    print()
    print_table(summary_rows(run.report))
    print(f"\nwrote {args.out / 'gpu_check.json'} in {seconds['total']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel training (DDP) under ``torchrun``: one process per device (or CPU slice), each
training a replica on its own shard of the data, gradients averaged by all-reduce every step.

    torchrun --standalone --nproc_per_node 2 -m stages.train     # or: make train-ddp

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op and
training runs in one process as usual. The backend is NCCL on CUDA and gloo on CPU. Only rank 0
logs to MLflow and writes files; ``train.batch_size`` is per process, so the global batch is
``batch_size * world_size`` (scale ``train.lr`` with it).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes in the environment; False when not under
    torchrun (single-process training)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_indices(n: int, seed: int) -> np.ndarray:
    """This rank's share of ``range(n)``: a seeded permutation cut into equal, disjoint parts
    (equal sizes keep every rank at the same number of steps, which DDP's collectives need)."""
    world = world_size()
    order = np.random.default_rng(seed).permutation(n)
    per_rank = n // world
    return np.sort(order[rank() * per_rank : (rank() + 1) * per_rank])


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in DistributedDataParallel when training is distributed, else as is."""
    if world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum per-rank numbers (loss sums, counts) over all ranks."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (a collective: every rank must call it). The
    resumable checkpoint uses it for each rank's random states, which differ by design."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_replicas_in_sync(model: nn.Module, device: torch.device) -> None:
    """Raise unless every rank holds the same weights: what DDP promises after each step, and
    the first thing to break with a rank-dependent code path or unequal step counts."""
    if world_size() == 1:
        return
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in unwrap(model).parameters()]).to(
            device
        )
    gathered = [torch.zeros_like(checksum) for _ in range(world_size())]
    dist.all_gather(gathered, checksum)
    if not all(torch.allclose(g, gathered[0], rtol=1e-6, atol=1e-8) for g in gathered):
        raise RuntimeError("DDP replicas diverged: the ranks hold different weights.")

"""Exact resume: everything a killed training run needs to continue as if it had never stopped.

``models/checkpoints/last.pt`` is a normal checkpoint (``load_checkpoint`` reads it: spec and
weights) whose ``extra["resume"]`` also holds the optimizer, LR schedule, grad scaler and EMA
states, the random states of every rank (Python, NumPy, torch CPU and CUDA, and the train
loader's sampler generator and batch counter, which seed the next epoch's order and
augmentation), the epoch and step, the early-stopping counters, the epoch history, a
*fingerprint* of everything that decides the weights, and whether the run finished.

``train.resume: auto`` continues from it when the fingerprint matches and the run did not
finish; otherwise it starts fresh and says why. Continuing at epoch k gives the same batches,
the same augmentation and the same weights, bit for bit on CPU, as the run that was not killed.
"""

from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from imageclf.config import Params

log = logging.getLogger(__name__)

# train.* keys that never change the weights (where results go, how loudly training reports,
# how many threads compute the same numbers): a run may resume with other values for these.
NOT_IN_FINGERPRINT = frozenset(
    {"resume", "mlflow_experiment", "tensorboard", "log_every_steps", "detect_anomaly", "threads"}
)


def fingerprint(params: Params, train_hash: str, world_size: int) -> dict[str, Any]:
    """What must be the same for a checkpoint to continue this run: the training parameters,
    the seed, the validation split, the training data's content hash and the number of DDP
    processes (each has its own data shard and random streams). Values as JSON-able text."""
    train = params.train.model_dump(by_alias=True)
    found = {f"train.{k}": v for k, v in train.items() if k not in NOT_IN_FINGERPRINT}
    found.update(
        {
            "seed": params.seed,
            "data.val_fraction": params.data.val_fraction,
            "data.train_hash": train_hash,
            "world_size": world_size,
        }
    )
    return {k: repr(v) for k, v in sorted(found.items())}


def capture_rng() -> dict[str, Any]:
    """This process's global random states, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples getstate gave (a round trip may make lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _sampler_generator(loader: DataLoader) -> torch.Generator | None:
    """The generator that draws each epoch's order: the random or class-balanced sampler's
    (make_loader seeds it; NumberedBatches -> BatchSampler -> sampler)."""
    batch_sampler = loader.batch_sampler
    inner = getattr(batch_sampler, "batches", batch_sampler)
    return getattr(getattr(inner, "sampler", None), "generator", None)


def capture_loader(loader: DataLoader) -> dict[str, Any]:
    """Where the train loader stands between epochs: its sampler generator (the next epoch's
    permutation) and its batch counter (the next batches' augmentation seeds)."""
    generator = _sampler_generator(loader)
    return {
        "served": int(getattr(loader.batch_sampler, "served", 0)),
        "generator": generator.get_state() if generator is not None else None,
    }


def restore_loader(loader: DataLoader, state: dict[str, Any]) -> None:
    """Put a freshly built train loader where ``capture_loader`` found the old one."""
    if hasattr(loader.batch_sampler, "served"):
        loader.batch_sampler.served = state["served"]
    generator = _sampler_generator(loader)
    if (generator is None) != (state["generator"] is None):
        raise ValueError("the train loader's sampler changed since the checkpoint was written")
    if generator is not None:
        generator.set_state(state["generator"])


def resume_state(path: Path, wanted: dict[str, Any], mode: str) -> dict[str, Any] | None:
    """The training state to continue from ``path`` (last.pt), or None to start fresh; logs
    which and why, since a silently fresh (or silently resumed) run is a surprise either way."""
    if mode == "never":
        log.info("train.resume: never: training from scratch")
        return None
    if not path.is_file():
        log.info("train.resume: auto: no %s yet, training from scratch", path)
        return None
    checkpoint = _read(path, "training from scratch")
    if checkpoint is None:
        return None
    state = checkpoint.get("extra", {}).get("resume")
    if state is None:
        log.info("train.resume: %s holds no training state: training from scratch", path)
        return None
    if not state.get("resumable", True):
        log.info("train.resume: %s is not resumable (train.transfer: features): from scratch", path)
        return None
    if state["finished"]:
        log.info(
            "train.resume: the run in %s finished (epoch %d): training from scratch",
            path,
            state["epoch"],
        )
        return None
    old = state["fingerprint"]
    differ = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
    if differ:
        changes = ", ".join(f"{k}: {old.get(k)} -> {wanted.get(k)}" for k in differ[:5])
        log.warning(
            "train.resume: %s was written by another run (%s): training from scratch",
            path,
            changes,
        )
        return None
    log.info(
        "train.resume: continuing the killed run from %s after epoch %d (step %d)",
        path,
        state["epoch"],
        state["step"],
    )
    return {**state, "model": checkpoint["state_dict"]}


def _read(path: Path, otherwise: str) -> dict[str, Any] | None:
    """A checkpoint's contents, or None (logged, with what happens ``otherwise``) when a crash
    or a stray file left something torch cannot read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as exc:
        log.warning("train.resume: %s is unreadable (%s): %s", path, exc, otherwise)
        return None


def member_file(last_checkpoint: Path, index: int) -> Path:
    """Where a finished ensemble member waits for the others, beside last.pt (a killed ensemble
    run does not train it again); removed once models/model.pt holds the ensemble."""
    return last_checkpoint.parent / f"member-{index}.pt"


def finished_member(path: Path, wanted: dict[str, Any], mode: str) -> dict[str, Any] | None:
    """The saved weights and outcome of a member that a killed ensemble run with the same
    parameters (``wanted``: the member's fingerprint) finished, or None to train it."""
    if mode == "never" or not path.is_file():
        return None
    saved = _read(path, "training that member again")
    if saved is None:
        return None
    extra = saved.get("extra", {})
    if extra.get("fingerprint") != wanted:
        log.info("train.resume: %s was trained with other parameters: training it again", path)
        return None
    return {"state_dict": saved["state_dict"], **extra}

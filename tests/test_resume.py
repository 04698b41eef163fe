"""Exact resume: a train stage killed with SIGKILL mid-epoch and started again (train.resume:
auto) ends with the very weights of a run that was never interrupted, bit for bit on CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from imageclf.config import load_params
from imageclf.io import read_json, write_json
from imageclf.paths import ProjectPaths
from stages import train
from tests.conftest import REPO, tiny_params, write_params

# Runs the real stage, but blocks at the third batch of epoch 2 (after last.pt of epoch 1 is
# written), each process writing its id to MARKER.<rank>: the test kills it there, mid-epoch,
# with SIGKILL.
FREEZE_IN_EPOCH_2 = """
import os, sys, time
from pathlib import Path
import imageclf.training.engine as engine
marker = Path(f"{sys.argv[1]}.{os.environ.get('RANK', '0')}")
real, seen = engine.check_finite, []
def check_finite(loss, epoch, step):
    if epoch == 2:
        seen.append(step)
        if len(seen) == 3:
            marker.write_text(str(os.getpid()))
            time.sleep(300)
    real(loss, epoch, step)
engine.check_finite = check_finite
from imageclf.stage import main
from stages.train import run
sys.argv = sys.argv[:1]
main(run)
"""


def stage_env(project: ProjectPaths) -> dict[str, str]:
    return {
        **os.environ,
        "IMAGECLF_ROOT": str(project.root),
        "PYTHONPATH": str(REPO),
    }


def train_stage(project: ProjectPaths) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "stages.train"],
        cwd=REPO,
        env=stage_env(project),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def wait_for_freeze(markers: list[Path], process: subprocess.Popen[str]) -> list[int]:
    """The ids of the processes frozen in epoch 2, once each has written its marker."""
    deadline = time.monotonic() + 300
    while not all(m.exists() for m in markers) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-4000:]
        time.sleep(0.2)
    assert all(m.exists() for m in markers), "the run never reached epoch 2"
    time.sleep(0.2)  # the id is written (write_text is not atomic)
    return [int(m.read_text()) for m in markers]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def last_epoch(project: ProjectPaths) -> int:
    return torch.load(project.last_checkpoint, weights_only=True)["extra"]["epoch"]


@pytest.fixture
def resumable(project: ProjectPaths) -> ProjectPaths:
    """The synthetic project set for 3 short epochs with everything that carries state across
    epochs switched on: augmentation, EMA, accumulation, batch mixing, a loader worker."""
    params = tiny_params(
        train={
            "epochs": 3,
            "batch_size": 8,
            "ema_decay": 0.9,
            "accumulate_steps": 2,
            "mixup_alpha": 0.2,
            "schedule": "onecycle",
            "threads": 1,  # in this process and in the stage's: the same float sums
        }
    )
    write_params(project.root, params)
    settings = {"num_workers": 1, "pin_memory": False, "prefetch_factor": 2}
    write_json(project.loader_config, {"chosen": settings})  # persistent workers
    return project


def test_killed_run_resumes_to_the_same_weights(resumable: ProjectPaths) -> None:
    project = resumable
    train.run(load_params(project.params), project)  # never interrupted (here: no import time)
    reference = weights(project.checkpoint)
    reference_history = read_json(project.train_history)
    assert last_epoch(project) == 3

    marker = project.root / "frozen"
    killed = subprocess.Popen(
        [sys.executable, "-c", FREEZE_IN_EPOCH_2, str(marker)],
        cwd=REPO,
        env=stage_env(project),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_freeze([marker.with_suffix(".0")], killed)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    # The finished run's last.pt did not resume (it started fresh, saying why), and the
    # killed one left its epoch 1.
    assert "finished (epoch 3): training from scratch" in killed.stderr.read()
    assert last_epoch(project) == 1

    resumed = train_stage(project)
    assert "continuing the killed run" in resumed.stderr
    assert "after epoch 1" in resumed.stderr
    final = weights(project.checkpoint)
    differ = [k for k in reference if not torch.equal(reference[k], final[k])]
    assert differ == [], f"resumed weights differ from the uninterrupted run's: {differ[:5]}"
    report = read_json(project.train_report)
    assert report["resumed_after_epoch"] == 1 and report["epochs"] == 3
    # models/model.pt holds the EMA weights exactly when they validated better.
    last = torch.load(project.last_checkpoint, weights_only=True)
    ema_won = report["ema_val_accuracy"] > report["val_accuracy"]
    assert report["weights"] == ("ema" if ema_won else "raw")
    kept = last["extra"]["resume"]["ema"]["module"] if ema_won else last["state_dict"]
    assert all(torch.equal(final[k], kept[k]) for k in final)
    history = read_json(project.train_history)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    for ours, theirs in zip(history, reference_history, strict=True):
        assert ours["train_loss"] == theirs["train_loss"]
        assert ours["ema_val_accuracy"] == theirs["ema_val_accuracy"]


def test_changed_parameters_start_fresh(resumable: ProjectPaths) -> None:
    """A last.pt from other parameters is never continued: that would silently mix two runs."""
    project = resumable
    from imageclf.training.resume import fingerprint, resume_state

    params = tiny_params(train={"epochs": 3, "lr": 0.05})
    wanted = fingerprint(params, "abc", 1)
    assert resume_state(project.last_checkpoint, wanted, "auto") is None  # no file yet
    state = {"epoch": 1, "step": 4, "finished": False, "fingerprint": wanted}
    from imageclf.models.checkpoint import ModelSpec, save_checkpoint

    spec = ModelSpec("resnet_small", 8, 4, 1, 12, tuple("abcd"), 0.2, 0.3)
    model = spec.build()
    save_checkpoint(project.last_checkpoint, model, spec, extra={"epoch": 1, "resume": state})
    assert resume_state(project.last_checkpoint, wanted, "auto") is not None
    assert resume_state(project.last_checkpoint, wanted, "never") is None
    other = fingerprint(tiny_params(train={"epochs": 3, "lr": 0.1}), "abc", 1)
    assert resume_state(project.last_checkpoint, other, "auto") is None
    more_ranks = fingerprint(params, "abc", 2)
    assert resume_state(project.last_checkpoint, more_ranks, "auto") is None
    other_data = fingerprint(params, "abd", 1)
    assert resume_state(project.last_checkpoint, other_data, "auto") is None
    # Where results go and how loudly training reports do not decide the weights.
    quiet = fingerprint(
        tiny_params(train={"epochs": 3, "lr": 0.05, "tensorboard": False}), "abc", 1
    )
    assert resume_state(project.last_checkpoint, quiet, "auto") is not None


def torchrun(project: ProjectPaths, *target: str, **popen: Any) -> subprocess.Popen[str]:
    """``torchrun --standalone --nproc_per_node 2`` of ``target`` (gloo on CPU), in its own
    process group so that a test can kill the launcher and both workers at once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.Popen(
        [*cmd, *target],
        cwd=REPO,
        env={**stage_env(project), "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        **popen,
    )


def finish(process: subprocess.Popen[str]) -> str:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]
    return stderr


@pytest.mark.slow
def test_killed_ddp_run_resumes_to_the_same_weights(project: ProjectPaths) -> None:
    """Two gloo processes, killed together mid-epoch 2, resume with each rank's own data
    shard, random streams and accumulated steps (no_sync) where they were."""
    params = tiny_params(
        train={
            "epochs": 3,
            "batch_size": 8,
            "accumulate_steps": 2,
            "ema_decay": 0.9,
            "mixup_alpha": 0.2,
        }
    )
    write_params(project.root, params)
    finish(torchrun(project, "-m", "stages.train"))
    reference = weights(project.checkpoint)

    marker, script = project.root / "frozen", project.root / "freeze.py"
    script.write_text(FREEZE_IN_EPOCH_2)
    killed = torchrun(project, str(script), str(marker))
    frozen = wait_for_freeze([marker.with_suffix(f".{rank}") for rank in (0, 1)], killed)
    # The whole job at once, as when its machine is lost: the launcher's process group and
    # each worker (torchrun starts them in sessions of their own).
    os.killpg(killed.pid, signal.SIGKILL)
    for pid in frozen:
        os.kill(pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    assert last_epoch(project) == 1

    stderr = finish(torchrun(project, "-m", "stages.train"))
    assert "continuing the killed run" in stderr
    final = weights(project.checkpoint)
    assert [k for k in reference if not torch.equal(reference[k], final[k])] == []
    report = read_json(project.train_report)
    assert report["world_size"] == 2 and report["resumed_after_epoch"] == 1

"""DDP for real: `torchrun` with two CPU processes (gloo) trains the train stage end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np

from imageclf.io import read_json
from imageclf.models.checkpoint import load_checkpoint
from imageclf.training import distributed
from tests.conftest import REPO, tiny_params, write_params


def test_torchrun_trains_with_two_ddp_processes(project):
    params = tiny_params(train={"epochs": 2, "width": 8, "batch_size": 16})
    write_params(project.root, params)
    env = {
        **os.environ,
        "IMAGECLF_ROOT": str(project.root),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, "-m", "stages.train"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = read_json(project.reports / "train.json")
    assert report["world_size"] == 2 and report["epochs"] == 2
    history = read_json(project.reports / "train_history.json")
    assert len(history) == 2  # one row per epoch: rank 0 alone writes
    _, spec, _ = load_checkpoint(project.checkpoint)
    assert spec.num_classes == 4
    run = mlflow.MlflowClient().get_run(report["mlflow_run_id"])
    assert run.data.params["world_size"] == "2"
    assert len(mlflow.search_runs(search_all_experiments=True)) == 1  # not one run per rank


def test_shards_are_disjoint_equal_and_cover_the_data(monkeypatch):
    shards = []
    for r in range(3):
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shards.append(distributed.shard_indices(100, seed=7))
    assert {len(s) for s in shards} == {33}
    together = np.concatenate(shards)
    assert len(np.unique(together)) == 99 and together.max() < 100


def test_single_process_is_untouched():
    assert distributed.init_from_env() is False  # no torchrun environment: nothing joined
    assert distributed.world_size() == 1 and distributed.is_main()
    assert list(distributed.shard_indices(5, seed=0)) == [0, 1, 2, 3, 4]

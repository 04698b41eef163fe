"""Stage profile: torch.profiler over a few training steps of the trained model."""

from __future__ import annotations

from typing import Any

from imageclf.config import Params
from imageclf.data.loaders import load_loader_settings
from imageclf.data.store import load_dataset
from imageclf.io import write_json, write_text
from imageclf.models.checkpoint import load_checkpoint
from imageclf.paths import ProjectPaths
from imageclf.stage import main
from imageclf.training.engine import set_threads
from imageclf.training.profiling import profile_training, top_ops_markdown


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Write a Chrome trace, the top-operator table and the data-wait share."""
    set_threads(params.train.threads)
    dataset = load_dataset(paths.dataset)
    model, _, _ = load_checkpoint(paths.checkpoint)
    result = profile_training(
        model,
        dataset.train,
        params.profile,
        params.train,
        load_loader_settings(paths.loader_config),
        paths.profile_trace,
        params.seed,
    )
    write_text(paths.profile_top_ops, top_ops_markdown(result["top_ops"]))
    write_json(paths.profile_report, result)
    return result


if __name__ == "__main__":
    main(run)

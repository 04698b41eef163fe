"""Find a learning rate before training (fastai's ``learn.lr_find()``): an exponential LR sweep
from the train stage's real starting point, its curve plotted, a ``train.lr`` suggested.

    python -m tools.lr_find                                  # params.yaml as it is
    python -m tools.lr_find --config configs/photos.yaml --set train.batch_size=32
    python -m tools.lr_find --steps 200 --start 1e-6 --end 1 --epoch 1

Reads the dataset the download stage wrote (data/dataset) and writes reports/lr_find.png and
reports/lr_find.json; the swept model is thrown away. The logic lives in
``imageclf.training.lr_find``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from imageclf.config import (
    Params,
    ParamsError,
    apply_overrides,
    load_overrides,
    load_params,
    parse_assignments,
)
from imageclf.data.loaders import load_loader_settings
from imageclf.data.store import Dataset, load_dataset
from imageclf.errors import StageError
from imageclf.paths import ProjectPaths, get_paths
from imageclf.training import lr_find
from imageclf.training.engine import set_threads
from imageclf.training.spec import prepare_run


def read_params(paths: ProjectPaths, config: str | None, assignments: list[str]) -> Params:
    """params.yaml, then the configuration file's overrides, then ``--set``'s (the training
    flow's order)."""
    params = load_params(paths.params)
    if config:
        params = apply_overrides(params, load_overrides(config))
    return apply_overrides(params, parse_assignments(assignments))


def read_dataset(paths: ProjectPaths, params: Params) -> Dataset:
    """The download stage's dataset, refused with what to run when it is missing or was made
    with other data settings than these."""
    try:
        dataset = load_dataset(paths.dataset)
    except FileNotFoundError as exc:
        raise StageError(
            f"No dataset at {paths.dataset}: run the download stage first (`dvc repro "
            "download`, or the training flow: `python -m pipelines.training_flow`)."
        ) from exc
    c, h, _ = dataset.image_shape
    wanted = (params.data.channels, params.data.image_size)
    if (c, h) != wanted:
        raise StageError(
            f"{paths.dataset} holds {c}-channel {h} px images, these parameters ask for "
            f"{wanted[0]}-channel {wanted[1]} px (data.channels, data.image_size): run the "
            "download stage with them first (`dvc exp run download -S ...`, or `dvc repro "
            "download` after editing params.yaml)."
        )
    return dataset


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="overrides file, e.g. configs/photos.yaml")
    parser.add_argument(
        "--set", "-S", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
        help="a parameter override (repeatable), e.g. --set train.batch_size=128",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=lr_find.DEFAULT_STEPS, help="LR steps")
    parser.add_argument("--start", type=float, default=lr_find.DEFAULT_START, help="first LR")
    parser.add_argument("--end", type=float, default=lr_find.DEFAULT_END, help="last LR")
    parser.add_argument(
        "--epoch", type=int, default=None,
        help="sweep the layer groups that learn in this epoch of the run (default: the last; "
        "with train.freeze_epochs, 1 is the head only)",
    )  # fmt: skip
    parser.add_argument(
        "--method", choices=lr_find.METHODS, default=lr_find.DEFAULT_METHOD,
        help="the rule that picks the suggestion (all three are printed)",
    )  # fmt: skip
    parser.add_argument("--root", type=Path, default=None, help="project folder")
    args = parser.parse_args(argv)
    if args.steps < 10 or not 0 < args.start < args.end:
        parser.error("--steps must be 10 or more, and 0 < --start < --end")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    paths = get_paths(args.root)
    try:
        params = read_params(paths, args.config, args.assignments)
        dataset = read_dataset(paths, params)
        set_threads(params.train.threads)
        prepared = prepare_run(params, dataset, paths)
        result = lr_find.find_lr(
            prepared,
            steps=args.steps,
            start=args.start,
            end=args.end,
            epoch=args.epoch,
            method=args.method,
            loader=load_loader_settings(paths.loader_config),
            progress=True,
        )
        lr_find.write_lr_find(result, paths.lr_find_report, paths.lr_find_plot)
        line = lr_find.summary(result)
    except (ParamsError, StageError) as exc:
        print(f"tools.lr_find: {exc}", file=sys.stderr)
        return 2
    root = paths.root
    print(
        f"{len(result.lrs)} steps from {args.start:g} ({result.stopped} at "
        f"{result.lrs[-1]:.2g}); wrote {paths.lr_find_plot.relative_to(root)} and "
        f"{paths.lr_find_report.relative_to(root)}"
    )
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Combine models trained separately into one ensemble checkpoint, and score it.

``train.ensemble`` trains its members one after another in one process. Members can also be
trained apart (in parallel processes, on other machines, or kept from earlier runs with
``benchmarks.time_to_accuracy --save-models``) and combined here into the same kind of
checkpoint: the average of their log-probabilities as one model (``imageclf.models.ensemble``)
that evaluate, export and the service take like models/model.pt.

    python -m tools.ensemble models/ensemble.pt runs/a.pt runs/b.pt runs/c.pt --score

``--score`` prints each member's test accuracy and the ensemble's, measured as the evaluate
stage measures (flip TTA when params.yaml's evaluation uses it), on the project's dataset.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch import nn

from imageclf.config import load_params
from imageclf.errors import InvalidInput
from imageclf.models.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from imageclf.models.ensemble import ensemble
from imageclf.paths import ProjectPaths

# What members must share to be one model: one architecture, one input, one set of classes.
SHARED = ("name", "width", "num_classes", "in_channels", "image_size", "classes")


def combine(members: Sequence[Path]) -> tuple[nn.Module, ModelSpec]:
    """The ensemble of the checkpoints at ``members`` and its spec (the first member's, with
    ``members`` set); a clear error for anything that cannot be one model."""
    if len(members) < 2:
        raise InvalidInput(f"an ensemble needs two or more checkpoints, got {len(members)}")
    models, specs = [], []
    for path in members:
        if not Path(path).is_file():
            raise InvalidInput(f"no checkpoint at {path}")
        model, spec, _ = load_checkpoint(path)
        if spec.members > 1 or spec.bn_folded:
            raise InvalidInput(
                f"{path} is {'an ensemble' if spec.members > 1 else 'batch-norm folded'}: "
                "combine the single, unfolded models (train stage or --save-models outputs)."
            )
        models.append(model)
        specs.append(spec)
    first = specs[0]
    for path, spec in zip(members[1:], specs[1:], strict=True):
        differ = [k for k in SHARED if getattr(spec, k) != getattr(first, k)]
        if differ:
            shown = ", ".join(f"{k} {getattr(spec, k)!r} vs {getattr(first, k)!r}" for k in differ)
            raise InvalidInput(
                f"{path} cannot join {members[0]} in one model: {shown}. Members share the "
                "architecture, width, input and classes."
            )
    return ensemble(models).eval(), replace(first, members=len(models))


def accuracy_on_test(model: nn.Module, paths: ProjectPaths) -> float:
    """Accuracy on the project's test split, as the evaluate stage measures it."""
    from imageclf.data.store import load_dataset
    from imageclf.training.engine import predict_logits

    params = load_params(paths.params)
    test = load_dataset(paths.dataset).test
    logits = predict_logits(model, test.images, params.evaluate.batch_size, params.tta_views)
    return float((logits.argmax(1).numpy() == np.asarray(test.labels)).mean())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the ensemble checkpoint to write")
    parser.add_argument("members", type=Path, nargs="+", help="two or more checkpoints")
    parser.add_argument("--score", action="store_true", help="print test accuracies")
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder")
    args = parser.parse_args(argv)
    if args.out.resolve() in {m.resolve() for m in args.members}:
        parser.error(f"{args.out} is one of the members: write the ensemble elsewhere.")
    try:
        model, spec = combine(args.members)
    except InvalidInput as exc:
        print(f"tools.ensemble: {exc}", file=sys.stderr)
        return 2
    save_checkpoint(args.out, model, spec)
    print(f"{args.out}: {spec.members} x {spec.name} width {spec.width}")
    if args.score:
        paths = ProjectPaths(args.root.resolve())
        for path in args.members:
            print(f"{path}: {accuracy_on_test(load_checkpoint(path)[0], paths):.4f}")
        print(f"ensemble: {accuracy_on_test(model, paths):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

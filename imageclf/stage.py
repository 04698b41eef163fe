"""What every stage shares: its CLI, logging, and the one-sentence failure contract.

A stage module defines ``run(params, paths) -> dict`` and ends with ``main(run)``. Expected
failures (bad parameters, missing inputs, data that fails validation, a check that does not
pass) become one clear sentence on stderr and exit status 1, not a traceback. They are the
exceptions in :data:`imageclf.errors.EXPECTED_ERRORS`, which code raises on purpose with a message
for the user; anything else (a ``KeyError``, a ``ValueError`` from deep inside torch...) is a bug
and keeps its full traceback, because one sentence would hide where it happened.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageclf.config import Params, load_params
from imageclf.errors import EXPECTED_ERRORS
from imageclf.paths import ProjectPaths, get_paths

StageFn = Callable[[Params, ProjectPaths], dict[str, Any]]
log = logging.getLogger("imageclf.stage")


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Our own progress at INFO; libraries (ONNX Runtime's quantizer logs to the root logger,
    # onnx_ir, alembic...) only when something is wrong.
    logging.getLogger("imageclf").setLevel(os.environ.get("IMAGECLF_LOG_LEVEL", "INFO"))


def run_stage(
    fn: StageFn, params: Params | None = None, root: Path | None = None
) -> dict[str, Any]:
    """Call a stage with loaded params and paths (the Python entry point for flows, tests)."""
    paths = get_paths(root)
    params = params or load_params(paths.params)
    return fn(params, paths)


def main(fn: StageFn, argv: list[str] | None = None) -> None:
    name = Path(inspect.getfile(fn)).stem
    spec = getattr(sys.modules.get(fn.__module__), "__spec__", None)  # __main__ under -m
    module = spec.name if spec is not None else f"stages.{name}"
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=fn.__doc__)
    parser.add_argument("--params", type=Path, default=None, help="params.yaml to use")
    args = parser.parse_args(argv)
    configure_logging()
    started = time.perf_counter()
    log.info("stage %s: starting", name)
    try:
        params = load_params(args.params) if args.params else None
        result = run_stage(fn, params)
    except KeyboardInterrupt:
        print(f"stage {name}: interrupted; earlier outputs are unchanged.", file=sys.stderr)
        sys.exit(130)
    except EXPECTED_ERRORS as exc:
        if os.environ.get("IMAGECLF_DEBUG"):
            raise
        print(f"stage {name} failed: {exc}", file=sys.stderr)
        sys.exit(1)
    summary = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}
    log.info(
        "stage %s: done in %.1fs %s",
        name,
        time.perf_counter() - started,
        json.dumps(summary, default=str)[:500],
    )

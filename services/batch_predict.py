"""Offline batch inference: classify a folder of images into a CSV, with the served model.

    python -m services.batch_predict IMAGES_DIR --out predictions.csv [--onnx FILE] [--top-k 3]

Default model: the registry's champion (like the service); ``--onnx`` uses a file instead.
The same decoding, limits and preprocessing as the HTTP service; a file that cannot be read
gets its reason in the ``error`` column instead of stopping the run.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

from imageclf.config import load_params
from imageclf.data.store import IMAGE_SUFFIXES
from imageclf.deploy.inference import (
    ModelUnavailable,
    OnnxClassifier,
    classify_files,
    resolve_model,
)
from imageclf.io import atomic_path
from imageclf.paths import get_paths
from imageclf.tracking import tracking_uri

# A cell starting with one of these is a formula to a spreadsheet (OWASP "CSV injection"): a
# file or folder name such as "=HYPERLINK(...).png" must reach the CSV as text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: object) -> object:
    """``value`` as a spreadsheet shows it: text that would start a formula gets a leading '."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.batch_predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path, help="folder with images (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"))
    parser.add_argument("--onnx", type=Path, help="ONNX file instead of the registry's champion")
    parser.add_argument("--top-k", type=int, default=None)
    args = parser.parse_args(argv)
    params = load_params(get_paths().params)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder.", file=sys.stderr)
        return 2
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        print(
            f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {args.folder}.",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = (
                args.onnx
                or resolve_model(
                    tracking_uri(get_paths()),
                    params.registry.model_name,
                    params.serving.alias,
                    dest=Path(tmp),
                ).path
            )
        except ModelUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        model = OnnxClassifier(path, params.serving.threads)
        rows = classify_files(model, files, params.serving, args.top_k or params.serving.top_k)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(args.out, suffix=".csv") as out, out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: csv_safe(v) for k, v in row.items()} for row in rows)
    failed = sum(1 for row in rows if row.get("error"))
    print(f"{len(rows) - failed} images classified, {failed} unreadable -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data validation with Great Expectations 1.x over a per-image metadata table.

Each image becomes one row (split, label, shape, dtype, pixel statistics, content hash, and the
share of its class in its split), and one expectation suite checks the table. Checking a table
of facts instead of the raw tensors is what lets GX's Data Docs show a person *which* images broke
which rule.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imageclf.config import ValidateParams
from imageclf.data.store import Dataset

os.environ.setdefault(
    "GX_ANALYTICS_ENABLED", "false"
)  # offline: it otherwise times out calling home

SUITE_NAME = "image_metadata"
# Where GX's file context puts the Data Docs' start page, inside the folder given to it.
DATA_DOCS_INDEX = Path("gx", "uncommitted", "data_docs", "local_site", "index.html")


def metadata_table(dataset: Dataset) -> pd.DataFrame:
    """One row per image with the facts the suite checks."""
    frames = []
    for split_name, split in (("train", dataset.train), ("test", dataset.test)):
        images = split.images
        n = len(split)
        flat = images.reshape(n, -1)
        labels = split.labels
        counts = np.bincount(labels, minlength=dataset.num_classes) if n else np.zeros(0, int)
        frames.append(
            pd.DataFrame(
                {
                    "split": split_name,
                    "label": labels,
                    "height": images.shape[1] if images.ndim == 4 else -1,
                    "width": images.shape[2] if images.ndim == 4 else -1,
                    "channels": images.shape[3] if images.ndim == 4 else -1,
                    "dtype": str(images.dtype),
                    "pixel_min": flat.min(axis=1).astype(float) if n else [],
                    "pixel_max": flat.max(axis=1).astype(float) if n else [],
                    "pixel_mean": flat.mean(axis=1) if n else [],
                    "sha1": [hashlib.sha1(row.tobytes()).hexdigest() for row in flat],
                    "class_count": counts[labels] if n else [],
                    "class_share": counts[labels] / max(n, 1) if n else [],
                }
            )
        )
    table = pd.concat(frames, ignore_index=True)
    train_hashes = set(table.loc[table.split == "train", "sha1"])
    test_hashes = set(table.loc[table.split == "test", "sha1"])
    shared = train_hashes & test_hashes
    table["in_both_splits"] = table["sha1"].isin(shared)
    return table


def build_suite(dataset: Dataset, cfg: ValidateParams) -> Any:
    """The expectations every dataset must meet before a model may learn from it."""
    import great_expectations as gx

    k = dataset.num_classes
    c, h, w = dataset.meta["image_shape"][2], *dataset.meta["image_shape"][:2]
    e = gx.expectations
    expectations = [
        e.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(k))),
        e.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=list(range(k))),
        e.ExpectColumnValuesToBeInSet(column="height", value_set=[h]),
        e.ExpectColumnValuesToBeInSet(column="width", value_set=[w]),
        e.ExpectColumnValuesToBeInSet(column="channels", value_set=[c]),
        e.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
        e.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
        e.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
        e.ExpectColumnValuesToNotBeNull(column="sha1"),
        e.ExpectColumnValuesToBeBetween(column="class_count", min_value=cfg.min_images_per_class),
        e.ExpectColumnValuesToBeBetween(
            column="class_share",
            min_value=max(0.0, 1 / k - cfg.max_class_share_deviation),
            max_value=min(1.0, 1 / k + cfg.max_class_share_deviation),
        ),
    ]
    if not cfg.allow_train_test_duplicates:
        expectations.append(
            e.ExpectColumnValuesToBeInSet(column="in_both_splits", value_set=[False])
        )
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


@dataclass
class ValidationOutcome:
    success: bool
    failures: list[str]
    summary: dict[str, Any]
    data_docs: Path | None


def _describe(result: Any) -> str:
    cfg = result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
    detail = result.result or {}
    parts = [f"{cfg.type}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"]
    if "unexpected_count" in detail:
        parts.append(
            f"{detail['unexpected_count']} rows failed "
            f"(e.g. {detail.get('partial_unexpected_list', [])[:5]})"
        )
    if "observed_value" in detail:
        parts.append(f"observed {detail['observed_value']!r}")
    return ": ".join(parts)


def validate_dataset(dataset: Dataset, cfg: ValidateParams, gx_dir: Path) -> ValidationOutcome:
    """Run the suite through a file-backed GX context so Data Docs land in ``gx_dir``."""
    import great_expectations as gx

    table = metadata_table(dataset)
    context = gx.get_context(mode="file", project_root_dir=str(gx_dir))
    source = context.data_sources.add_or_update_pandas(name="dataset")
    try:
        asset = source.get_asset("image_metadata")
    except LookupError:
        asset = source.add_dataframe_asset(name="image_metadata")
    try:
        batch = asset.get_batch_definition("all_images")
    except (KeyError, LookupError):
        batch = asset.add_batch_definition_whole_dataframe("all_images")
    suite = context.suites.add_or_update(build_suite(dataset, cfg))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name="validate_images", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name="validate_dataset",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
            result_format={"result_format": "SUMMARY"},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": table})
    failures = []
    evaluated = 0
    for suite_result in result.run_results.values():
        for item in suite_result.results:
            evaluated += 1
            if not item.success:
                failures.append(_describe(item))
    docs = gx_dir / DATA_DOCS_INDEX
    summary = {
        "success": bool(result.success),
        "expectations": evaluated,
        "failed": len(failures),
        "failures": failures,
        "rows": len(table),
        "train_images": int((table.split == "train").sum()),
        "test_images": int((table.split == "test").sum()),
        "train_test_duplicates": int(table.loc[table.split == "test", "in_both_splits"].sum()),
        "class_counts": {
            split: {str(k): int(v) for k, v in group.label.value_counts().sort_index().items()}
            for split, group in table.groupby("split")
        },
    }
    return ValidationOutcome(
        bool(result.success), failures, summary, docs if docs.is_file() else None
    )

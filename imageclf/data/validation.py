"""Data validation with Great Expectations 1.x: the gate before a model may learn from data.

Two tables are checked. ``images``: one row per file (or stored image), with the facts of its
stored array (shape, dtype, pixel range, content hash) and one text column per kind of problem
from :mod:`imageclf.data.quality` (label conflict, train/test leak, duplicate, bad file, tiny,
odd aspect, blurry, dark), empty when the file is fine. ``classes``: one row per class and split
with its count, share and imbalance text. Problems are texts that name the file and class, so a
failed expectation (and GX's Data Docs) says which files broke which rule. Expectations with
severity "warning" are reported without failing the gate: class imbalance is one (training
corrects it with train.class_balance); only a class too small to learn or to test fails.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imageclf.config import ValidateParams
from imageclf.data.quality import CLASS_COLUMNS, PROBLEM_COLUMNS, Findings, assess
from imageclf.data.store import Dataset

os.environ.setdefault(
    "GX_ANALYTICS_ENABLED", "false"
)  # offline: it otherwise times out calling home
# GX 1.x's Data Docs renderer logs a KeyError traceback ('unexpected_percent') for a failed
# distinct-values expectation and renders the page anyway: noise around the stage's message.
logging.getLogger(
    "great_expectations.render.renderer.content_block.validation_results_table_content_block"
).setLevel(logging.CRITICAL)

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


# Why each problem column matters and what to do, for failure messages.
REMEDIES = {
    "label_conflict": "keep each of these images under its one right class folder",
    "train_test_leak": "remove these test images (or their train copies) so the test split "
    "measures unseen images, or set validate.allow_train_test_duplicates: true",
    "duplicate": "remove the extra copies",
    "bad_file": "fix or remove them (they were left out of the dataset)",
    "tiny": "check they are real examples; validate.min_image_side sets the limit",
    "odd_aspect": "check they are real examples; validate.max_aspect_ratio sets the limit",
    "blurry": "check they are usable",
    "dark": "check they are usable",
    "too_few": "add images of these classes to that split (or lower the validate limit named)",
    "test_imbalance": "none needed: evaluate reports balanced accuracy and per-class recall",
}
TITLES = {
    "label_conflict": "label conflicts (one image under two labels)",
    "train_test_leak": "train/test leakage (test images also in train)",
    "duplicate": "duplicates within a split",
    "bad_file": "unusable files",
    "tiny": "tiny images",
    "odd_aspect": "odd aspect ratios",
    "blurry": "blurry images",
    "dark": "dark images",
    "imbalance": "class imbalance in train",
    "test_imbalance": "class imbalance in test",
    "too_few": "classes too small to learn or to test",
}


def image_table(dataset: Dataset, findings: Findings) -> pd.DataFrame:
    """The per-file findings joined with the facts of the stored arrays (bad files: none)."""
    facts = metadata_table(dataset).drop(columns=["class_count", "class_share", "in_both_splits"])
    facts["index"] = facts.groupby("split").cumcount()
    files = findings.files.drop(columns=["label"], errors="ignore")
    keep = ["file", "split", "class", "index", *PROBLEM_COLUMNS]
    table = files[keep].merge(facts, on=["split", "index"], how="left")
    table[list(PROBLEM_COLUMNS)] = table[list(PROBLEM_COLUMNS)].fillna("")
    return table.drop(columns=["index"])


def class_table(findings: Findings) -> pd.DataFrame:
    """One row per split and class; problem texts are "" when the class is fine."""
    table = findings.classes.copy()
    table[list(CLASS_COLUMNS)] = table[list(CLASS_COLUMNS)].fillna("")
    return table


def _severity(column: str, cfg: ValidateParams, class_balance: str) -> str:
    if column in ("label_conflict", "too_few"):
        return "critical"
    if column == "train_test_leak":
        return "warning" if cfg.allow_train_test_duplicates else "critical"
    # Imbalance (train or test) is only reported: train.class_balance corrects it in training.
    return "warning"


def build_suites(
    dataset: Dataset, cfg: ValidateParams, class_balance: str = "none"
) -> dict[str, Any]:
    """The expectations every dataset must meet, per table (``images``, ``classes``).

    Problems are text columns that must be empty: a failure lists the texts, which name the
    files and classes. Severity "warning" is reported but lets the data through.
    """
    import great_expectations as gx

    k = dataset.num_classes
    c, h, w = dataset.meta["image_shape"][2], *dataset.meta["image_shape"][:2]
    e = gx.expectations
    images = [
        e.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(k))),
        e.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=list(range(k))),
        e.ExpectColumnValuesToBeInSet(column="height", value_set=[h]),
        e.ExpectColumnValuesToBeInSet(column="width", value_set=[w]),
        e.ExpectColumnValuesToBeInSet(column="channels", value_set=[c]),
        e.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
        e.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
        e.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
    ]
    # A problem column must be empty; GX lists the texts of the rows where it is not.
    images += [
        e.ExpectColumnValuesToBeInSet(
            column=col, value_set=[""], severity=_severity(col, cfg, class_balance)
        )
        for col in PROBLEM_COLUMNS
    ]
    classes = [
        e.ExpectColumnValuesToBeInSet(
            column=col, value_set=[""], severity=_severity(col, cfg, class_balance)
        )
        for col in CLASS_COLUMNS
    ]
    suites = {}
    for name, expectations in (("images", images), ("classes", classes)):
        suite = gx.ExpectationSuite(name=f"{SUITE_NAME}_{name}")
        for expectation in expectations:
            suite.add_expectation(expectation)
        suites[name] = suite
    return suites


@dataclass
class ValidationOutcome:
    success: bool
    failures: list[str]
    summary: dict[str, Any]
    data_docs: Path | None
    warnings: list[str] = field(default_factory=list)
    findings: Findings | None = None


def _listing(values: list[Any], limit: int = 10) -> str:
    values = [v for v in dict.fromkeys(values) if v]
    shown = "; ".join(str(v) for v in values[:limit])
    more = (
        f"; and {len(values) - limit} more (see the data quality report)"
        if len(values) > limit
        else ""
    )
    return shown + more


def _describe(result: Any, class_balance: str = "none") -> str:
    """One line per failed expectation; problem columns list their texts and the remedy."""
    cfg = result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
    detail = result.result or {}
    column = kwargs.get("column", "")
    values = detail.get("unexpected_list") or detail.get("partial_unexpected_list") or []
    if kwargs.get("value_set") == [""] and column in TITLES:
        text = (
            f"{TITLES[column]}: {detail.get('unexpected_count', len(values))}: {_listing(values)}"
        )
        if column == "imbalance":
            if class_balance != "none":
                how = (
                    "a class-weighted loss" if class_balance == "weights" else "a balanced sampler"
                )
                return (
                    f"{text}. Corrected in training: train.class_balance is {class_balance} ({how})"
                )
            rare = [str(v).split(":")[0] for v in values if "under-represented" in str(v)]
            more = f", or add images of the rarer classes ({', '.join(rare)})" if rare else ""
            return (
                f"{text}. Not corrected: train.class_balance is none; set it to weights "
                f"(class-weighted loss) or sampler (balanced sampler) to correct it{more}"
            )
        return f"{text}. Fix: {REMEDIES[column]}"
    parts = [f"{cfg.type}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"]
    if "unexpected_count" in detail:
        parts.append(f"{detail['unexpected_count']} rows failed (e.g. {_listing(values, 5)})")
    if "observed_value" in detail:
        parts.append(f"observed {detail['observed_value']!r}")
    return ": ".join(parts)


def _add_checkpoint(context: Any, name: str, suite: Any) -> Any:
    import great_expectations as gx

    source = context.data_sources.add_or_update_pandas(name="dataset")
    try:
        asset = source.get_asset(name)
    except LookupError:
        asset = source.add_dataframe_asset(name=name)
    try:
        batch = asset.get_batch_definition(f"all_{name}")
    except (KeyError, LookupError):
        batch = asset.add_batch_definition_whole_dataframe(f"all_{name}")
    suite = context.suites.add_or_update(suite)
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"validate_{name}", data=batch, suite=suite)
    )
    return context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=f"validate_{name}",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
            result_format={"result_format": "COMPLETE"},
        )
    )


def validate_dataset(
    dataset: Dataset,
    cfg: ValidateParams,
    gx_dir: Path,
    *,
    folder: Path | None = None,
    class_balance: str = "none",
) -> ValidationOutcome:
    """Run the suites through a file-backed GX context so Data Docs land in ``gx_dir``.

    ``folder`` is the dataset folder (its ``files.csv`` gives folder datasets their per-file
    checks); ``class_balance`` is train.class_balance, which the imbalance warning names.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    findings = assess(dataset, folder, cfg)
    tables = {"images": image_table(dataset, findings), "classes": class_table(findings)}
    context = gx.get_context(mode="file", project_root_dir=str(gx_dir))
    # GX draws a tqdm bar per metric batch on stderr: noise in a stage's log and its failure.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    failures: list[str] = []
    warnings: list[str] = []
    evaluated = 0
    for name, suite in build_suites(dataset, cfg, class_balance).items():
        checkpoint = _add_checkpoint(context, name, suite)
        result = checkpoint.run(batch_parameters={"dataframe": tables[name]})
        for suite_result in result.run_results.values():
            for item in suite_result.results:
                evaluated += 1
                if item.success:
                    continue
                severity = str(getattr(item.expectation_config, "severity", "critical"))
                target = warnings if severity.lower().endswith("warning") else failures
                target.append(_describe(item, class_balance))
    docs = gx_dir / DATA_DOCS_INDEX
    table = tables["images"]
    summary = {
        "success": not failures,
        "expectations": evaluated,
        "failed": len(failures),
        "failures": failures,
        "warnings": warnings,
        "rows": len(table),
        "train_images": len(dataset.train),
        "test_images": len(dataset.test),
        "train_test_duplicates": int((table["train_test_leak"] != "").sum()),
        "class_counts": {
            split: {
                str(k): int(v)
                for k, v in enumerate(np.bincount(s.labels, minlength=dataset.num_classes))
            }
            for split, s in (("train", dataset.train), ("test", dataset.test))
        },
        "problems": findings.counts(),
        # The kinds of problem that fail the gate under these settings (the rest warn).
        "fails_on": [
            column
            for column in (*PROBLEM_COLUMNS, *CLASS_COLUMNS)
            if _severity(column, cfg, class_balance) == "critical"
        ],
    }
    return ValidationOutcome(
        not failures, failures, summary, docs if docs.is_file() else None, warnings, findings
    )

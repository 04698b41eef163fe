"""Stage validate: the Great Expectations gate, plus the data-quality report a person reads."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from imageclf.config import Params
from imageclf.data.quality_report import write_reports
from imageclf.data.store import load_dataset
from imageclf.data.validation import DATA_DOCS_INDEX, validate_dataset
from imageclf.errors import StageError
from imageclf.io import write_json
from imageclf.paths import ProjectPaths
from imageclf.stage import main


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Validate data/dataset; on failure keep the last good report and say what failed."""
    dataset = load_dataset(paths.dataset)
    balance = params.train.class_balance
    docs_dir, failed_dir = paths.validation_docs, paths.validation_failed
    paths.reports.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".validation.", dir=paths.reports))
    try:
        outcome = validate_dataset(
            dataset, params.validate_, work, folder=paths.dataset, class_balance=balance
        )
        assert outcome.findings is not None
        # Written pass or fail: the page is how a person finds what to fix.
        write_reports(
            outcome.findings,
            dataset,
            outcome.summary,
            paths.data_quality_report,
            paths.data_quality_html,
            balance,
        )
        if not outcome.success:
            shutil.rmtree(failed_dir, ignore_errors=True)
            shutil.move(work, failed_dir)
            write_json(failed_dir / paths.validate_report.name, outcome.summary)
            listing = "\n  - ".join(outcome.failures)
            raise StageError(
                f"the dataset failed {len(outcome.failures)} of {outcome.summary['expectations']} "
                f"expectations:\n  - {listing}\nThumbnails of every problem: "
                f"{paths.data_quality_html}; Data Docs: {failed_dir}. Fix the data (or the "
                "settings named above) and rerun."
            )
        shutil.rmtree(docs_dir, ignore_errors=True)
        shutil.move(work, docs_dir)
        shutil.rmtree(failed_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        **outcome.summary,
        "data_docs": str((docs_dir / DATA_DOCS_INDEX).relative_to(paths.root)),
        "data_quality_html": str(paths.data_quality_html.relative_to(paths.root)),
    }
    write_json(paths.validate_report, summary)
    return summary


if __name__ == "__main__":
    main(run)

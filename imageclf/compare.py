"""Compare the last N training runs side by side, as a person does in the MLflow UI.

`python -m imageclf.compare --last 5` prints the table and writes reports/compare.md and
reports/compare.csv: one row per run, its key parameters and metrics, the best run marked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from imageclf.config import load_params
from imageclf.io import write_text
from imageclf.metric_names import ONNXRUNTIME_FP32, SERVED_LATENCY_METRIC, bench_metric
from imageclf.paths import get_paths
from imageclf.tracking import tracking_uri

PARAM_COLUMNS = [
    "train.model",
    "train.width",
    "train.epochs",
    "train.lr",
    "train.batch_size",
    "data.fraction",
]
ORT_THROUGHPUT_METRIC = bench_metric(ONNXRUNTIME_FP32, 64, "images_per_second")
METRIC_COLUMNS = [
    "test_accuracy",
    "macro_f1",
    "val_accuracy",
    "train_seconds",
    SERVED_LATENCY_METRIC,
    ORT_THROUGHPUT_METRIC,
]
SHORT = {
    SERVED_LATENCY_METRIC: "ort_p50_ms_b1",
    ORT_THROUGHPUT_METRIC: "ort_img_s_b64",
}


def compare_runs(experiment: str, last: int, tracking: str) -> pd.DataFrame:
    """The ``last`` finished runs of ``experiment``, newest first, best accuracy marked."""
    import mlflow

    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        order_by=["start_time DESC"],
        max_results=last,
        filter_string="attributes.status = 'FINISHED'",
    )
    if runs.empty:
        return pd.DataFrame()
    table = pd.DataFrame(
        {
            "run": runs["tags.mlflow.runName"].fillna("") if "tags.mlflow.runName" in runs else "",
            "run_id": runs["run_id"].str[:8],
            "started": pd.to_datetime(runs["start_time"]).dt.strftime("%Y-%m-%d %H:%M"),
        }
    )
    for col in PARAM_COLUMNS:
        table[col.split(".", 1)[1]] = runs.get(f"params.{col}")
    for col in METRIC_COLUMNS:
        table[SHORT.get(col, col)] = runs.get(f"metrics.{col}")
    table["best"] = ""
    if table["test_accuracy"].notna().any():
        table.loc[table["test_accuracy"].idxmax(), "best"] = "★"
    return table


def to_markdown(table: pd.DataFrame) -> str:
    def fmt(value: object) -> str:
        if isinstance(value, float):
            return "" if pd.isna(value) else f"{value:.4g}"
        return "" if value is None else str(value)

    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m imageclf.compare", description=__doc__)
    parser.add_argument("--last", type=int, default=5, help="how many recent runs (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="folder for compare.md/.csv")
    args = parser.parse_args(argv)
    paths = get_paths()
    params = load_params(paths.params)
    table = compare_runs(params.train.mlflow_experiment, args.last, tracking_uri(paths))
    if table.empty:
        print(
            f"No finished runs in experiment {params.train.mlflow_experiment!r} yet: "
            "run `make run` or the training flow first."
        )
        return
    markdown, csv = paths.compare_markdown, paths.compare_csv
    if args.out:  # the same file names in another folder
        markdown, csv = args.out / markdown.name, args.out / csv.name
    write_text(markdown, to_markdown(table))
    write_text(csv, table.to_csv(index=False))
    from rich.console import Console
    from rich.table import Table

    view = Table(title=f"Last {len(table)} runs of {params.train.mlflow_experiment}")
    for col in table.columns:
        view.add_column(col, justify="right" if col not in ("run", "run_id", "started") else "left")
    for row in table.itertuples(index=False):
        view.add_row(
            *[
                f"{v:.4g}"
                if isinstance(v, float) and not pd.isna(v)
                else ("" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
                for v in row
            ],
            style="bold green" if row.best else None,
        )
    Console(width=200).print(view)
    print(f"written: {markdown}, {csv}")


if __name__ == "__main__":
    main()

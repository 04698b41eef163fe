"""A short summary of the last pipeline run, for a person: `python -m imageclf.summary`.

`dvc metrics show` prints every number of every report in one row about 200 columns wide. What
`make run` should end with is a few answers: how accurate (balanced too, and on which class the
model is weakest), whether a class is rare and how training treated it, how long it trained, how
big and how fast the served model is, which registry version serves, and where the details are.
Each answer comes from the file the pipeline wrote (named in :mod:`imageclf.paths`); a missing or
unreadable report becomes one line that says which stage writes it, never a traceback.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imageclf.config import Params, load_params
from imageclf.metric_names import BALANCED_ACCURACY, WORST_RECALL
from imageclf.paths import ProjectPaths, get_paths
from imageclf.tracking import tracking_uri

# Registry status as imageclf.registry.status returns it; replaceable in tests.
StatusFn = Callable[[Params, ProjectPaths], dict[str, Any]]


@dataclass
class Summary:
    """What gets printed: (label, text) lines, the p50 latency table, and where things are."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    latency_batches: list[int] = field(default_factory=list)
    # backend -> batch size -> p50 ms
    latency: dict[str, dict[int, float]] = field(default_factory=dict)
    latency_note: str = ""
    locations: list[tuple[str, str]] = field(default_factory=list)


def read_report(path: Path) -> dict[str, Any] | None:
    """The report as a dict, or None when it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def missing(paths: ProjectPaths, path: Path, stage: str) -> str:
    """One line for a report that is not there (or not readable), naming the stage to run."""
    if path.exists():
        return f"{relative(paths, path)} is not readable: rerun `dvc repro {stage}`"
    return f"no {relative(paths, path)}: run `dvc repro {stage}`"


def relative(paths: ProjectPaths, path: Path) -> str:
    try:
        return str(path.relative_to(paths.root))
    except ValueError:
        return str(path)


def duration(seconds: float) -> str:
    """``313.2`` -> ``5 min 13 s``: training times span seconds to hours."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def size(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes} B"
    if num_bytes < 1024**2:
        return f"{num_bytes / 1024:.1f} KiB"
    return f"{num_bytes / 1024**2:.1f} MiB"


def accuracy_line(paths: ProjectPaths) -> str:
    report = read_report(paths.evaluate_report)
    if report is None or "test_accuracy" not in report:
        return missing(paths, paths.evaluate_report, "evaluate")
    text = f"{report['test_accuracy']:.4f}"
    details = []
    if "num_test_images" in report:
        details.append(f"{report['num_test_images']} test images")
    if report.get("tta_flip"):
        details.append("with flip TTA")
    return f"{text} ({', '.join(details)})" if details else text


def percent(share: float) -> str:
    """``0.0203`` -> ``2.0%``; ``0.1`` -> ``10%``; ``0.0003`` -> ``<0.1%`` (never a "0.0%"
    that reads as none)."""
    if 0 < share < 0.001:
        return "<0.1%"
    text = f"{share:.1%}"
    return text.replace(".0%", "%") if share >= 0.1 else text


def balanced_line(paths: ProjectPaths) -> str:
    """Balanced accuracy and the class the model finds hardest: what accuracy hides."""
    report = read_report(paths.evaluate_report)
    if report is None:
        return missing(paths, paths.evaluate_report, "evaluate")
    if BALANCED_ACCURACY not in report:
        return (
            f"not in {relative(paths, paths.evaluate_report)} (an older evaluate): "
            "rerun `dvc repro evaluate`"
        )
    text = f"{report[BALANCED_ACCURACY]:.4f}"
    worst = report.get("worst_recall_class")
    if worst is not None:
        text += f" (worst recall: {worst} {report[WORST_RECALL]:.4f})"
    return text


def classes_line(paths: ProjectPaths) -> str:
    """The rare classes of the training split, in plain words, and how training treated them."""
    report = read_report(paths.evaluate_report)
    if report is None:
        return missing(paths, paths.evaluate_report, "evaluate")
    balance = report.get("class_balance")
    how = f"class_balance: {balance}" if balance else "class_balance not recorded"
    rare = report.get("rare_classes")
    if not isinstance(rare, dict):
        return f"{how}; rare classes not in {relative(paths, paths.evaluate_report)}"
    if not rare:
        return f"no rare class; {how}"
    expected = percent(float(report["uniform_train_share"]))
    described = []
    for name, row in rare.items():
        images = row["train_images"]
        recall = f", test recall {row['test_recall']:.2f}" if "test_recall" in row else ""
        described.append(
            f"{name}: {images} train image{'s' if images != 1 else ''}, "
            f"{percent(float(row['train_share']))} of train, expected about {expected}{recall}"
        )
    word = "rare class" if len(rare) == 1 else "rare classes"
    hint = " (nothing compensated: try train.class_balance weights or sampler)" * (
        balance == "none"
    )
    return f"{word} {'; '.join(described)}. {how}{hint}"


def training_line(paths: ProjectPaths) -> str:
    report = read_report(paths.train_report)
    if report is None or "train_seconds" not in report:
        return missing(paths, paths.train_report, "train")
    what = [str(report[k]) for k in ("model",) if k in report]
    if "parameters" in report:
        what.append(f"{report['parameters']:,} parameters")
    epochs = f"{report['epochs']} epochs in " if "epochs" in report else ""
    return f"{epochs}{duration(report['train_seconds'])}" + (
        f" ({', '.join(what)})" if what else ""
    )


def size_line(paths: ProjectPaths) -> str:
    """The served ONNX file, and the INT8 one when the optimize stage kept it (else why not).

    Sizes are the files'; in a workspace without them (a clone before `dvc pull`), the sizes
    the export and optimize reports recorded."""
    export = read_report(paths.export_report) or {}
    onnx = file_size(paths.onnx, export.get("file_bytes"))
    if onnx is None:
        return missing(paths, paths.onnx, "export")
    text = f"ONNX {onnx}"
    optimize = read_report(paths.optimize_report)
    if optimize is None or "int8_kept" not in optimize:
        return f"{text}; INT8: {missing(paths, paths.optimize_report, 'optimize')}"
    quant = optimize.get("int8_static") or {}
    if optimize["int8_kept"]:
        speedup = optimize.get("int8_speedup")
        faster = f", {speedup:.2f}x faster" if isinstance(speedup, (int, float)) else ""
        int8 = file_size(paths.onnx_int8, quant.get("int8_bytes")) or "(size unknown)"
        return f"{text}, INT8 {int8} (kept{faster})"
    return f"{text}; INT8 not kept ({quant.get('reason', 'rejected')})"


def file_size(path: Path, recorded: Any) -> str | None:
    """The size of ``path``, else the ``recorded`` one (marked so), else None."""
    if path.is_file():
        return size(path.stat().st_size)
    return f"{size(int(recorded))} as recorded" if isinstance(recorded, (int, float)) else None


def add_latency(summary: Summary, paths: ProjectPaths) -> None:
    report = read_report(paths.benchmark_report)
    rows = report.get("rows") if report else None
    if not isinstance(rows, list) or not rows:
        summary.latency_note = missing(paths, paths.benchmark_report, "benchmark")
        return
    for row in rows:
        try:
            backend, batch, p50 = str(row["backend"]), int(row["batch_size"]), row["p50_ms"]
        except (KeyError, TypeError, ValueError):
            continue
        summary.latency.setdefault(backend, {})[batch] = float(p50)
    if not summary.latency:
        summary.latency_note = f"{relative(paths, paths.benchmark_report)} has no latency rows"
        return
    summary.latency_batches = sorted({b for by_batch in summary.latency.values() for b in by_batch})
    threads = report.get("threads")
    summary.latency_note = f"{threads} threads" if threads else ""


def registry_status(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """imageclf.registry's status of this project's registered model (imports MLflow: slow)."""
    from imageclf.registry import status

    return status(params.registry, tracking_uri(paths))


def champion_line(paths: ProjectPaths, params: Params, status: StatusFn | None) -> str:
    """Which registered version is champion; says so when there is no registry yet."""
    name = params.registry.model_name
    if status is None:
        return "not looked up (--no-registry)"
    if tracking_uri(paths) == f"sqlite:///{paths.mlflow_db}" and not paths.mlflow_db.is_file():
        # Opening the store would create an empty one: say what is missing instead.
        return f"no registry yet ({relative(paths, paths.mlflow_db)} does not exist)"
    try:
        found = status(params, paths)
    except Exception as exc:  # MLflow raises many types (store, schema, connection)
        return f"registry not readable: {type(exc).__name__}: {exc}"
    versions = found.get("versions") or []
    if not versions:
        return f"no registered versions of {name} yet (python -m imageclf.registry register)"
    champion, challenger = found.get("champion"), found.get("challenger")
    count = f"{len(versions)} version{'s' if len(versions) > 1 else ''}"
    if not champion:
        return f"no champion among {count} of {name} (python -m imageclf.registry promote)"
    extra = [f"challenger v{challenger}"] if challenger else []
    return f"{name} v{champion} ({', '.join([*extra, count])})"


def add_locations(summary: Summary, paths: ProjectPaths) -> None:
    """Where the reports, plots and Data Docs are: only what exists."""
    reports = sorted(paths.reports.glob("*.json")) if paths.reports.is_dir() else []
    summary.locations.append(
        (
            "reports",
            f"{relative(paths, paths.reports)}/*.json ({len(reports)} files; "
            "`dvc metrics show` lists every number)"
            if reports
            else f"none yet in {relative(paths, paths.reports)}/",
        )
    )
    plots = sorted(paths.plots.glob("*.png")) if paths.plots.is_dir() else []
    if plots:
        summary.locations.append(("plots", ", ".join(relative(paths, p) for p in plots)))
    if paths.error_analysis_html.is_file():
        summary.locations.append(("errors", relative(paths, paths.error_analysis_html)))
    if paths.data_quality_html.is_file():
        summary.locations.append(("data quality", relative(paths, paths.data_quality_html)))
    docs = (read_report(paths.validate_report) or {}).get("data_docs")
    if isinstance(docs, str) and (paths.root / docs).is_file():
        summary.locations.append(("data docs", docs))
    if paths.profile_trace.is_file():
        summary.locations.append(("profile trace", relative(paths, paths.profile_trace)))


def guarded(
    line: Callable[[ProjectPaths], str], paths: ProjectPaths, report: Path, stage: str
) -> str:
    """``line(paths)``, or one sentence when its report has other fields than expected (an
    older pipeline's, a hand-edited one): the summary ends `make run`, it must not crash it."""
    try:
        return line(paths)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return (
            f"{relative(paths, report)} has unexpected content ({exc!r}): rerun `dvc repro {stage}`"
        )


def gather(
    paths: ProjectPaths, params: Params, status: StatusFn | None = registry_status
) -> Summary:
    """Read what the pipeline wrote under ``paths`` (``status=None``: skip the registry)."""
    summary = Summary()
    summary.lines = [
        ("Test accuracy", guarded(accuracy_line, paths, paths.evaluate_report, "evaluate")),
        ("Balanced acc.", guarded(balanced_line, paths, paths.evaluate_report, "evaluate")),
        ("Classes", guarded(classes_line, paths, paths.evaluate_report, "evaluate")),
        ("Training", guarded(training_line, paths, paths.train_report, "train")),
        ("Model size", guarded(size_line, paths, paths.optimize_report, "optimize")),
        ("Champion", champion_line(paths, params, status)),
    ]
    add_latency(summary, paths)
    add_locations(summary, paths)
    return summary


def render(summary: Summary, console: Any | None = None) -> None:
    """Print ``summary`` with rich: a few labelled lines and one small latency table."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def labelled(title: str, rows: list[tuple[str, str]]) -> Table:
        table = Table(
            title=title, title_justify="left", title_style="bold", show_header=False, box=None
        )
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for label, text in rows:
            table.add_row(label, escape(text))
        return table

    console = console or Console()
    console.print(labelled("imageclf: the last pipeline run", summary.lines))

    if summary.latency:
        table = Table(
            title=f"p50 latency, ms ({escape(summary.latency_note)})"
            if summary.latency_note
            else None,
            title_justify="left",
            title_style="bold",
        )
        table.add_column("backend")
        for batch in summary.latency_batches:
            table.add_column(f"batch {batch}", justify="right")
        fastest = {
            b: min(v[b] for v in summary.latency.values() if b in v)
            for b in summary.latency_batches
        }
        for backend, by_batch in summary.latency.items():
            cells = []
            for b in summary.latency_batches:
                if b not in by_batch:
                    cells.append("-")
                    continue
                cell = f"{by_batch[b]:.2f}"
                cells.append(f"[bold green]{cell}[/]" if by_batch[b] == fastest[b] else cell)
            table.add_row(escape(backend), *cells)
        console.print(table)
    else:
        console.print(f"[bold]Latency[/]  {escape(summary.latency_note)}")

    console.print(
        labelled("Where things are", [*summary.locations, ("MLflow UI", "make mlflow-ui")])
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m imageclf.summary [--no-registry]`."""
    parser = argparse.ArgumentParser(prog="python -m imageclf.summary", description=__doc__)
    parser.add_argument(
        "--no-registry", action="store_true", help="skip the MLflow registry (faster)"
    )
    args = parser.parse_args(argv)
    paths = get_paths()
    params = load_params(paths.params)
    render(gather(paths, params, None if args.no_registry else registry_status))


if __name__ == "__main__":
    main()

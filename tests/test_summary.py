"""`python -m imageclf.summary`: the end of `make run`, read from small reports written here."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from imageclf.config import Params
from imageclf.paths import ProjectPaths
from imageclf.summary import gather, main, render
from tests.conftest import REPO


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ProjectPaths:
    """An empty project (the default SQLite tracking store, which does not exist yet)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return ProjectPaths(tmp_path)


def write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_reports(paths: ProjectPaths, int8_kept: bool = True) -> None:
    write(
        paths.train_report,
        {
            "model": "resnet_small",
            "parameters": 116602,
            "epochs": 12,
            "train_seconds": 313.2,
            "mlflow_run_id": "abc",
        },
    )
    write(
        paths.evaluate_report,
        {
            "test_accuracy": 0.93,
            "balanced_accuracy": 0.9123,
            "worst_recall": 0.78,
            "worst_recall_class": "Shirt",
            "num_test_images": 10000,
            "tta_flip": True,
            "class_balance": "none",
            "uniform_train_share": 0.1,
            "rare_classes": {},
        },
    )
    write(
        paths.optimize_report,
        {
            "int8_kept": int8_kept,
            "int8_speedup": 2.21,
            "int8_static": {"reason": "rejected: INT8 is not faster"},
        },
    )
    rows = [
        {"backend": backend, "batch_size": batch, "p50_ms": p50, "threads": 2}
        for backend, batch, p50 in [
            ("pytorch_eager", 1, 1.15),
            ("pytorch_eager", 64, 19.29),
            ("onnxruntime_fp32", 1, 0.28),
            ("onnxruntime_fp32", 64, 10.47),
        ]
    ]
    write(paths.benchmark_report, {"threads": 2, "rows": rows})
    paths.models.mkdir(parents=True, exist_ok=True)
    paths.onnx.write_bytes(b"x" * 2048)
    paths.onnx_int8.write_bytes(b"x" * 1024)
    paths.plots.mkdir(parents=True, exist_ok=True)
    paths.confusion_matrix_plot.write_bytes(b"png")
    paths.error_analysis_html.write_text("<html>")
    paths.data_quality_html.write_text("<html>")
    docs = "reports/validation/index.html"
    (paths.root / docs).parent.mkdir(parents=True, exist_ok=True)
    (paths.root / docs).write_text("<html>")
    write(paths.validate_report, {"success": True, "data_docs": docs})


def printed(paths: ProjectPaths, params: Params, status: Any) -> str:
    out = io.StringIO()
    render(gather(paths, params, status), Console(file=out, width=200))
    return out.getvalue()


def test_summary_answers_each_question_from_the_reports(paths, default_params):
    write_reports(paths)
    paths.mlflow_db.write_bytes(b"")  # a registry exists; its status comes from the stub below
    status = {
        "model": "imageclf-classifier",
        "champion": "2",
        "challenger": "3",
        "history": ["1", "2"],
        "versions": [1, 2, 3],
    }
    text = printed(paths, default_params, lambda params, paths_: status)
    assert "0.9300 (10000 test images, with flip TTA)" in text
    assert "0.9123 (worst recall: Shirt 0.7800)" in text
    assert "no rare class; class_balance: none" in text
    assert "12 epochs in 5 min 13 s (resnet_small, 116,602 parameters)" in text
    assert "ONNX 2.0 KiB, INT8 1.0 KiB (kept, 2.21x faster)" in text
    assert "imageclf-classifier v2 (challenger v3, 3 versions)" in text
    for p50 in ("1.15", "19.29", "0.28", "10.47"):
        assert p50 in text
    assert "p50 latency, ms (2 threads)" in text
    assert "reports/*.json (5 files" in text
    assert "reports/plots/confusion_matrix.png" in text
    assert "reports/errors.html" in text and "reports/data_quality.html" in text
    assert "reports/validation/index.html" in text
    assert max(len(line) for line in text.splitlines()) <= 120  # readable, not one wide row


def test_rejected_int8_says_why(paths, default_params):
    write_reports(paths, int8_kept=False)
    text = printed(paths, default_params, None)
    assert "ONNX 2.0 KiB; INT8 not kept (rejected: INT8 is not faster)" in text
    assert "not looked up (--no-registry)" in text


def test_missing_reports_and_registry_each_get_one_clear_line(paths, default_params):
    def must_not_open(params: Params, paths_: ProjectPaths) -> dict[str, Any]:
        raise AssertionError("opening a missing SQLite store would create it")

    text = printed(paths, default_params, must_not_open)
    assert "no reports/evaluate.json: run `dvc repro evaluate`" in text
    assert "no reports/train.json: run `dvc repro train`" in text
    assert "no models/model.onnx: run `dvc repro export`" in text
    assert "no reports/benchmark.json: run `dvc repro benchmark`" in text
    assert "no registry yet (mlflow.db does not exist)" in text
    assert not paths.mlflow_db.exists()


def test_an_empty_or_broken_registry_is_said_not_raised(paths, default_params):
    paths.mlflow_db.write_bytes(b"")
    empty = {
        "model": "imageclf-classifier",
        "champion": None,
        "challenger": None,
        "history": [],
        "versions": [],
    }
    assert "no registered versions of imageclf-classifier yet" in printed(
        paths, default_params, lambda params, paths_: empty
    )

    def broken(params: Params, paths_: ProjectPaths) -> dict[str, Any]:
        raise RuntimeError("database is locked")

    assert "registry not readable: RuntimeError: database is locked" in printed(
        paths, default_params, broken
    )


def test_cli_prints_the_summary(paths, monkeypatch, capsys):
    write_reports(paths)
    (paths.reports / "evaluate.json").write_text("{not json")  # a half-written report
    monkeypatch.setenv("IMAGECLF_ROOT", str(paths.root))
    main(["--no-registry"])
    out = " ".join(capsys.readouterr().out.split())  # an 80-column terminal wraps lines
    assert "reports/evaluate.json is not readable: rerun `dvc repro evaluate`" in out
    assert "12 epochs in 5 min 13 s" in out


def test_unexpected_content_is_one_line_and_text_is_not_markup(paths, default_params):
    write_reports(paths, int8_kept=False)
    write(paths.evaluate_report, {"test_accuracy": "n/a"})
    reason = "rejected: accuracy drop [0.02] exceeds 0.005"
    write(paths.optimize_report, {"int8_kept": False, "int8_static": {"reason": reason}})
    text = printed(paths, default_params, None)
    assert "reports/evaluate.json has unexpected content" in text
    assert reason in text  # rich would have swallowed "[0.02]" as a style tag


def test_sizes_come_from_the_reports_when_the_models_are_not_checked_out(paths, default_params):
    write_reports(paths)
    paths.onnx.unlink()
    paths.onnx_int8.unlink()
    write(paths.export_report, {"file_bytes": 534751})
    write(paths.optimize_report, {"int8_kept": True, "int8_static": {"int8_bytes": 192884}})
    text = printed(paths, default_params, None)
    assert "ONNX 522.2 KiB as recorded, INT8 188.4 KiB as recorded (kept)" in text


def test_a_rare_class_is_named_with_its_numbers_and_the_balancing_used(paths, default_params):
    write_reports(paths)
    report = json.loads(paths.evaluate_report.read_text())
    report.update(
        class_balance="sampler",
        rare_classes={
            "seven": {"train_images": 75, "train_share": 0.0203, "test_recall": 0.61},
            "one": {"train_images": 1, "train_share": 0.0003},
        },
    )
    write(paths.evaluate_report, report)
    text = " ".join(printed(paths, default_params, None).split())
    assert (
        "rare classes seven: 75 train images, 2.0% of train, expected about 10%, "
        "test recall 0.61; one: 1 train image, <0.1% of train, expected about 10%. "
        "class_balance: sampler"
    ) in text
    report.update(class_balance="none", rare_classes={"seven": report["rare_classes"]["seven"]})
    write(paths.evaluate_report, report)
    text = " ".join(printed(paths, default_params, None).split())
    assert "rare class seven: 75 train images" in text
    assert "class_balance: none (nothing compensated: try train.class_balance weights" in text


def test_an_older_evaluate_report_says_to_rerun_for_balanced_accuracy(paths, default_params):
    write_reports(paths)
    write(paths.evaluate_report, {"test_accuracy": 0.93, "num_test_images": 10000})
    text = " ".join(printed(paths, default_params, None).split())
    assert "0.9300 (10000 test images)" in text
    assert "not in reports/evaluate.json (an older evaluate): rerun `dvc repro evaluate`" in text
    assert "class_balance not recorded; rare classes not in reports/evaluate.json" in text

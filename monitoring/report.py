"""Compare the latest window of the prediction log with the reference; write what a person
reads (an HTML report with plots) and what a machine reads (a JSON verdict).

    python -m monitoring.report [--last 500]
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from imageclf.config import Params, load_params
from imageclf.io import write_json, write_text
from imageclf.paths import ProjectPaths, get_paths
from monitoring.drift import PIXEL_FEATURES, Thresholds, Verdict, detect
from monitoring.prediction_log import PredictionLog
from monitoring.reference import load_reference

log = logging.getLogger(__name__)


def log_path(paths: ProjectPaths, params: Params) -> Path:
    """The service's prediction log (monitoring.log_path; relative paths are under the root)."""
    return paths.resolve(params.monitoring.log_path)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(reference: dict[str, np.ndarray], window: dict[str, np.ndarray]) -> list[str]:
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for ax, (i, name) in zip(axes.flat, enumerate(PIXEL_FEATURES), strict=False):
        bins = np.linspace(0, 1, 31)
        ax.hist(reference["pixels"][:, i], bins, density=True, alpha=0.5, label="reference")
        ax.hist(window["pixels"][:, i], bins, density=True, alpha=0.5, label="window")
        ax.set_title(f"pixel {name}")
    axes.flat[-1].hist(
        reference["confidence"], np.linspace(0, 1, 21), density=True, alpha=0.5, label="reference"
    )
    axes.flat[-1].hist(
        window["confidence"], np.linspace(0, 1, 21), density=True, alpha=0.5, label="window"
    )
    axes.flat[-1].set_title("confidence")
    axes.flat[-1].legend()
    first = _png(fig)
    k = int(max(reference["predicted"].max(), window["predicted"].max(initial=0))) + 1
    ref_share = np.bincount(reference["predicted"], minlength=k) / len(reference["predicted"])
    win_share = np.bincount(window["predicted"], minlength=k) / max(len(window["predicted"]), 1)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.bar(np.arange(k) - 0.2, ref_share, 0.4, label="reference")
    ax.bar(np.arange(k) + 0.2, win_share, 0.4, label="window")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("share")
    ax.legend()
    return [first, _png(fig)]


def render_html(verdict: Verdict, images: list[str], classes: list[str] | None = None) -> str:
    status = "DRIFT" if verdict.drift else "no drift"
    color = "#b00" if verdict.drift else "#2a7"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{'yes' if t.get('drift') else 'no'}</td>"
        f"<td>{html.escape(json.dumps({k: v for k, v in t.items() if k != 'drift'})[:300])}"
        f"</td></tr>"
        for name, t in verdict.tests.items()
        if isinstance(t, dict)
    )
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in verdict.reasons) or "<li>none</li>"
    pictures = "".join(f'<img alt="plot" src="data:image/png;base64,{b}">' for b in images)
    legend = f"<p>classes: {html.escape(', '.join(classes))}</p>" if classes else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>imageclf monitoring"
        f"</title></head><body style='font-family:sans-serif;max-width:1100px;margin:auto'>"
        f"<h1>Monitoring: <span style='color:{color}'>{status}</span></h1>"
        f"<p>window of {verdict.window_size} predictions</p><h2>Why</h2><ul>{reasons}</ul>"
        f"<h2>Tests</h2><table border=1 cellpadding=4><tr><th>test</th><th>drift</th>"
        f"<th>numbers</th></tr>{rows}</table><h2>Distributions</h2>{pictures}{legend}"
        f"</body></html>"
    )


def only_version(window: dict[str, Any], version: str) -> dict[str, Any]:
    """The rows of ``window`` that ``version`` served (a window can span a promotion)."""
    keep = np.array([v == version for v in window["model_version"]], dtype=bool)
    return {
        key: (
            value[keep]
            if isinstance(value, np.ndarray)
            else [x for x, k in zip(value, keep, strict=True) if k]
        )
        for key, value in window.items()
    }


def served_reference(
    paths: ProjectPaths, params: Params, version: str
) -> tuple[dict[str, np.ndarray], str]:
    """The monitoring reference registered with ``version`` (the model whose predictions are
    being judged, whichever was promoted or rolled back to), and where it came from.

    Only a version the registry holds no reference for (registered before references were, or
    not from the registry at all) falls back to the workspace's ``models/reference.npz``.
    """
    from mlflow.exceptions import MlflowException

    from imageclf.registry import download_reference
    from imageclf.tracking import tracking_uri

    dest = paths.monitoring_reports / "references" / f"v{version}"
    try:
        registered = download_reference(
            tracking_uri(paths), params.registry.model_name, version, dest
        )
    except MlflowException as exc:  # no such model or version in this store
        log.warning("no registered reference for v%s (%s): using the workspace's", version, exc)
        registered = None
    if registered is not None:
        return load_reference(registered), f"registry: {params.registry.model_name} v{version}"
    return load_reference(paths.reference), f"workspace: {paths.reference}"


def run_monitoring(paths: ProjectPaths, params: Params, last: int = 500) -> dict[str, Any]:
    """Verdict on the last ``last`` logged predictions of the model version being served
    (the newest row's), against that version's own reference; writes the HTML report and the
    verdict (``paths.monitoring_report_html``, ``paths.monitoring_verdict``)."""
    source = log_path(paths, params)
    if not source.exists():
        raise FileNotFoundError(
            f"No prediction log at {source}: the service writes it once it "
            "has served requests (monitoring.log_predictions)."
        )
    window = PredictionLog(source).read_window(last=last)
    versions = sorted(set(window["model_version"]))
    if window["model_version"]:
        served = window["model_version"][-1]
        window = only_version(window, served)
        reference, reference_source = served_reference(paths, params, served)
    else:
        served, reference = None, load_reference(paths.reference)
        reference_source = f"workspace: {paths.reference}"
    verdict = detect(reference, window, Thresholds.from_params(params.monitoring))
    images = _plots(reference, window) if len(window["predicted"]) else []
    write_text(paths.monitoring_report_html, render_html(verdict, images))
    result = {
        **verdict.as_dict(),
        "report": str(paths.monitoring_report_html),
        "model_version": served,
        "model_versions": versions,
        "reference": reference_source,
    }
    write_json(paths.monitoring_verdict, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--last", type=int, default=500, help="window: the last N predictions")
    args = parser.parse_args(argv)
    paths = get_paths()
    try:
        result = run_monitoring(paths, load_params(paths.params), args.last)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        ("DRIFT: " + "; ".join(result["reasons"]))
        if result["drift"]
        else f"no drift in the last {result['window_size']} predictions"
    )
    print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


def log_path(paths: ProjectPaths, params: Params) -> Path:
    path = Path(params.monitoring.log_path)
    return path if path.is_absolute() else paths.root / path


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


def run_monitoring(
    paths: ProjectPaths, params: Params, last: int = 500, out_dir: Path | None = None
) -> dict[str, Any]:
    """Verdict on the last ``last`` logged predictions; writes report.html and verdict.json."""
    reference = load_reference(paths.models / "reference.npz")
    source = log_path(paths, params)
    if not source.exists():
        raise FileNotFoundError(
            f"No prediction log at {source}: the service writes it once it "
            "has served requests (monitoring.log_predictions)."
        )
    window = PredictionLog(source).read_window(last=last)
    verdict = detect(reference, window, Thresholds.from_params(params.monitoring))
    out_dir = out_dir or paths.reports / "monitoring"
    images = _plots(reference, window) if len(window["predicted"]) else []
    write_text(out_dir / "report.html", render_html(verdict, images))
    result = {
        **verdict.as_dict(),
        "report": str(out_dir / "report.html"),
        "model_versions": sorted(set(window["model_version"])),
    }
    write_json(out_dir / "verdict.json", result)
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

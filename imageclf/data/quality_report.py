"""The data-quality report a person reads: an HTML page with thumbnails, grouped by problem.

Great Expectations' Data Docs show which expectation failed; this page shows the images: each
offending file as a thumbnail with its path and label, duplicates and label conflicts side by
side, and the class counts as bars. Thumbnails are inline PNGs (one self-contained file). They
are read again only for the few files shown, rather than kept from the decoding pass for every
file.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imageclf.data.quality import DuplicateGroup, Findings
from imageclf.data.store import Dataset
from imageclf.io import write_json, write_text

THUMB = 96
MAX_CARDS = 120  # per section: the JSON and the stage's message count them all

SECTIONS = (
    ("label_conflict", "Label conflicts: one image under more than one label", "fail"),
    ("train_test_leak", "Train/test leakage: test images that are also in train", "fail"),
    ("duplicate", "Duplicates within a split", "warn"),
    ("bad_file", "Files that cannot be used (left out of the dataset)", "warn"),
    ("tiny", "Tiny images", "warn"),
    ("odd_aspect", "Odd aspect ratios", "warn"),
    ("blurry", "Blurry images (CleanVision)", "warn"),
    ("dark", "Dark images (CleanVision)", "warn"),
)


def _png_data_uri(image: Image.Image) -> str:
    image = image.convert("RGB")
    image.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnail(findings: Findings, dataset: Dataset, row: dict[str, Any]) -> str | None:
    """An inline PNG of the file (or stored image) ``row`` names; None when it cannot be read."""
    try:
        if findings.root is not None:
            with Image.open(findings.root / row["file"]) as img:
                img.draft("RGB", (THUMB * 2, THUMB * 2))
                return _png_data_uri(img)
        split = dataset.train if row["split"] == "train" else dataset.test
        array = np.asarray(split.images[int(row["file"].split("[")[1].rstrip("]"))])
        return _png_data_uri(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array))
    except Exception:  # a bad file is listed with its reason instead of a picture
        return None


def _card(findings: Findings, dataset: Dataset, row: dict[str, Any], note: str) -> str:
    uri = thumbnail(findings, dataset, row)
    picture = (
        f'<img src="{uri}" alt="{html.escape(row["file"])}">'
        if uri
        else '<div class="noimg">cannot be shown</div>'
    )
    return (
        f"<figure>{picture}<figcaption><b>{html.escape(str(row['class']))}</b><br>"
        f"<code>{html.escape(row['file'])}</code><br>{html.escape(note)}</figcaption></figure>"
    )


def _group_rows(group: DuplicateGroup, table: Any) -> list[dict[str, Any]]:
    return [table.loc[m["row"]].to_dict() for m in group.members]


def _section(findings: Findings, dataset: Dataset, column: str, title: str, level: str) -> str:
    table = findings.files
    flagged = table[table[column].notna()]
    if flagged.empty:
        return ""
    body = []
    if column in ("label_conflict", "train_test_leak", "duplicate"):
        test = {
            "label_conflict": lambda g: g.conflict,
            "train_test_leak": lambda g: g.leak,
            "duplicate": lambda g: any(table.loc[m["row"], "duplicate"] for m in g.members),
        }[column]
        for group in [g for g in findings.groups if test(g)][:MAX_CARDS]:
            cards = "".join(
                _card(findings, dataset, row, f"{row['split']}, {group.kind} duplicate")
                for row in _group_rows(group, table)
            )
            body.append(f'<div class="group">{cards}</div>')
    else:
        for _, row in flagged.head(MAX_CARDS).iterrows():
            note = str(row[column]).split(": ", 1)[-1]
            body.append(_card(findings, dataset, row.to_dict(), note))
        body = [f'<div class="cards">{"".join(body)}</div>']
    more = len(flagged) - MAX_CARDS
    extra = f"<p>…and {more} more files.</p>" if more > 0 else ""
    return (
        f'<section class="{level}"><h2>{html.escape(title)} ({len(flagged)} files)</h2>'
        f"{''.join(body)}{extra}</section>"
    )


def _classes_section(findings: Findings, class_balance: str) -> str:
    rows = []
    for r in findings.classes.to_dict("records"):
        texts = (r[k] for k in ("imbalance", "test_imbalance", "too_few"))
        problem = "; ".join(str(t) for t in texts if isinstance(t, str))
        width = min(100.0, 100 * r["share"] / max(2 * r["expected_share"], 1e-9))
        rows.append(
            f"<tr class={'bad' if problem else 'ok'}><td>{html.escape(r['split'])}</td>"
            f"<td>{html.escape(str(r['class']))}</td><td>{r['count']}</td>"
            f"<td>{r['share']:.1%}</td><td>{r['expected_share']:.1%}</td>"
            f'<td><div class="bar" style="width:{width:.0f}%"></div></td>'
            f"<td>{html.escape(problem)}</td></tr>"
        )
    note = f"train.class_balance is <b>{html.escape(class_balance)}</b>: " + (
        "train imbalance fails the gate; set it to weights or sampler, or add images."
        if class_balance == "none"
        else "training compensates, so train imbalance is a warning."
    )
    return (
        f"<section><h2>Classes</h2><p>{note}</p><table><tr><th>split</th><th>class</th>"
        "<th>images</th><th>share</th><th>expected</th><th></th><th>problem</th></tr>"
        f"{''.join(rows)}</table></section>"
    )


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
section{margin-bottom:2em} section.fail h2{color:#b00020} section.warn h2{color:#8a5a00}
.group,.cards{display:flex;flex-wrap:wrap;gap:.6em;margin:.5em 0;padding:.5em;
 border:1px solid #ddd;border-radius:6px}
figure{margin:0;width:180px;font-size:12px} figure img{display:block;max-width:96px;
 max-height:96px;image-rendering:pixelated;min-width:64px}
.noimg{width:96px;height:64px;background:#eee;display:flex;align-items:center;
 justify-content:center;font-size:11px;color:#666}
code{word-break:break-all} table{border-collapse:collapse;font-size:13px}
td,th{border-bottom:1px solid #eee;padding:2px 8px;text-align:left} tr.bad td{color:#b00020}
.bar{height:10px;background:#4a7fd4;min-width:1px}
"""


def render_html(
    findings: Findings, dataset: Dataset, summary: dict[str, Any], class_balance: str
) -> str:
    verdict = "passed" if summary.get("success") else "FAILED"
    items = (
        "".join(f"<li>{html.escape(text)}</li>" for text in summary.get("failures", []))
        or "<li>none</li>"
    )
    warnings = "".join(f"<li>{html.escape(text)}</li>" for text in summary.get("warnings", []))
    sections = "".join(_section(findings, dataset, *s) for s in SECTIONS)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Data quality</title>"
        f"<style>{STYLE}</style></head><body><h1>Data quality: {verdict}</h1>"
        f"<p>{len(findings.files)} files checked.</p><h2>Failures</h2><ul>{items}</ul>"
        + (f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else "")
        + sections
        + _classes_section(findings, class_balance)
        + "</body></html>"
    )


def write_reports(
    findings: Findings,
    dataset: Dataset,
    summary: dict[str, Any],
    json_path: Path,
    html_path: Path,
    class_balance: str,
) -> dict[str, Any]:
    """Write the counts (DVC metrics) and the HTML page, each atomically."""
    counts = {"success": bool(summary.get("success")), **findings.counts()}
    write_json(json_path, counts)
    write_text(html_path, render_html(findings, dataset, summary, class_balance))
    return counts

"""The data-quality report a person reads: an HTML page with thumbnails, grouped by problem.

Great Expectations' Data Docs show which expectation failed; this page opens with two tables,
one row per kind of problem (how many, and whether it fails the run) and one per class (train
and test counts, share, problems), then shows the images: every duplicate group side by side
(label conflicts, leakage, duplicates) with each file's name, split and label, and the other
offending files as thumbnails. Thumbnails are inline PNGs (one self-contained file). They are
read again only for the files shown, rather than kept from the decoding pass for every file.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imageclf.data.quality import CLASS_COLUMNS, PROBLEM_COLUMNS, DuplicateGroup, Findings
from imageclf.data.store import Dataset
from imageclf.data.validation import TITLES
from imageclf.io import write_json, write_text

THUMB = 160  # pixels: big enough to tell two photos apart side by side
# Per section, groups or files shown with pictures; further duplicate groups are listed by name
# only (the page stays a few MB), and the JSON and the stage's message count them all.
MAX_CARDS = 120
# Short names of per-file problems, for the per-class table.
SHORT = {
    "label_conflict": "label conflict",
    "train_test_leak": "in train and test",
    "duplicate": "duplicate",
    "bad_file": "unusable",
    "tiny": "tiny",
    "odd_aspect": "odd aspect",
    "blurry": "blurry",
    "dark": "dark",
}

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
        f"<figure>{picture}<figcaption>label <b>{html.escape(str(row['class']))}</b>, "
        f"{html.escape(str(row['split']))}<br><code>{html.escape(row['file'])}</code>"
        f"{'<br>' + html.escape(note) if note else ''}</figcaption></figure>"
    )


def _group_title(group: DuplicateGroup) -> str:
    words = [f"{group.kind} duplicate" + ("s" if len(group.members) > 2 else "")]
    if group.conflict:
        words.append(f"one image, {len(group.classes)} labels: {', '.join(group.classes)}")
    if group.leak:
        words.append("in train and test")
    return " · ".join(words)


def _group_line(group: DuplicateGroup) -> str:
    names = " = ".join(f"{m['file']} ({m['split']}, {m['class']})" for m in group.members)
    return f"<li>{html.escape(_group_title(group))}: <code>{html.escape(names)}</code></li>"


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
        groups = [g for g in findings.groups if test(g)]
        for group in groups[:MAX_CARDS]:
            cards = "".join(_card(findings, dataset, row, "") for row in _group_rows(group, table))
            body.append(
                f'<div class="group"><div class="gtitle">{html.escape(_group_title(group))}'
                f'</div><div class="pair">{cards}</div></div>'
            )
        if len(groups) > MAX_CARDS:
            lines = "".join(_group_line(g) for g in groups[MAX_CARDS:])
            body.append(f"<p>{len(groups) - MAX_CARDS} more groups, by name:</p><ul>{lines}</ul>")
        return (
            f'<section class="{level}"><h2>{html.escape(title)} ({len(flagged)} files in '
            f"{len(groups)} group{'s' if len(groups) != 1 else ''})</h2>{''.join(body)}</section>"
        )
    else:
        for _, row in flagged.head(MAX_CARDS).iterrows():
            note = str(row[column]).split(": ", 1)[-1]
            body.append(_card(findings, dataset, row.to_dict(), note))
        body = [f'<div class="cards">{"".join(body)}</div>']
    more = len(flagged) - MAX_CARDS
    extra = f"<p>…and {more} more files.</p>" if more > 0 else ""
    return (
        f'<section class="{level}"><h2>{html.escape(title)} ({len(flagged)} '
        f"file{'s' if len(flagged) != 1 else ''})</h2>"
        f"{''.join(body)}{extra}</section>"
    )


BALANCE_NOTES = {
    "none": "nothing corrects class imbalance in training; set it to weights (class-weighted "
    "loss) or sampler (balanced sampler) where classes differ much.",
    "weights": "training corrects class imbalance with a class-weighted loss.",
    "sampler": "training corrects class imbalance with a class-balanced sampler.",
}


def _summary_table(findings: Findings, summary: dict[str, Any]) -> str:
    """One row per kind of problem: how many, and whether that kind fails the run."""
    counts = findings.counts()
    fails_on = set(summary.get("fails_on", ()))
    groups = {
        "label_conflict": sum(g.conflict for g in findings.groups),
        "train_test_leak": sum(g.leak for g in findings.groups),
    }
    class_counts = {
        "imbalance": counts["imbalanced_classes"],
        "test_imbalance": counts["imbalanced_test_classes"],
        "too_few": counts["too_few_images"],
    }
    rows = []
    for column in (*PROBLEM_COLUMNS, *CLASS_COLUMNS):
        if column in class_counts:
            n = class_counts[column]
            found = f"{n} class{'es' if n != 1 else ''}"
        else:
            n = counts[column]
            found = f"{n} file{'s' if n != 1 else ''}"
            if groups.get(column):
                found += f" in {groups[column]} group{'s' if groups[column] != 1 else ''}"
        fails = column in fails_on
        state = "bad" if n and fails else "warn" if n else "ok"
        rows.append(
            f"<tr class={state}><td>{html.escape(TITLES[column])}</td><td>{found}</td>"
            f"<td>{'fails the run' if fails else 'warning only'}</td></tr>"
        )
    return (
        "<h2>Problems</h2><table class=summary><tr><th>problem</th><th>found</th>"
        f"<th>effect</th></tr>{''.join(rows)}</table>"
    )


def _class_table(findings: Findings) -> str:
    """One row per class: train and test counts, train share, and every problem it has."""
    table = findings.classes
    files = findings.files
    rows = []
    for name in dict.fromkeys(table["class"]):
        mine = table[table["class"] == name].set_index("split")
        train, test = mine.loc["train"], mine.loc["test"]
        texts = (train["too_few"], test["too_few"], train["imbalance"], test["test_imbalance"])
        # The class's own texts without its name ("bee: 2 train images, ..." -> "2 train ...").
        problems = [text.split(": ", 1)[-1] for text in texts if isinstance(text, str)]
        of_class = files[files["class"] == name]
        problems += [
            f"{n} {SHORT[col]}"
            for col in PROBLEM_COLUMNS
            if (n := int(of_class[col].notna().sum()))
        ]
        fails = isinstance(train["too_few"], str) or isinstance(test["too_few"], str)
        width = min(100.0, 100 * train["share"] / max(2 * train["expected_share"], 1e-9))
        rows.append(
            f"<tr class={'bad' if fails else 'warn' if problems else 'ok'}>"
            f"<td>{html.escape(str(name))}</td><td>{train['count']}</td><td>{test['count']}</td>"
            f"<td>{train['share']:.1%}</td>"
            f'<td><div class="bar" style="width:{width:.0f}%"></div></td>'
            f"<td>{html.escape('; '.join(problems))}</td></tr>"
        )
    uniform = float(table["expected_share"].iloc[0]) if len(table) else 0.0
    return (
        "<h2>Classes</h2><table class=classes><tr><th>class</th><th>train</th><th>test</th>"
        f"<th>train share</th><th>bar: uniform ({uniform:.1%}) fills half</th>"
        "<th>problems</th></tr>"
        f"{''.join(rows)}</table>"
    )


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
section{margin-bottom:2em} section.fail h2{color:#b00020} section.warn h2{color:#8a5a00}
.group,.cards{display:flex;flex-wrap:wrap;gap:.6em;margin:.5em 0;padding:.5em;
 border:1px solid #ddd;border-radius:6px}
.group{flex-direction:column;gap:.3em;display:inline-flex;margin-right:.6em;vertical-align:top}
.gtitle{font-size:13px;font-weight:600} .pair{display:flex;gap:.6em}
figure{margin:0;width:160px;font-size:12px} figure img{display:block;width:160px;height:160px;
 object-fit:contain;background:#f3f3f3;image-rendering:pixelated}
.noimg{width:160px;height:160px;background:#eee;display:flex;align-items:center;
 justify-content:center;font-size:11px;color:#666}
code{word-break:break-all} table{border-collapse:collapse;font-size:13px;margin-bottom:1em}
td,th{border-bottom:1px solid #eee;padding:3px 10px;text-align:left;vertical-align:top}
tr.bad td{color:#b00020;font-weight:600} tr.warn td{color:#8a5a00} tr.ok td{color:#555}
.bar{height:10px;background:#4a7fd4;min-width:1px;width:120px} td:nth-child(5){width:120px}
details{margin:1em 0} details li{font-size:13px;margin:.3em 0}
"""


def render_html(
    findings: Findings, dataset: Dataset, summary: dict[str, Any], class_balance: str
) -> str:
    """The page: verdict, a table of problems and one of classes, then the pictures (duplicate
    groups side by side), then the gate's full messages."""
    verdict = "passed" if summary.get("success") else "FAILED"
    failures, warnings = summary.get("failures", []), summary.get("warnings", [])
    messages = "".join(
        f"<li><b>{kind}</b>: {html.escape(text)}</li>"
        for kind, texts in (("fails", failures), ("warning", warnings))
        for text in texts
    )
    note = BALANCE_NOTES.get(class_balance, "")
    sections = "".join(_section(findings, dataset, *s) for s in SECTIONS)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Data quality</title>"
        f"<style>{STYLE}</style></head><body><h1>Data quality: {verdict}</h1>"
        f"<p>{len(findings.files)} files checked: {len(failures)} kinds of problem fail the "
        f"run, {len(warnings)} are warnings. train.class_balance is "
        f"<b>{html.escape(class_balance)}</b>: {html.escape(note)}</p>"
        + _summary_table(findings, summary)
        + _class_table(findings)
        + sections
        + (
            f"<details><summary>The gate's messages ({len(failures)} failures, "
            f"{len(warnings)} warnings)</summary><ul>{messages}</ul></details>"
            if messages
            else ""
        )
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

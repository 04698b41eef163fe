"""docs/course-map.md tells the truth about the course outline (docs/course-outline.md): every
bullet of the outline is a row, every row says where the topic lives and which test checks it
(or, in one line, why it is not in the code), and every file, function and test it names exists:
a renamed test or a moved module makes the map lie, and these tests say which row broke."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

import yaml

from tests.conftest import REPO

MAP = REPO / "docs" / "course-map.md"
OUTLINE = REPO / "docs" / "course-outline.md"
# `path/to/file.py`, `path/to/file.py::name`, and `::name` (in the file named just before it).
REFERENCE = re.compile(r"`((?:[\w./-]+/[\w.-]+\.\w+)?(?:::[\w\[\]-]+)*)`")
# Anything in backticks (a file is one with a slash, or a top-level file Git tracks), and a test.
CODE = re.compile(r"`([^`]+)`")
TEST_REFERENCE = re.compile(r"`tests/[\w/]+\.py(?:::[\w\[\]-]+)*`")
# What a row without a test says instead: "no test: " and a reason of a few words at least.
NO_TEST = re.compile(r"^no test: \S+(?: \S+){2,}")
STATUSES = ("done", "partial", "not in code")
# Rows under this heading are the project's own additions, not bullets of the outline.
BEYOND = "Beyond the outline"


@dataclass(frozen=True)
class Row:
    heading: str
    section: str
    topic: str
    status: str
    where: str
    checked_by: str


def normalise(text: str) -> str:
    """A bullet as the map quotes it: markdown emphasis gone, whitespace collapsed."""
    return " ".join(text.replace("**", "").replace("*", "").split())


def outline_bullets() -> list[tuple[str, str]]:
    """(section, text) of every bullet of the outline, in order: the `* ` bullets and
    sub-bullets of sections 1.1 to 7.2 and of bonus A-D, each mini-project's title and
    Module 8's numbered steps (section "8")."""
    bullets: list[tuple[str, str]] = []
    section: str | None = None
    mini_project: str | None = None
    for line in OUTLINE.read_text().splitlines():
        # "# ... Module 3: ..." or "### **3.1 ...**": the module, then its numbered sections.
        if heading := re.match(r"^# .*Module (\d+):|^###\s+\*\*(\d+\.\d+)\s", line):
            section = heading.group(1) or heading.group(2)
        elif heading := re.match(r"^###.*Mini-Project (\d+):", line):
            section = mini_project = f"mini-project {heading.group(1)}"
        elif heading := re.match(r"^###.*Bonus ([A-D]):", line):
            section = f"bonus {heading.group(1)}"
        elif mini_project and line.strip():  # the title: the first line under the heading
            bullets.append((mini_project, normalise(line)))
            mini_project = None
        elif (bullet := re.match(r"^\s*\* (.+)$", line)) and section:
            bullets.append((section, normalise(bullet.group(1))))
        elif (step := re.match(r"^\d+\. (.+)$", line)) and section == "8":
            bullets.append((section, normalise(step.group(1))))
    return bullets


def map_rows() -> list[Row]:
    """Every table row of the map with the `## ` heading it sits under (header rows skipped)."""
    rows: list[Row] = []
    heading = ""
    for line in MAP.read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == "§":
            continue
        assert len(cells) == 5, f"docs/course-map.md: a row needs 5 cells, not {len(cells)}: {line}"
        rows.append(Row(heading, *cells))
    return rows


def test_outline_parser_finds_every_kind_of_bullet():
    """The parser reads what the outline holds (so the next test cannot pass on nothing)."""
    bullets = outline_bullets()
    sections = {section for section, _ in bullets}
    assert {"1.1", "4.2", "7.2", "8", "bonus A", "bonus D", "mini-project 7"} <= sections
    assert ("2.3", "CrossEntropyLoss vs NLLLoss") in bullets  # a sub-bullet
    assert ("1.3", "Visualizing graphs with torchviz") in bullets  # emphasis removed
    assert ("8", "Evaluate latency & throughput") in bullets  # Module 8's last step
    assert [s for s, _ in bullets].count("8") == 12
    assert ("mini-project 1", "Build a Tensor Calculator (reshape, matrix multiplication, "
            "broadcasting, gradients)") in bullets  # fmt: skip
    assert len(bullets) == len(set(bullets)) > 130


def test_every_bullet_of_the_outline_is_a_row_of_the_map():
    rows = [r for r in map_rows() if r.heading != BEYOND]
    mapped = [(r.section, normalise(r.topic)) for r in rows]
    bullets = outline_bullets()
    missing = [f"  {s}: {t}" for s, t in bullets if (s, t) not in mapped]
    unknown = [f"  {s}: {t}" for s, t in mapped if (s, t) not in bullets]
    twice = sorted({f"  {s}: {t}" for s, t in mapped if mapped.count((s, t)) > 1})
    report = [
        ("no row for these outline bullets (section: bullet, as the outline words it)", missing),
        (f"rows that are no bullet of the outline (a typo, or a topic for '## {BEYOND}')", unknown),
        ("bullets with more than one row", twice),
    ]
    problems = [f"{title}:\n" + "\n".join(lines) for title, lines in report if lines]
    assert not problems, "docs/course-map.md has\n" + "\n".join(problems)


def names_a_file(cell: str, tracked: set[str]) -> bool:
    """Whether ``cell`` names a file or folder of the repository in backticks."""
    return any(
        "/" in code.split("::")[0] or code.split("::")[0] in tracked for code in CODE.findall(cell)
    )


def test_every_row_says_where_and_what_checks_it_or_why_not():
    """No empty cell and no dash: a row that names no test says why in words; a row marked
    done names the code and a test; one not in the code says why."""
    problems = []
    tracked = tracked_files()
    for row in map_rows():
        label = f"{row.section}: {row.topic}"
        cells = (row.section, row.topic, row.status, row.where, row.checked_by)
        if any(cell in ("", "-", "—", "–", "n/a", "TODO") for cell in cells):
            problems.append(f"{label}: an empty cell or a dash")
            continue
        if row.status not in STATUSES:
            problems.append(f"{label}: status {row.status!r} is not one of {STATUSES}")
        tested = bool(TEST_REFERENCE.search(row.checked_by))
        if not tested and not NO_TEST.match(row.checked_by):
            problems.append(f"{label}: names no `tests/...` and gives no 'no test: <reason>'")
        if row.status == "done" and not (tested and names_a_file(row.where, tracked)):
            problems.append(f"{label}: done, yet it names no file it lives in or no test")
        if row.status == "partial" and not names_a_file(row.where, tracked):
            problems.append(f"{label}: partial, yet it names no file of the part that exists")
        if row.status == "not in code" and len(row.where.split()) < 3:
            problems.append(f"{label}: not in code, yet the reason is missing")
    assert not problems, "docs/course-map.md rows that do not say enough:\n" + "\n".join(problems)


def references() -> list[tuple[str, str | None]]:
    """(file, name or None) for every code reference of the map, row by row."""
    found: list[tuple[str, str | None]] = []
    for row in MAP.read_text().splitlines():
        current: str | None = None
        for match in REFERENCE.finditer(row):
            path, _, name = match.group(1).partition("::")
            if path:
                current = path
            if current is None or not (path or name):
                continue
            found.append((current, name.split("[")[0].split("::")[-1] or None))
    return found


def pipeline_outputs() -> set[str]:
    """Files and folders a DVC stage writes: a clean clone has none of them until `make run`,
    yet the map may name them (or a file in such a folder), as long as dvc.yaml declares the
    stage that makes them."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs: set[str] = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                outs.add(next(iter(out)) if isinstance(out, dict) else out)
    return outs


def tracked_files() -> set[str]:
    """What a clean clone has: a file that exists only in this checkout must not count."""
    listing = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return set(listing.stdout.splitlines())


def test_every_file_function_and_test_the_map_names_exists():
    refs = references()
    assert len(refs) > 50  # the pattern still finds the map's references
    outputs, tracked = pipeline_outputs(), tracked_files()
    broken = []
    for path, name in refs:
        file = REPO / path
        written = any(path == out or path.startswith(f"{out}/") for out in outputs)
        if path not in tracked and not (name is None and written):
            if file.exists():
                broken.append(f"{path}: here, but Git does not track it (a clone lacks it)")
            else:
                broken.append(f"{path}: no such file, and no stage of dvc.yaml writes it")
        definition = rf"^\s*(?:async )?(?:def|class) {name}\b"
        if file.is_file() and name and not re.search(definition, file.read_text(), re.M):
            broken.append(f"{path}::{name}: no such function, class or test")
    broken = list(dict.fromkeys(broken))  # each once, in the map's order
    assert not broken, "docs/course-map.md names what does not exist:\n" + "\n".join(broken)

"""`make audit` (tools/audit.py): never clean unless every dependency was checked; the version
floors of pyproject.toml hold in the installed environment."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tools.audit import CLEAN, NOT_AUDITED, VULNERABLE, judge, own_distribution, parse_report

REPO = Path(__file__).resolve().parents[1]
AUDIT = [sys.executable, str(REPO / "tools" / "audit.py")]

# Reports as pip-audit 2.10 writes them with --format json (test_samples_match_pip_audit checks
# that the installed pip-audit still writes this structure).
VULNERABLE_REPORT = {
    "dependencies": [
        {
            "name": "pillow",
            "version": "10.0.0",
            "vulns": [{"id": "PYSEC-2023-175", "fix_versions": ["10.0.1"]}],
        },
        {
            "name": "python-multipart",
            "version": "0.0.6",
            "vulns": [
                {"id": "GHSA-2jv5-9r88-3w3p", "fix_versions": ["0.0.7"]},
                {"id": "GHSA-59g5-xgcq-4qw3", "fix_versions": ["0.0.18"]},
            ],
        },
        {"name": "numpy", "version": "2.4.6", "vulns": []},
        {"name": "imageclf", "skip_reason": "distribution marked as editable"},
    ],
    "fixes": [],
}
CLEAN_REPORT = {
    "dependencies": [
        {"name": "pillow", "version": "13.0.0", "vulns": []},
        {"name": "numpy", "version": "2.4.6", "vulns": []},
        {"name": "imageclf", "skip_reason": "distribution marked as editable"},
    ],
    "fixes": [],
}
# What a network that cannot reach PyPI's JSON API produces (here: every package answers 404).
UNREACHABLE_REPORT = {
    "dependencies": [
        {
            "name": "pillow",
            "skip_reason": "Dependency not found on PyPI and could not be audited: pillow (13.0.0)",
        },
        {"name": "numpy", "version": "2.4.6", "vulns": []},
    ],
    "fixes": [],
}


def test_samples_match_pip_audit() -> None:
    """The recorded samples are what the installed pip-audit's JSON formatter writes."""
    from pip_audit._format import JsonFormat
    from pip_audit._service import ResolvedDependency, SkippedDependency, VulnerabilityResult

    def vuln(id_: str, fix: str) -> VulnerabilityResult:
        return VulnerabilityResult(id_, "", [Version(fix)], set())

    result = {
        ResolvedDependency("pillow", Version("10.0.0")): [vuln("PYSEC-2023-175", "10.0.1")],
        ResolvedDependency("python-multipart", Version("0.0.6")): [
            vuln("GHSA-2jv5-9r88-3w3p", "0.0.7"),
            vuln("GHSA-59g5-xgcq-4qw3", "0.0.18"),
        ],
        ResolvedDependency("numpy", Version("2.4.6")): [],
        SkippedDependency("imageclf", "distribution marked as editable"): [],
    }
    written = JsonFormat(output_desc=False, output_aliases=False).format(result, [])
    assert json.loads(written) == VULNERABLE_REPORT


def test_vulnerabilities_are_listed_and_fail() -> None:
    report = parse_report(json.dumps(VULNERABLE_REPORT))
    status, message = judge(report, "pypi", own="imageclf")
    assert status == VULNERABLE
    assert "FOUND 3 known vulnerabilities in 2 packages" in message
    assert "pillow 10.0.0: PYSEC-2023-175; fixed in: 10.0.1" in message
    assert "python-multipart 0.0.6: GHSA-59g5-xgcq-4qw3; fixed in: 0.0.18" in message
    assert "INCOMPLETE" not in message  # the project's own editable install is not a dependency


def test_clean_only_when_every_dependency_was_checked() -> None:
    status, message = judge(parse_report(json.dumps(CLEAN_REPORT)), "pypi", own="imageclf")
    assert (status, message) == (
        CLEAN,
        "All 2 dependencies checked against the pypi vulnerability service: "
        "no known vulnerabilities.",
    )
    # One skipped dependency is enough to refuse "clean"; an empty report is no audit either.
    status, message = judge(parse_report(json.dumps(UNREACHABLE_REPORT)), "pypi", own="imageclf")
    assert status == NOT_AUDITED
    assert "could not check 1 of 2 dependencies" in message and "NOT a clean result" in message
    status, message = judge(parse_report('{"dependencies": []}'), "pypi", own="imageclf")
    assert status == NOT_AUDITED and "could not check 0 of 0" in message


def test_from_report_cli(tmp_path: Path) -> None:
    """The command line's exit status and streams, on recorded reports."""
    for report, expected in ((CLEAN_REPORT, CLEAN), (VULNERABLE_REPORT, VULNERABLE)):
        path = tmp_path / "report.json"
        path.write_text(json.dumps(report))
        proc = subprocess.run([*AUDIT, "--from-report", str(path)], capture_output=True, text=True)
        assert proc.returncode == expected, proc.stderr
    path.write_text("No known vulnerabilities found")
    proc = subprocess.run([*AUDIT, "--from-report", str(path)], capture_output=True, text=True)
    assert proc.returncode == NOT_AUDITED
    assert "AUDIT DID NOT RUN: not a pip-audit JSON report" in proc.stderr


def _consistent(proc: subprocess.CompletedProcess, kept: Path) -> None:
    """The verdict of a real run agrees with the report pip-audit really wrote (or with its
    absence): whatever this network reaches, a skipped dependency never passes as clean."""
    if not kept.exists():
        assert proc.returncode == NOT_AUDITED
        assert "AUDIT DID NOT RUN: pip-audit exited with" in proc.stderr
        assert "make audit" in proc.stderr  # and how to run it where the network allows
        return
    report = parse_report(kept.read_text())
    skipped = set(report.skipped) - {own_distribution()}
    if report.vulnerabilities:
        assert proc.returncode == VULNERABLE
    elif skipped:
        assert proc.returncode == NOT_AUDITED
        assert f"could not check {len(skipped)} of" in proc.stderr
        assert "NOT a clean result" in proc.stderr and "make audit" in proc.stderr
    else:
        assert proc.returncode == CLEAN and "no known vulnerabilities" in proc.stdout


def test_real_run_osv(tmp_path: Path) -> None:
    """A real pip-audit run against OSV (unreachable here: no report, exit 2, says why)."""
    kept = tmp_path / "osv.json"
    proc = subprocess.run(
        [*AUDIT, "--service", "osv", "--json-out", str(kept)], capture_output=True, text=True
    )
    _consistent(proc, kept)


@pytest.mark.slow
def test_real_run_pypi(tmp_path: Path) -> None:
    """The case of the issue, for real: PyPI's JSON API answers 404 for every package here,
    pip-audit skips them all and says "No known vulnerabilities found"; make audit fails."""
    kept = tmp_path / "pypi.json"
    proc = subprocess.run(
        [*AUDIT, "--service", "pypi", "--json-out", str(kept)], capture_output=True, text=True
    )
    _consistent(proc, kept)


def test_make_audit_target() -> None:
    """`make audit` runs this script (and nothing that could report clean on its own)."""
    dry = subprocess.run(
        ["make", "-n", "audit"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "tools/audit.py" in dry.stdout


def test_floors_hold_in_the_installed_environment() -> None:
    """Every requirement of pyproject (dev extra included) is met by what is installed: the
    advisory floors did not ask for anything this environment lacks."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    unmet = []
    for line in requirements:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate():
            continue
        installed = metadata.version(canonicalize_name(req.name))
        if not req.specifier.contains(installed, prereleases=True):
            unmet.append(f"{line} (installed {installed})")
    assert not unmet, unmet

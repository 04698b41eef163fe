"""Dependency audit (`make audit`): pip-audit over the project's environment, read strictly.

pip-audit prints "No known vulnerabilities found" and exits 0 when it could not check anything:
behind a mirror or proxy that answers 404 for PyPI's JSON API, every package is *skipped*, and
a skipped package looks clean in its summary. This wrapper reads pip-audit's JSON report and
says clean only when every installed distribution was checked; otherwise it fails loudly and
says how to run the audit where the network reaches a vulnerability database.

    python tools/audit.py [--service pypi|osv] [--json-out FILE] [-- EXTRA_PIP_AUDIT_ARGS]
    python tools/audit.py --from-report FILE     # judge a report pip-audit wrote elsewhere

Exit status: 0 every dependency checked, none vulnerable; 1 known vulnerabilities (listed);
2 the audit could not run or left dependencies unchecked (never reported as clean).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CLEAN, VULNERABLE, NOT_AUDITED = 0, 1, 2
# Where pip-audit's two services live: what the network must reach for an audit.
SERVICE_URLS = {
    "pypi": "https://pypi.org/pypi/<name>/<version>/json",
    "osv": "https://api.osv.dev/v1/query",
}
HOW_TO_RUN = (
    "To audit, run `make audit` on a machine whose network reaches {url}, e.g. in CI "
    "(`make audit AUDIT_SERVICE=osv` or `=pypi` picks the service: "
    + " or ".join(SERVICE_URLS.values())
    + "); or run `pip-audit --format json -o report.json` there against the same environment "
    "and judge it here with `python tools/audit.py --from-report report.json`."
)


@dataclass
class Vulnerability:
    package: str
    version: str
    id: str
    fix_versions: list[str]
    aliases: list[str] = field(default_factory=list)


@dataclass
class Report:
    """pip-audit's JSON report, split into what was checked, skipped and found."""

    checked: dict[str, str]  # canonical name -> version
    skipped: dict[str, str]  # canonical name -> pip-audit's reason
    vulnerabilities: list[Vulnerability]


class ReportError(ValueError):
    """The text is not a pip-audit JSON report."""


def parse_report(text: str) -> Report:
    """Read pip-audit's ``--format json`` output (pip_audit/_format/json.py): a
    ``dependencies`` list whose entries carry either ``skip_reason`` (not checked) or
    ``version`` and ``vulns`` (checked; ``vulns`` may be empty)."""
    try:
        data = json.loads(text)
        deps = data["dependencies"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ReportError(f"not a pip-audit JSON report ({exc})") from exc
    checked: dict[str, str] = {}
    skipped: dict[str, str] = {}
    vulns: list[Vulnerability] = []
    for dep in deps:
        name = canonicalize_name(dep["name"])
        if "skip_reason" in dep:
            skipped[name] = dep["skip_reason"]
            continue
        if "version" not in dep or "vulns" not in dep:
            raise ReportError(f"dependency entry without version/vulns or skip_reason: {dep}")
        checked[name] = dep["version"]
        vulns += [
            Vulnerability(
                name, dep["version"], v["id"], v.get("fix_versions", []), v.get("aliases", [])
            )
            for v in dep["vulns"]
        ]
    return Report(checked, skipped, vulns)


def own_distribution() -> str:
    """The project's own distribution (pyproject's name): skipped as editable, not a
    dependency, and not on any vulnerability database."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        return canonicalize_name(tomllib.load(f)["project"]["name"])


def judge(report: Report, service: str, own: str) -> tuple[int, str]:
    """Exit status and the sentences that explain it. Unchecked dependencies are never
    reported as clean, whatever pip-audit's own summary said."""
    skipped = {name: why for name, why in report.skipped.items() if name != own}
    total = len(report.checked) + len(skipped)
    lines: list[str] = []
    status = CLEAN
    if report.vulnerabilities:
        status = VULNERABLE
        packages = {v.package for v in report.vulnerabilities}
        lines.append(
            f"FOUND {len(report.vulnerabilities)} known vulnerabilities in {len(packages)} "
            "packages:"
        )
        for v in sorted(report.vulnerabilities, key=lambda v: (v.package, v.id)):
            fix = ", ".join(v.fix_versions) or "no fixed release yet"
            alias = f" ({', '.join(v.aliases)})" if v.aliases else ""
            lines.append(f"  {v.package} {v.version}: {v.id}{alias}; fixed in: {fix}")
        lines.append(
            "Raise the floor in pyproject.toml above the fixed release (with the advisory in a "
            "comment) and reinstall (`make setup`)."
        )
    if skipped or total == 0:
        first_name, first_why = next(iter(skipped.items()), ("-", "no dependencies listed"))
        unreachable = total > 0 and len(skipped) == total
        lines.append(
            f"AUDIT INCOMPLETE: pip-audit could not check {len(skipped)} of {total} "
            f"dependencies against the {service} vulnerability service (e.g. {first_name}: "
            f"{first_why}). This is NOT a clean result, even where pip-audit printed "
            "'No known vulnerabilities found'."
        )
        if unreachable:
            lines.append(
                f"Every dependency was skipped: the {service} service is unreachable from this "
                "network (a mirror or proxy that answers 404, or no route at all)."
            )
        lines.append(HOW_TO_RUN.format(url=SERVICE_URLS[service]))
        status = VULNERABLE if status == VULNERABLE else NOT_AUDITED
    if status == CLEAN:
        lines.append(
            f"All {total} dependencies checked against the {service} vulnerability service: "
            "no known vulnerabilities."
        )
    return status, "\n".join(lines)


def run_pip_audit(service: str, extra: list[str]) -> tuple[int, str | None, str]:
    """pip-audit over this interpreter's environment: (exit status, JSON report or None,
    stderr). The project itself (installed editable) is skipped: it is not a dependency."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "pip_audit",
            "--format",
            "json",
            "--progress-spinner",
            "off",
            "--skip-editable",
            "--vulnerability-service",
            service,
            "--output",
            str(out),
            *extra,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        text = out.read_text() if out.exists() and out.stat().st_size else None
    return proc.returncode, text, proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--service", choices=sorted(SERVICE_URLS), default="pypi")
    parser.add_argument("--from-report", type=Path, help="judge this pip-audit JSON report")
    parser.add_argument("--json-out", type=Path, help="also keep pip-audit's JSON report here")
    parser.add_argument("extra", nargs="*", help="after --: more pip-audit arguments")
    args = parser.parse_args(argv)

    if args.from_report:
        rc, text, stderr = 0, args.from_report.read_text(), ""
    else:
        print(f"pip-audit ({args.service}) over {sys.prefix} ...", file=sys.stderr, flush=True)
        rc, text, stderr = run_pip_audit(args.service, args.extra)
    if text is None:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        print(
            f"AUDIT DID NOT RUN: pip-audit exited with {rc} and wrote no report. Its last "
            f"words:\n{tail}\n" + HOW_TO_RUN.format(url=SERVICE_URLS[args.service]),
            file=sys.stderr,
        )
        return NOT_AUDITED
    if args.json_out:
        args.json_out.write_text(text)
    try:
        report = parse_report(text)
    except ReportError as exc:
        print(f"AUDIT DID NOT RUN: {exc}", file=sys.stderr)
        return NOT_AUDITED
    status, message = judge(report, args.service, own_distribution())
    print(message, file=sys.stderr if status else sys.stdout)
    return status


if __name__ == "__main__":
    sys.exit(main())

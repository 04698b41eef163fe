"""ops/compose.yaml describes the topology ops/team.py starts (and tests/test_team_mode.py
tests): the same services, the same published ports (params.yaml's team.*), the environment
variables each process gets, and the options of each command. No Docker engine is needed."""

from __future__ import annotations

import pytest
import yaml

from imageclf.config import load_params
from ops.team import DATABASES, TOPOLOGY, Team
from tests.conftest import REPO

COMPOSE = yaml.safe_load((REPO / "ops" / "compose.yaml").read_text())["services"]
TEAM = Team(REPO, load_params(REPO / "params.yaml").team)


def published(service: dict) -> set[int]:
    """Host ports of ``ports: ["127.0.0.1:HOST:CONTAINER"]`` entries."""
    return {int(str(entry).split(":")[-2]) for entry in service.get("ports", [])}


def test_same_services():
    assert set(COMPOSE) == {c.name for c in TOPOLOGY}


@pytest.mark.parametrize("component", TOPOLOGY, ids=lambda c: c.name)
def test_same_port_and_environment(component):
    service = COMPOSE[component.name]
    port = component.port(TEAM)
    assert published(service) == ({port} if port else set())
    missing = set(component.environment(TEAM)) - set(service.get("environment") or {})
    assert not missing, f"{component.name}: ops/compose.yaml lacks {sorted(missing)}"


@pytest.mark.parametrize("component", TOPOLOGY, ids=lambda c: c.name)
def test_same_command_options(component):
    """Each option ops/team.py passes (--serve-artifacts, --pool...) is in the compose command."""

    def names(args: list[str]) -> set[str]:  # "--pool", "--config.file=..." -> option names
        return {str(arg).split("=")[0] for arg in args if str(arg).startswith("--")}

    options = names(component.command(TEAM))
    command = names(COMPOSE[component.name].get("command") or [])
    assert options <= command, f"{component.name}: {sorted(options - command)}"


def test_the_databases_are_created_in_containers_too():
    init = (REPO / "ops" / "postgres-init.sql").read_text()
    assert all(f"CREATE DATABASE {db};" in init for db in DATABASES)
    for name in ("mlflow", "prefect-server"):
        text = yaml.safe_dump(COMPOSE[name])
        assert f"@postgres:5432/{'mlflow' if name == 'mlflow' else 'prefect'}" in text


def _engine_answers() -> bool:
    import shutil
    import subprocess

    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True).returncode == 0


@pytest.mark.skipif(_engine_answers(), reason="a Docker engine answers: containerize would run")
@pytest.mark.parametrize("docker_cli", [True, False], ids=["cli-without-engine", "no-cli"])
def test_containerize_builds_the_bento_then_says_there_is_no_engine(tmp_path, docker_cli):
    import os
    import shutil
    import subprocess

    docker = shutil.which("docker")
    if docker_cli and docker is None:
        pytest.skip("no docker command on this machine")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("make", "bash", "env", "git"):  # a PATH with these and, maybe, docker
        if found := shutil.which(tool):
            (bin_dir / tool).symlink_to(found)
    if docker_cli:
        (bin_dir / "docker").symlink_to(docker)
    env = {**os.environ, "PATH": str(bin_dir), "BENTOML_HOME": str(tmp_path / "bentoml")}
    # -o: the venv counts as installed (the test runs inside it).
    proc = subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", "containerize"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    expected = "no Docker engine answers" if docker_cli else "no docker command"
    assert f"make containerize: {expected}" in proc.stdout + proc.stderr
    assert list((tmp_path / "bentoml" / "bentos" / "imageclf").glob("*/bento.yaml"))

"""Team mode for real: `python -m ops.team up` in a fresh clone starts PostgreSQL, the MLflow and
Prefect servers on it, the work pool's worker and the service on loopback; a run started through
the API (what the UI's Run button does) is executed by the worker, registered and promoted in
the PostgreSQL-backed registry, and the service serves the new champion; its outputs reach the
DVC remote, from which a teammate's fresh clone pulls instead of recomputing; `down` leaves no
process behind.

One team (the module's fixture) serves every test, in file order, as a team's day goes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import psycopg
import pytest
import yaml

import ops.team
from ops.local_servers import free_port, group_alive
from ops.team import COMPONENTS, TOPOLOGY, Team, TeamError, load_team
from pipelines.deployments import TRAINING, work_pool
from tests.conftest import dvc_stages, repo_copy, tiny_params, write_imagefolder

MODEL = "team-test-model"
ALL_STAGES = dvc_stages()
# Generous bounds on waiting (not timing asserts): a full tiny pipeline on 2 busy cores.
RUN_TIMEOUT_S = 900


def team_cli(root: Path, command: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "ops.team", command],
        cwd=root,
        env={k: v for k, v in os.environ.items() if k != "IMAGECLF_ROOT"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    # Not under pytest's tmp folder: it is private to this user (0700), and PostgreSQL runs as
    # its own unprivileged user when the tests run as root.
    base = Path(tempfile.mkdtemp(prefix="imageclf-team-"))
    base.chmod(0o755)
    images = write_imagefolder(base / "images")
    params = tiny_params(
        data={"name": "imagefolder", "imagefolder_root": str(images), "image_size": 12},
        registry={"model_name": MODEL, "max_latency_ms": 1000.0},
        monitoring={"reference_size": 100},
        serving={"examples": 4},
        team={
            "postgres_port": free_port(),
            "mlflow_port": free_port(),
            "prefect_port": free_port(),
            "service_port": free_port(),
            "prometheus_port": free_port(),
            "scrape_interval_s": 1,
            "mlflow_workers": 1,
            "worker_poll_s": 1,
            "schedule_monitoring": False,
        },
    )
    root = repo_copy(base / "repo", params)
    try:  # `down` also after a failed `up`: whatever did start must stop
        assert "started" in team_cli(root, "up").stdout
        yield load_team(root)
    finally:
        subprocess.run(
            [sys.executable, "-m", "ops.team", "down"], cwd=root, capture_output=True, timeout=300
        )
        shutil.rmtree(base, ignore_errors=True)


def png(root: Path) -> bytes:
    """A test image of the team's dataset (the ImageFolder beside the project)."""
    return next((root.parent / "images" / "test").rglob("*.png")).read_bytes()


@pytest.mark.slow
def test_up_again_says_already_running_and_status_says_where(team):
    again = team_cli(team.root, "up").stdout
    for component in TOPOLOGY:
        assert f"{component.name}: already running" in again, again
    status = team_cli(team.root, "status").stdout
    for url in (team.mlflow_url, team.prefect_api, team.service_url):
        assert url in status
    assert "stopped" not in status, status
    assert (team.root / ".dvc" / "config.local").read_text().count(team.dvc_remote) == 1


@pytest.mark.slow
def test_ui_run_is_executed_by_the_worker_and_its_champion_is_served(team):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: team.prefect_api}):
        flow_run = run_deployment(f"imageclf-training/{TRAINING}", timeout=RUN_TIMEOUT_S)
        with get_client(sync_client=True) as client:
            mine = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))
            logs = client.read_logs(mine, limit=10)
    worker_log = (team.logs / "prefect-worker.log").read_text()
    assert flow_run.state.is_completed(), worker_log[-4000:]
    # The worker of the process pool ran it (not this process): its log holds the run.
    assert flow_run.work_pool_name == work_pool(team.root)
    assert f"submitting flow run '{flow_run.id}'" in worker_log
    assert f"stages run: {ALL_STAGES}" in worker_log
    assert logs  # and the server stored its logs

    # Prefect's and MLflow's state is in PostgreSQL.
    p = team.params
    dsn = f"host={p.host} port={p.postgres_port} user={p.postgres_user}"
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"{dsn} dbname=mlflow")  # no trust: the generated password is needed
    assert team.password_file.stat().st_mode & 0o777 == 0o600
    password = team.postgres_password()
    assert password
    for component in TOPOLOGY:  # never on a command line: `ps` shows those to every user
        pid = _pid(team, component.name)
        if pid:
            assert password not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    dsn += f" password={password}"
    with psycopg.connect(f"{dsn} dbname=prefect") as db:
        (state,) = db.execute(
            "select state_type from flow_run where id = %s", (flow_run.id,)
        ).fetchone()
        assert state == "COMPLETED"
    client = mlflow.MlflowClient(tracking_uri=team.mlflow_url)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    with psycopg.connect(f"{dsn} dbname=mlflow") as db:
        rows = db.execute(
            "select version, run_id from model_versions where name = %s", (MODEL,)
        ).fetchall()
    assert (int(champion.version), champion.run_id) in rows
    # Artifacts went through the proxy into the team folder.
    run = client.get_run(champion.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert list(team.artifacts.rglob("model.onnx"))

    # The service follows the champion through the MLflow server.
    deadline = time.monotonic() + 120
    body: dict = {}
    while time.monotonic() < deadline:
        answer = httpx.post(
            f"{team.service_url}/classify",
            files={"image": ("x.png", png(team.root), "image/png")},
            timeout=30,
        )
        body = answer.json() if answer.status_code == 200 else {"status": answer.status_code}
        if (body.get("model") or {}).get("version") == str(champion.version):
            break
        time.sleep(2)
    assert body["model"]["name"] == MODEL and body["predictions"], body
    assert body["model"]["version"] == str(champion.version), body

    # Team mode's Prometheus scrapes that service every team.scrape_interval_s, with the
    # project's alert rules loaded.
    config = yaml.safe_load((team.folder / "prometheus" / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "1000ms", config["global"]
    prometheus = team.url(team.params.prometheus_port)
    query = f'imageclf_predictions_total{{model_version="{champion.version}"}}'
    series: list = []
    deadline = time.monotonic() + 90  # many scrape intervals: the service may still be loading
    while time.monotonic() < deadline and not series:
        series = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}).json()
        series = series["data"]["result"]
        time.sleep(1)
    assert series, f"Prometheus at {prometheus} has no {query}"
    groups = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]
    assert any(rule["type"] == "alerting" for group in groups for rule in group["rules"])

    # The run's outputs are in the team's DVC remote: every cached object of its dvc.lock.
    commit = run.data.tags["dvc_exp_commit"]
    lock = yaml.safe_load(
        subprocess.run(
            ["git", "show", f"{commit}:dvc.lock"], cwd=team.root, capture_output=True, check=True
        ).stdout
    )
    uncached = {
        path
        for stage in yaml.safe_load((team.root / "dvc.yaml").read_text())["stages"].values()
        for kind in ("outs", "metrics", "plots")
        for entry in stage.get(kind, [])
        if isinstance(entry, dict)
        for path, options in entry.items()
        if (options or {}).get("cache") is False
    }
    hashes = [
        out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if out["path"] not in uncached
    ]
    remote = Path(team.dvc_remote) / "files" / "md5"
    assert hashes and all((remote / h[:2] / h[2:]).is_file() for h in hashes)


@pytest.mark.slow
def test_fresh_clone_with_the_team_remote_pulls_instead_of_recomputing(team, monkeypatch):
    """A teammate's clone (another machine: its own DVC cache) of the run's commit, with the
    team's remote: the flow pulls the outputs and DVC reruns nothing."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.training_flow import training_flow

    client = mlflow.MlflowClient(tracking_uri=team.mlflow_url)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    commit = client.get_run(champion.run_id).data.tags["dvc_exp_commit"]
    clone = team.root.parent / "teammate"
    git = ["git", "-C", str(clone)]
    subprocess.run(["git", "clone", "-q", str(team.root), str(clone)], check=True)
    subprocess.run([*git, "fetch", "-q", "origin", "refs/exps/*:refs/exps/*"], check=True)
    subprocess.run([*git, "checkout", "-q", commit], check=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(
        [dvc, "remote", "add", "--local", "--default", "team", team.dvc_remote],
        cwd=clone,
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("IMAGECLF_ROOT", str(clone))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.mlflow_url)
    with temporary_settings({PREFECT_API_URL: team.prefect_api}):
        state = training_flow(promote=False, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["dvc_remote"] == "team"
    assert result["stages_run"] == [] and result["stages_skipped"] == ALL_STAGES, result
    # The same model as the team's run: same MLflow run, no new registry version.
    assert result["run_id"] == champion.run_id and result["version"] == str(champion.version)
    assert any((clone / ".dvc" / "cache" / "files" / "md5").rglob("*"))


@pytest.mark.slow
def test_down_stops_every_process_and_keeps_the_data(team):
    pids = {c.name: pid for c in TOPOLOGY if (pid := _pid(team, c.name))}
    assert set(pids) == {c.name for c in TOPOLOGY}
    out = team_cli(team.root, "down").stdout
    for component in TOPOLOGY:
        assert f"{component.name}: stopped" in out, out
    assert not [name for name, pid in pids.items() if group_alive(pid)]
    for port in (team.params.postgres_port, team.params.mlflow_port, team.params.service_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{team.params.host}:{port}/", timeout=2)
    assert (team.pgdata / "PG_VERSION").is_file() and list(team.artifacts.rglob("model.onnx"))
    assert "not running" in team_cli(team.root, "down").stdout


def _pid(team: Team, name: str) -> int | None:
    from ops.team import running_pid

    return running_pid(team, name)


def test_a_busy_port_is_named_with_the_parameter_to_change(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        team = Team(tmp_path, tiny_params(team={"mlflow_port": port}).team)
        with pytest.raises(TeamError, match=f"port {port} \\(team.mlflow_port in params.yaml\\)"):
            ops.team._check_port(team, COMPONENTS["mlflow"])


def test_missing_postgresql_says_make_setup(monkeypatch):
    monkeypatch.setattr(ops.team, "POSTGRES_GLOB", "/nonexistent/postgresql/*/bin")
    with pytest.raises(TeamError, match="make setup"):
        ops.team.postgres_bin("initdb")


def test_a_host_other_machines_reach_needs_the_service_token():
    """team.host beyond loopback with an open service would let anyone classify and fill the
    task store: refused until IMAGECLF_API_TOKEN is set."""
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        ops.team.check_exposure(host, environ={})
    for host in ("0.0.0.0", "10.1.2.3", "::", "team-box.example.com"):
        with pytest.raises(TeamError, match="IMAGECLF_API_TOKEN"):
            ops.team.check_exposure(host, environ={})
        ops.team.check_exposure(host, environ={"IMAGECLF_API_TOKEN": "s3cret"})

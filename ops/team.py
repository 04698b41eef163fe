"""Team mode: the shared servers of a team, started on this machine's loopback.

    python -m ops.team up        # (make team-up) start what is not running yet; idempotent
    python -m ops.team status    # (make team-status) what runs where
    python -m ops.team down      # (make team-down) stop everything, keep the data

It starts, in ``team.folder`` (params.yaml, git-ignored): a PostgreSQL cluster with one database
for MLflow and one for Prefect; ``mlflow server`` on PostgreSQL with the artifact proxy; a Prefect
server on PostgreSQL, the process work pool, prefect.yaml's deployments (``prefect deploy
--all``) and a worker; and the BentoML service reading the registry through the MLflow server.
It also configures the DVC remote ``team`` (``.dvc/config.local``) that the training flow pulls
from and pushes to. Each server runs in a process group of its own; its pid file and log are in
``<folder>/run`` and ``<folder>/logs``.

:data:`TOPOLOGY` is the one list of those processes, with their ports and environment:
ops/compose.yaml describes the same topology for containers, and tests/test_compose.py checks
that the two agree. docs/team-mode.md maps it onto machines.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from imageclf.config import ParamsError, TeamParams, load_params
from imageclf.paths import get_paths
from imageclf.tracking import redact_uri
from ops.local_servers import group_alive, start, stop_group, wait_ready
from pipelines import deployments

POSTGRES_GLOB = "/usr/lib/postgresql/*/bin"
DATABASES = ("mlflow", "prefect")
# As root, PostgreSQL runs as this (unprivileged) user: initdb and the server refuse root.
POSTGRES_OS_USER = "postgres"
REMOTE_NAME = "team"
# What the servers need on any machine: no calls home (this network reaches registries only).
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
}


class TeamError(RuntimeError):
    """Team mode cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class Team:
    """Where everything of team mode is, for one checkout."""

    root: Path
    params: TeamParams

    @property
    def folder(self) -> Path:
        return get_paths(self.root).resolve(self.params.folder)

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    @property
    def pgdata(self) -> Path:
        return self.folder / "postgres"

    @property
    def artifacts(self) -> Path:
        return self.folder / "artifacts"

    @property
    def prefect_home(self) -> Path:
        return self.folder / "prefect"

    @property
    def bentoml_home(self) -> Path:
        return self.folder / "bentoml"

    def url(self, port: int) -> str:
        return f"http://{self.params.host}:{port}"

    @property
    def mlflow_url(self) -> str:
        return self.url(self.params.mlflow_port)

    @property
    def prefect_api(self) -> str:
        return f"{self.url(self.params.prefect_port)}/api"

    @property
    def service_url(self) -> str:
        return self.url(self.params.service_port)

    @property
    def password_file(self) -> Path:
        """The PostgreSQL user's generated password (0600): a cluster made by team mode asks
        for it (scram-sha-256), not ``trust``, so no other local user gets in without it."""
        return self.folder / "postgres.password"

    def postgres_password(self) -> str | None:
        """The password, or None for a cluster initialised with ``trust`` before it existed."""
        path = self.password_file
        return path.read_text().strip() if path.is_file() else None

    def database_url(self, database: str, driver: str = "postgresql") -> str:
        """The database's URL, password included: give it to servers in their environment,
        never on a command line (``ps`` shows those to every user), and redact it to print."""
        p = self.params
        password = self.postgres_password()
        login = f"{p.postgres_user}:{password}" if password else p.postgres_user
        return f"{driver}://{login}@{p.host}:{p.postgres_port}/{database}"

    @property
    def dvc_remote(self) -> str:
        """The remote's URL: a URL as given, a local path made absolute."""
        remote = self.params.dvc_remote
        if not remote or "://" in remote:
            return remote
        return str(get_paths(self.root).resolve(remote))


def load_team(root: Path | None = None) -> Team:
    root = (root or get_paths().root).resolve()
    return Team(root, load_params(get_paths(root).params).team)


def work_pool(root: Path) -> str:
    try:
        return deployments.work_pool(root)
    except RuntimeError as exc:
        raise TeamError(str(exc)) from exc


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the project's venv)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise TeamError(f"{path} is missing: run `make setup` (it installs the project's venv).")
    return str(path)


# --------------------------------------------------------------------------- the topology
@dataclass(frozen=True)
class Component:
    """One server of team mode, as ops/team.py starts it and ops/compose.yaml describes it."""

    name: str  # also its service name in ops/compose.yaml
    port_field: str | None  # the team.* parameter holding its port (None: it listens nowhere)
    health: str | None  # the path answering 200 once it is ready (None: checked otherwise)
    command: Callable[[Team], list[str]]
    environment: Callable[[Team], dict[str, str]]
    # Writes what the command reads (a config file) just before it starts.
    prepare: Callable[[Team], None] | None = None

    def port(self, team: Team) -> int | None:
        return getattr(team.params, self.port_field) if self.port_field else None


def _no_env(team: Team) -> dict[str, str]:
    return {}


def _mlflow_cmd(team: Team) -> list[str]:
    p = team.params
    return [
        _bin("mlflow"),
        "server",  # the store's URL (with its password) is in MLFLOW_BACKEND_STORE_URI
        "--serve-artifacts",
        "--artifacts-destination",
        str(team.artifacts),
        "--host",
        p.host,
        "--port",
        str(p.mlflow_port),
        "--workers",
        str(p.mlflow_workers),
    ]


def _mlflow_env(team: Team) -> dict[str, str]:
    # The job runner (GenAI scorers, trace roll-ups) starts ~6 more processes: none is needed
    # for tracking and the registry.
    return {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_BACKEND_STORE_URI": team.database_url("mlflow"),
    }


def _prefect_server_cmd(team: Team) -> list[str]:
    p = team.params
    return [_bin("prefect"), "server", "start", "--host", p.host, "--port", str(p.prefect_port)]


def _prefect_server_env(team: Team) -> dict[str, str]:
    return {
        "PREFECT_API_DATABASE_CONNECTION_URL": team.database_url("prefect", "postgresql+asyncpg"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def _worker_cmd(team: Team) -> list[str]:
    return [_bin("prefect"), "worker", "start", "--pool", work_pool(team.root), "--type", "process"]


def _worker_env(team: Team) -> dict[str, str]:
    return {
        "PREFECT_API_URL": team.prefect_api,
        "MLFLOW_TRACKING_URI": team.mlflow_url,
        # prefect.yaml's pull step: each worker runs flows in its own checkout.
        "IMAGECLF_ROOT": str(team.root),
        "PREFECT_WORKER_QUERY_SECONDS": str(team.params.worker_poll_s),
    }


def _service_cmd(team: Team) -> list[str]:
    p = team.params
    return [
        _bin("bentoml"),
        "serve",
        "services.service:ImageClassifier",
        "--host",
        p.host,
        "--port",
        str(p.service_port),
    ]


def _service_env(team: Team) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": team.mlflow_url, "IMAGECLF_ROOT": str(team.root)}


def _prometheus_dir(team: Team) -> Path:
    return team.folder / "prometheus"


def _prometheus_cmd(team: Team) -> list[str]:
    p = team.params
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise TeamError(
            "Prometheus is not installed (no `prometheus` on PATH): run `make setup` (it "
            "installs Debian's prometheus), or `apt-get install prometheus`."
        )
    return [
        prometheus,
        f"--config.file={_prometheus_dir(team) / 'prometheus.yml'}",
        f"--storage.tsdb.path={_prometheus_dir(team) / 'data'}",
        f"--web.listen-address={p.host}:{p.prometheus_port}",
    ]


def _prometheus_config(team: Team) -> None:
    """ops/prometheus/prometheus.yml and its rules, scraping this team's service."""
    from ops.prometheus.config import write_config

    p = team.params
    write_config(_prometheus_dir(team), f"{p.host}:{p.service_port}", p.scrape_interval_s)


def _postgres_cmd(team: Team) -> list[str]:
    return [str(postgres_bin("postgres")), "-D", str(team.pgdata)]


# In start order; `down` stops them in reverse.
TOPOLOGY: tuple[Component, ...] = (
    Component("postgres", "postgres_port", None, _postgres_cmd, _no_env),
    Component("mlflow", "mlflow_port", "/health", _mlflow_cmd, _mlflow_env),
    Component(
        "prefect-server", "prefect_port", "/api/health", _prefect_server_cmd, _prefect_server_env
    ),
    Component("prefect-worker", None, None, _worker_cmd, _worker_env),
    Component("service", "service_port", "/livez", _service_cmd, _service_env),
    Component(
        "prometheus", "prometheus_port", "/-/ready", _prometheus_cmd, _no_env, _prometheus_config
    ),
)
COMPONENTS = {c.name: c for c in TOPOLOGY}


# --------------------------------------------------------------------------- processes
def _pid_file(team: Team, name: str) -> Path:
    return team.run_dir / f"{name}.pid"


def running_pid(team: Team, name: str) -> int | None:
    """The process group of a running component, from its pid file (stale files removed)."""
    if name == "postgres":
        pid_file = team.pgdata / "postmaster.pid"
        if not pid_file.is_file():
            return None
        pid = int(pid_file.read_text().split()[0])
        return pid if group_alive(pid) else None
    path = _pid_file(team, name)
    if not path.is_file():
        return None
    pid = int(path.read_text().strip())
    if group_alive(pid):
        return pid
    path.unlink(missing_ok=True)
    return None


def _base_env(team: Team) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(QUIET)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_HOME"] = str(team.prefect_home)
    env["BENTOML_HOME"] = str(team.bentoml_home)
    return env


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) != 0


def _check_port(team: Team, component: Component) -> None:
    port = component.port(team)
    if port is not None and not _port_free(team.params.host, port):
        raise TeamError(
            f"port {port} (team.{component.port_field} in params.yaml) is already in use by "
            f"another program, so {component.name} cannot start: stop that program, or choose "
            "another port in params.yaml."
        )


def _launch(team: Team, component: Component) -> subprocess.Popen:
    _check_port(team, component)
    env = {**_base_env(team), **component.environment(team)}
    if component.prepare is not None:
        component.prepare(team)
    proc = start(
        component.command(team), env, cwd=team.root, log_path=team.logs / f"{component.name}.log"
    )
    team.run_dir.mkdir(parents=True, exist_ok=True)
    _pid_file(team, component.name).write_text(f"{proc.pid}\n")
    return proc


# --------------------------------------------------------------------------- PostgreSQL
def postgres_bin(name: str) -> Path:
    """A PostgreSQL program from Debian's packages (the newest installed major version)."""
    folders = sorted(glob.glob(POSTGRES_GLOB), key=lambda f: int(Path(f).parent.name))
    if not folders or not (Path(folders[-1]) / name).is_file():
        raise TeamError(
            f"PostgreSQL's programs are not installed (nothing at {POSTGRES_GLOB}/{name}): run "
            "`make setup` (it installs Debian's postgresql), or `apt-get install postgresql`."
        )
    return Path(folders[-1]) / name


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the unprivileged system user."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", POSTGRES_OS_USER, "--", *cmd]


def _new_password(team: Team) -> str:
    """Generate the cluster's password into ``team.password_file`` (0600, this user's)."""
    password = secrets.token_urlsafe(24)  # URL-safe: it goes into database URLs as it is
    team.folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(team.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return password


def _pg(team: Team, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    password = team.postgres_password()
    env = {**os.environ, **({"PGPASSWORD": password} if password else {})}
    proc = subprocess.run(
        _as_postgres(list(cmd)), capture_output=True, text=True, timeout=120, check=False, env=env
    )
    if check and proc.returncode != 0:
        raise TeamError(f"{Path(cmd[0]).name} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _init_postgres(team: Team) -> None:
    if (team.pgdata / "PG_VERSION").is_file():
        return
    team.pgdata.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(team.pgdata, POSTGRES_OS_USER, POSTGRES_OS_USER)
        os.chmod(team.pgdata, 0o700)
        reach = subprocess.run(
            ["runuser", "-u", POSTGRES_OS_USER, "--", "test", "-w", str(team.pgdata)], check=False
        )
        if reach.returncode != 0:
            raise TeamError(
                f"the '{POSTGRES_OS_USER}' user cannot write {team.pgdata} (a parent folder is "
                "not searchable by other users): put the project, or team.folder, where it can."
            )
    # Password authentication (scram-sha-256), even on loopback: with ``trust`` any local user
    # could open the registry's and Prefect's databases. initdb reads the password from a file
    # its (unprivileged) user can read, removed right after.
    password = _new_password(team)
    pwfile = team.pgdata.parent / ".initdb-password"
    pwfile.write_text(password + "\n")
    os.chmod(pwfile, 0o600)
    if os.geteuid() == 0:
        shutil.chown(pwfile, POSTGRES_OS_USER, POSTGRES_OS_USER)
    try:
        _pg(
            team,
            str(postgres_bin("initdb")),
            "-D",
            str(team.pgdata),
            "-A",
            "scram-sha-256",
            "--pwfile",
            str(pwfile),
            "-U",
            team.params.postgres_user,
            "-E",
            "UTF8",
        )
    finally:
        pwfile.unlink(missing_ok=True)


def _start_postgres(team: Team) -> str:
    if running_pid(team, "postgres"):
        return "already running"
    _check_port(team, COMPONENTS["postgres"])
    _init_postgres(team)
    team.logs.mkdir(parents=True, exist_ok=True)
    log = team.logs / "postgres.log"
    if os.geteuid() == 0:
        log.touch()
        shutil.chown(log, POSTGRES_OS_USER, POSTGRES_OS_USER)
    p = team.params
    # No Unix socket (-k ''): clients use TCP on loopback, and a long project path would not
    # fit a socket's 107-character limit anyway.
    _pg(
        team,
        str(postgres_bin("pg_ctl")),
        "-D",
        str(team.pgdata),
        "-l",
        str(log),
        "-w",
        "-o",
        f"-h {p.host} -p {p.postgres_port} -k ''",
        "start",
    )
    for database in DATABASES:
        created = _pg(
            team,
            str(postgres_bin("createdb")),
            "-h",
            p.host,
            "-p",
            str(p.postgres_port),
            "-U",
            p.postgres_user,
            database,
            check=False,
        )
        if created.returncode != 0 and "already exists" not in created.stderr:
            raise TeamError(f"createdb {database} failed: {created.stderr.strip()}")
    return "started"


def _stop_postgres(team: Team) -> bool:
    pid = running_pid(team, "postgres")
    if not pid:
        return False
    _pg(team, str(postgres_bin("pg_ctl")), "-D", str(team.pgdata), "-m", "fast", "-w", "stop")
    # pg_ctl returns once the pid file is gone, a moment before the last process exits.
    stop_group(pid)
    return True


# --------------------------------------------------------------------------- Prefect set-up
def _prefect_cli(
    team: Team, *args: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = ()
) -> str:
    """``prefect ARGS`` against the team's API; ``unset``: variables the command must not see."""
    base = {**_base_env(team), "PREFECT_API_URL": team.prefect_api, **(env or {})}
    for name in unset:
        base.pop(name, None)
    proc = subprocess.run(
        [_bin("prefect"), *args],
        cwd=team.root,
        env=base,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise TeamError(f"prefect {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def _deploy(team: Team) -> None:
    """The work pool (once) and prefect.yaml's deployments (each time: they follow the file)."""
    pool = work_pool(team.root)
    if httpx.get(f"{team.prefect_api}/work_pools/{pool}", timeout=10).status_code == 404:
        _prefect_cli(team, "work-pool", "create", pool, "--type", "process")
    # IMAGECLF_ROOT unset: the pull step keeps its placeholder, which each worker fills with
    # its own checkout at run time.
    _prefect_cli(team, "--no-prompt", "deploy", "--all", unset=("IMAGECLF_ROOT",))
    if team.params.schedule_monitoring:
        _schedule_monitoring(team)


def _schedule_monitoring(team: Team) -> None:
    """Run the monitoring deployment every monitoring.check_every_minutes (once: an existing
    schedule with that interval is kept)."""
    minutes = load_params(get_paths(team.root).params).monitoring.check_every_minutes
    api = team.prefect_api
    query = {"deployments": {"name": {"any_": [deployments.MONITORING]}}}
    found = httpx.post(f"{api}/deployments/filter", json=query, timeout=10)
    found.raise_for_status()
    if not found.json():
        raise TeamError(f"prefect.yaml declares no deployment named {deployments.MONITORING!r}.")
    deployment = found.json()[0]
    seconds = minutes * 60
    if any(s["schedule"].get("interval") == seconds for s in deployment.get("schedules", [])):
        return
    answer = httpx.post(
        f"{api}/deployments/{deployment['id']}/schedules",
        json=[{"schedule": {"interval": seconds}, "active": True}],
        timeout=10,
    )
    answer.raise_for_status()


def _worker_ready(team: Team) -> bool:
    pool = work_pool(team.root)
    try:
        answer = httpx.post(f"{team.prefect_api}/work_pools/{pool}/workers/filter", json={})
        return answer.status_code == 200 and any(w.get("status") == "ONLINE" for w in answer.json())
    except httpx.HTTPError:
        return False


def _wait_worker(team: Team, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + team.params.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TeamError(f"the Prefect worker exited; see {team.logs / 'prefect-worker.log'}")
        if _worker_ready(team):
            return
        time.sleep(0.5)
    raise TeamError(f"the Prefect worker did not come online; see {team.logs}/prefect-worker.log")


# --------------------------------------------------------------------------- DVC remote
def configure_dvc_remote(team: Team) -> str | None:
    """Make ``team.dvc_remote`` this checkout's default DVC remote (in .dvc/config.local, so
    each clone chooses its own: a path here, s3:// or ssh:// on a team's machines)."""
    url = team.dvc_remote
    if not url:
        return None
    if "://" not in url:
        Path(url).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [_bin("dvc"), "remote", "add", "--local", "--force", "--default", REMOTE_NAME, url],
        cwd=team.root,
        env=_base_env(team),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise TeamError(f"dvc remote add failed: {proc.stderr.strip()}")
    return url


# --------------------------------------------------------------------------- commands
def check_exposure(host: str, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse to listen beyond this machine with an open service: on a non-loopback
    ``team.host`` anyone who reaches it could classify, read /model_info and fill the task
    store; the service's token (IMAGECLF_API_TOKEN) must be set first."""
    loopback = host == "localhost"
    with contextlib.suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    if not loopback and not environ.get("IMAGECLF_API_TOKEN"):
        raise TeamError(
            f"team.host is {host}, which other machines can reach, and the service has no "
            "token: set IMAGECLF_API_TOKEN (every client then sends it; docs/serving.md), or "
            "keep team.host: 127.0.0.1. MLflow's and Prefect's servers have no login of their "
            "own: put them behind a firewall or VPN (docs/team-mode.md)."
        )


def up(team: Team, say: Callable[[str], None] = print) -> None:
    """Start whatever is not running yet, in dependency order, and wait until each is ready."""
    if not (team.root / "prefect.yaml").is_file():
        raise TeamError(f"{team.root} has no prefect.yaml: run from the project's folder.")
    check_exposure(team.params.host)
    team.folder.mkdir(parents=True, exist_ok=True)
    # The folder is local state: ignored by Git wherever the project is.
    (team.folder / ".gitignore").write_text("*\n")
    say(f"postgres: {_start_postgres(team)}")

    def launch_all(names: list[str]) -> None:
        started: list[tuple[Component, subprocess.Popen]] = []
        for name in names:
            if running_pid(team, name):
                say(f"{name}: already running")
            else:
                started.append((COMPONENTS[name], _launch(team, COMPONENTS[name])))
        for component, proc in started:  # they start side by side; wait for each
            if component.health:
                url = f"{team.url(component.port(team))}{component.health}"  # type: ignore[arg-type]
                try:
                    wait_ready(proc, url, team.params.start_timeout_s)
                except RuntimeError as exc:
                    raise TeamError(f"{component.name} did not start: {exc}") from exc
            else:
                _wait_worker(team, proc)
            say(f"{component.name}: started")

    launch_all(["mlflow", "prefect-server"])
    _deploy(team)
    say(f"deployments: prefect.yaml's, on work pool {work_pool(team.root)}")
    remote = configure_dvc_remote(team)
    say(f"DVC remote '{REMOTE_NAME}': {remote or 'none (team.dvc_remote is empty)'}")
    launch_all(["prefect-worker", "service", "prometheus"])
    status(team, say)


def down(team: Team, say: Callable[[str], None] = print) -> None:
    """Stop every component (the data stays in team.folder)."""
    for component in reversed(TOPOLOGY):
        if component.name == "postgres":
            stopped = _stop_postgres(team)
        else:
            pid = running_pid(team, component.name)
            if pid:
                stop_group(pid)
                _pid_file(team, component.name).unlink(missing_ok=True)
            stopped = bool(pid)
        say(f"{component.name}: {'stopped' if stopped else 'not running'}")


def status(team: Team, say: Callable[[str], None] = print) -> dict[str, int | None]:
    """What runs where (pid, URL); returns the pids (None: not running)."""
    where = {
        "postgres": redact_uri(team.database_url("{mlflow,prefect}")),
        "mlflow": f"{team.mlflow_url} (UI, API, artifact proxy)",
        "prefect-server": f"{team.url(team.params.prefect_port)} (UI; API {team.prefect_api})",
        "prefect-worker": f"work pool {work_pool(team.root)}",
        "service": f"{team.service_url} (/ui, /docs, /metrics)",
        "prometheus": f"{team.url(team.params.prometheus_port)} (alerts: /alerts)",
    }
    pids = {c.name: running_pid(team, c.name) for c in TOPOLOGY}
    for name, pid in pids.items():
        state = f"running (pid {pid})" if pid else "stopped"
        say(f"{name:15} {state:22} {where[name]}")
    say(f"{'logs':15} {'':22} {team.logs}")
    return pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.team", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    try:
        team = load_team()
        {"up": up, "down": down, "status": status}[args.command](team)
    except (TeamError, ParamsError) as exc:
        print(f"team {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

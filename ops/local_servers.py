"""Start and stop local server processes (bentoml serve, uvicorn, a Prefect runner) on loopback.

Servers run in their own process group so that stopping one also stops the workers it forked
(BentoML and MLflow leave children behind otherwise). Used by team mode (ops/team.py), the tests
and the benchmarks; not part of the library (imageclf/).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(
    cmd: list[str],
    env: dict[str, str],
    cwd: Path | None = None,
    ready_url: str | None = None,
    timeout: float = 120.0,
    log_path: Path | None = None,
) -> subprocess.Popen:
    """Start ``cmd`` in a new process group; with ``ready_url``, wait until it answers 200.

    Its output goes to a log file (``log_path``, else a temporary one; ``proc.log_path``), not
    a pipe: a chatty server would block once an unread pipe fills up.
    """
    if log_path is None:
        log = tempfile.NamedTemporaryFile(prefix="server-", suffix=".log", delete=False)  # noqa: SIM115
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("ab")
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    if ready_url is not None:
        wait_ready(proc, ready_url, timeout)
    return proc


def wait_ready(proc: subprocess.Popen, ready_url: str, timeout: float) -> None:
    """Wait until ``ready_url`` answers 200; raise with the server's output if it exits or
    does not answer in time (and stop it then)."""
    cmd = proc.args if isinstance(proc.args, list) else [str(proc.args)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{output(proc)}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(
        f"{' '.join(cmd)} did not answer {ready_url} within {timeout:.0f} s:\n{output(proc)}"
    )


def output(proc: subprocess.Popen, tail: int = 3000) -> str:
    """The last ``tail`` characters the server printed."""
    path = getattr(proc, "log_path", None)
    return path.read_text(errors="replace")[-tail:] if path and path.exists() else ""


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the whole process group, SIGKILL it after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stop_group(pgid: int, grace: float = 20.0) -> None:
    """Stop a process group this process did not start (no Popen to wait on): SIGTERM, then
    SIGKILL whatever is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.2)


def process_tree(pid: int) -> set[int]:
    """``pid``, the members of its process group and all their live descendants (Linux /proc):
    BentoML runs its workers as children of the arbiter, uvicorn as children of its supervisor,
    so a server's CPU time or memory is that of the whole tree."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the process name
        except (OSError, IndexError):  # the process ended meanwhile
            continue
        child = int(stat.parent.name)
        parent[child] = int(fields[1])
        if int(fields[2]) == pid and child != pid:  # in pid's process group
            parent[child] = pid
    family, frontier = {pid}, [pid]
    while frontier:
        current = frontier.pop()
        for child, ppid in parent.items():
            if ppid == current and child not in family:
                family.add(child)
                frontier.append(child)
    return family

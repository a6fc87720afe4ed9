"""Starting, watching and stopping the cluster's processes, each with all it started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from devcluster.paths import LOGS_DIR, REPO

# What the operator and trainer images set, for the same programs run here from the virtualenv
# (the operator, MLflow, the pod runner). Without it MLflow's telemetry thread unsets a
# variable of os.environ while an MLflow call reads os.environ (requests' proxy lookup), and
# that call fails with KeyError '_MLFLOW_TELEMETRY_SESSION_ID': a trial program crashed so,
# failing its trial. Local trials do not inherit it: see image_env_vars.
IMAGE_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true"}


def image_env_vars() -> list[dict[str, str]]:
    """IMAGE_ENV as a container's env, for a sweep of local trials to state: the pod runner
    ignores images, so what they would set comes from the pod or not at all."""
    return [{"name": name, "value": value} for name, value in IMAGE_ENV.items()]


def log(message: str) -> None:
    print(f"devcluster: {message}", file=sys.stderr, flush=True)


def process_alive(pid: int) -> bool:
    """Whether a process runs; a zombie (ended, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is as good as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until(
    what: str,
    check: Callable[[], object],
    timeout: float,
    pid: int | None = None,
    log_file: Path | None = None,
) -> None:
    """Poll `check` until it holds; fail at once if process `pid` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if pid is not None and not process_alive(pid):
            tail = log_file.read_text()[-3000:] if log_file and log_file.exists() else ""
            raise RuntimeError(f"{what} exited during start-up; log {log_file}:\n{tail}")
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s (log: {log_file})")


def start(
    name: str, argv: list[str], env: dict[str, str] | None = None, log_file: Path | None = None
) -> int:
    """Start a cluster process, its output appended to logs/NAME.log; returns its pid."""
    log_file = log_file or LOGS_DIR / f"{name}.log"
    with log_file.open("ab") as out:
        # Own session, so `down` can stop the process with everything it spawned.
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**(os.environ if env is None else env), **IMAGE_ENV},
            cwd=REPO,
        )
    return process.pid


def stop(name: str, pid: int, grace: float = 10.0) -> None:
    """Stop a process started by `start` with everything it started: its process group
    (MLflow's server workers), which outlives a leader that has exited, and the groups of its
    descendants (the pod runner's containers run in sessions of their own)."""
    groups = groups_under(pid)
    signal_groups(groups, signal.SIGTERM)
    if ended(groups, grace):
        return
    log(f"{name} ignored SIGTERM; killing it")
    signal_groups(groups, signal.SIGKILL)
    # SIGKILL is not instant either: the next process stopped (etcd after the apiserver) or
    # the session's final check must not find this one still there.
    if not ended(groups, 10):
        log(f"{name} still runs after SIGKILL (process groups {sorted(_live_groups(groups))})")


def ended(groups: set[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _live_groups(groups):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def process_table() -> dict[int, tuple[int, int]]:
    """pid: (parent pid, process group) of every running process; zombies are as good as
    dead."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended while we looked
            continue
        # The command name, in parentheses, may hold spaces; the fields after it do not.
        state, ppid, pgid = stat[stat.rindex(")") + 2 :].split()[:3]
        if state != "Z":
            table[int(entry.name)] = (int(ppid), int(pgid))
    return table


def groups_under(pid: int) -> set[int]:
    """The process group `pid` leads, and the groups of its running descendants."""
    table = process_table()
    groups, parents = {pid}, {pid}
    while True:
        children = {p for p, (ppid, _) in table.items() if ppid in parents and p not in parents}
        if not children:
            return groups
        groups |= {table[p][1] for p in children}
        parents |= children


def _live_groups(groups: set[int]) -> set[int]:
    return {pgid for _, pgid in process_table().values()} & groups


def signal_groups(groups: set[int], signum: int) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)


def session_processes(mark: str, value: str) -> dict[int, str]:
    """pid: command line of each running process whose environment has `mark`=`value`: what a
    test session started (its children inherit the mark it set in its environment, and theirs
    too, wherever they were reparented)."""
    wanted = f"{mark}={value}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended while we looked, or not ours to read
            continue
        if state != "Z":
            found[int(entry.name)] = command.strip()
    return found

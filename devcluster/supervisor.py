"""The dev cluster as a whole: its state, who uses it, and starting and stopping it.

`up` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok (simulating
the `sim` GPU nodes), the pod runner (running pods of `local-gpu-0` as local processes), Kueue
(its CRDs, its manager and webhooks, the ClusterQueue `gpus`) and an MLflow server, each on a
free loopback port, then writes `.cluster/kubeconfig` and `.cluster/env`. Every process is
recorded by pid in `.cluster/state.json`, which is what `down` stops, with its process group
and those of its descendants; `up` on a healthy cluster does nothing. Tests stop one of them
and start it again as it was (`stop_process`, `start_process`: same arguments, port and data).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from devcluster import certificates, kueue
from devcluster.components import (
    AUDIT_POLICY,
    AUDIT_POLICY_FILE,
    MLFLOW_DIR,
    Component,
    Ports,
    api_ready,
    components,
    mlflow_ready,
)
from devcluster.nodes import (
    LOCAL_NODE,
    LOCAL_NODE_GPUS,
    SIM_NODES,
    create_nodes,
    has_default_service_account,
)
from devcluster.paths import (
    ENV_FILE,
    KUBECONFIG,
    LOCK_FILE,
    LOGS_DIR,
    OPERATOR_KUBECONFIG,
    PACKAGE,
    REPO,
    STARTED_FOR_USERS,
    STATE_DIR,
    STATE_FILE,
    USERS_DIR,
)
from devcluster.processes import (
    ended,
    groups_under,
    log,
    process_alive,
    process_table,
    signal_groups,
    start,
    stop,
    wait_until,
)


@dataclass(frozen=True)
class Cluster:
    """What a running cluster is: where to reach it and which processes are its own."""

    api_url: str
    mlflow_url: str
    bin_dir: str
    pids: dict[str, int]
    kueue_dir: str = ""
    # The command line each process was started with, by name: what start_process runs again.
    commands: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls) -> Cluster | None:
        if not STATE_FILE.exists():
            return None
        return cls(**json.loads(STATE_FILE.read_text()))

    def save(self) -> None:
        STATE_FILE.write_text(json.dumps(self.__dict__, indent=2))

    def dead_processes(self) -> list[str]:
        return [name for name, pid in self.pids.items() if not process_alive(pid)]

    def healthy(self) -> bool:
        return (
            not self.dead_processes() and api_ready(self.api_url) and mlflow_ready(self.mlflow_url)
        )


@contextlib.contextmanager
def _exclusive() -> Iterator[None]:
    """One start or stop at a time: test sessions and make targets may race for the cluster."""
    with LOCK_FILE.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def up() -> Cluster:
    """Start the cluster, or keep the running one; either way it stays up until `down`."""
    with _exclusive():
        cluster = _up()
        STARTED_FOR_USERS.unlink(missing_ok=True)
        return cluster


def down(keep_logs: bool = False) -> None:
    with _exclusive():
        _down(keep_logs)


def use(user: str, start: bool) -> Cluster:
    """Register a user (a test session, by pid) of the cluster, starting it if needed."""
    with _exclusive():
        running = Cluster.load()
        fresh = running is None or not running.healthy()
        cluster = _up()
        if fresh and start:
            STARTED_FOR_USERS.touch()
        USERS_DIR.mkdir(exist_ok=True)
        (USERS_DIR / user).touch()
        return cluster


def release(user: str) -> None:
    """A user (a test session) is done with the cluster; the last one out stops it, if the
    cluster was started for a user rather than by `make cluster-up`."""
    with _exclusive():
        (USERS_DIR / user).unlink(missing_ok=True)
        others = [u for u in USERS_DIR.glob("*") if process_alive(int(u.name))]
        if not others and STARTED_FOR_USERS.exists():
            _down(keep_logs=False)


def _build_bins() -> tuple[str, str]:
    """(the control plane's bin folder, Kueue's folder), as build-bins.sh prints them."""
    env = {**os.environ, "LORASWEEP_SKIP_TOOLS": "1"}
    out = subprocess.run(
        ["bash", str(PACKAGE / "build-bins.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    bin_dir, kueue_dir = out.stdout.strip().splitlines()[-2:]
    return bin_dir, kueue_dir


def _up() -> Cluster:
    existing = Cluster.load()
    if existing is not None:
        if existing.healthy():
            log(f"already up: {existing.api_url}, MLflow {existing.mlflow_url}")
            return existing
        log(f"stale state (dead: {existing.dead_processes() or 'none'}); restarting")
        _down()
    started = time.monotonic()
    bin_dir, kueue_dir = _build_bins()
    STATE_DIR.mkdir(exist_ok=True)
    LOGS_DIR.mkdir(exist_ok=True)
    ports = Ports.free()
    cluster = Cluster(
        api_url=ports.api_url,
        mlflow_url=ports.mlflow_url,
        bin_dir=bin_dir,
        pids={},
        kueue_dir=kueue_dir,
    )
    # Save as we go, so a failed start can still be torn down by pid.
    cluster.save()
    try:
        _start_all(cluster, ports)
    except BaseException:
        log("start failed; stopping what was started")
        _down(keep_logs=True)
        raise
    ENV_FILE.write_text(
        f"export KUBECONFIG={KUBECONFIG}\n"
        f"export MLFLOW_TRACKING_URI={cluster.mlflow_url}\n"
        f"export PATH={bin_dir}:$PATH\n"
    )
    log(f"up in {time.monotonic() - started:.1f}s: {cluster.api_url}, MLflow {cluster.mlflow_url}")
    log(f"use it with: source {ENV_FILE.relative_to(REPO)}")
    return cluster


def _launch(cluster: Cluster, component: Component) -> None:
    """Start one component, record it, and wait until it serves."""
    pid = start(component.name, component.argv, component.env)
    cluster.pids[component.name] = pid
    cluster.commands[component.name] = component.argv
    cluster.save()
    if component.ready is not None:
        log_file = LOGS_DIR / f"{component.name}.log"
        wait_until(component.name, component.ready, component.ready_timeout, pid, log_file)


def _start_all(cluster: Cluster, ports: Ports) -> None:
    certificates.make_certs()
    AUDIT_POLICY_FILE.write_text(AUDIT_POLICY)
    table = components(cluster.bin_dir, ports)
    _launch(cluster, table["etcd"])
    _launch(cluster, table["kube-apiserver"])
    certificates.write_kubeconfig(cluster.api_url, KUBECONFIG, "admin")
    certificates.write_kubeconfig(cluster.api_url, OPERATOR_KUBECONFIG, "operator")
    for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
        _launch(cluster, table[name])
    create_nodes(SIM_NODES, "sim")
    create_nodes({LOCAL_NODE: LOCAL_NODE_GPUS}, "local")
    _launch(cluster, table["pod-runner"])
    kueue.start_kueue(cluster)
    MLFLOW_DIR.mkdir()
    _launch(cluster, table["mlflow"])

    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(str(KUBECONFIG)))
    wait_until("default service account", lambda: has_default_service_account(core, "default"), 60)
    for name, pid in cluster.pids.items():
        if not process_alive(pid):
            raise RuntimeError(f"{name} died during start-up; see {LOGS_DIR / (name + '.log')}")


def _down(keep_logs: bool = False) -> None:
    cluster = Cluster.load()
    if cluster is None:
        log("not running")
    else:
        # Reverse start order: clients first, etcd last.
        for name, pid in reversed(list(cluster.pids.items())):
            stop(name, pid)
        log(f"stopped {', '.join(reversed(cluster.pids)) or 'nothing'}")
    if keep_logs:
        for path in STATE_DIR.iterdir():
            if path.name != "logs":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    else:
        shutil.rmtree(STATE_DIR, ignore_errors=True)


@dataclass(frozen=True)
class Stopped:
    """A cluster process stopped by stop_process: how to start it again as it was."""

    name: str
    argv: list[str]
    env: dict[str, str]


def stop_process(cluster: Cluster, name: str, crash: bool = True) -> Stopped:
    """Stop one of the cluster's processes, with everything it started: SIGKILL when `crash`
    (no clean-up, as a crash or the OOM killer ends it), else SIGTERM first. For tests of how
    the rest of the cluster and the operator live through its absence."""
    with _exclusive():
        current = Cluster.load()
        if current is None or name not in current.commands:
            raise ValueError(f"no {name} to stop (a cluster started before restarts existed?)")
        pid = current.pids[name]
        # Its environment as it was started: a process restarted by a test session must not
        # carry that session's mark (tests/conftest.py) unless it did already.
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(e.decode().split("=", 1) for e in environ if b"=" in e)
        if crash:
            groups = groups_under(pid)
            signal_groups(groups, signal.SIGKILL)
            if not ended(groups, 10):
                raise RuntimeError(f"{name} still runs after SIGKILL")
        else:
            stop(name, pid)
        return Stopped(name=name, argv=current.commands[name], env=env)


def start_process(cluster: Cluster, stopped: Stopped) -> None:
    """Start a process stop_process stopped, with the same arguments (so the same port, data
    and certificates) and environment, record its new pid (in `cluster` too), and wait until
    it serves again."""
    with _exclusive():
        current = Cluster.load()
        if current is None:
            raise ValueError("the cluster is down")
        pid = start(stopped.name, stopped.argv, stopped.env)
        current.pids[stopped.name] = pid
        current.save()
        cluster.pids[stopped.name] = pid
    log_file = LOGS_DIR / f"{stopped.name}.log"
    if stopped.name == "kube-apiserver":
        wait_until(stopped.name, lambda: api_ready(cluster.api_url), 90, pid, log_file)
    elif stopped.name == "mlflow":
        wait_until(stopped.name, lambda: mlflow_ready(cluster.mlflow_url), 120, pid, log_file)
    elif not process_alive(pid):
        raise RuntimeError(f"{stopped.name} exited at once; see {log_file}")
    log(f"{stopped.name} started again (pid {pid})")


def shared_processes() -> set[int]:
    """The processes of the running cluster and their descendants, when test sessions other
    than the ones that ended still use it: theirs to stop, not ours."""
    cluster = Cluster.load()
    if cluster is None or not any(process_alive(int(u.name)) for u in USERS_DIR.glob("*")):
        return set()
    table = process_table()
    groups = set().union(*(groups_under(pid) for pid in cluster.pids.values()))
    return {pid for pid, (_, pgid) in table.items() if pgid in groups}


def apply_crds(cluster: Cluster) -> None:
    """The project's CRDs, applied as a user would (`kubectl apply --server-side`)."""
    subprocess.run(
        [f"{cluster.bin_dir}/kubectl", "apply", "--server-side", "-f", str(REPO / "crds")],
        check=True,
        capture_output=True,
        env={**os.environ, "KUBECONFIG": str(KUBECONFIG)},
    )

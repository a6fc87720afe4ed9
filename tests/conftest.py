"""Session fixtures: the real test cluster (started on demand, reused when already up), and
the check that a session leaves no process of its own behind."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest

import devcluster
from tests.support import wait_for

# Set in the session's environment, so that every process it starts, and theirs, carries it:
# how the final check tells the session's processes from everyone else's. Not LORASWEEP_*:
# tests strip those from the environments they build.
SESSION_MARK = "PYTEST_LORASWEEP_SESSION"
# How long processes stopped at the very end (the cluster's last ones) may take to go.
LEFTOVER_GRACE_SECONDS = 10.0


def pytest_sessionstart(session: pytest.Session) -> None:
    os.environ[SESSION_MARK] = str(os.getpid())
    # As the project's images and the dev cluster's processes have it (devcluster.IMAGE_ENV),
    # for the tests' own MLflow clients and the operators they start.
    os.environ.update(devcluster.IMAGE_ENV)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run if a process this session started outlives it (once every fixture, the
    cluster's included, is torn down). A cluster still used by another session is that
    session's to stop. Leftovers are listed, then killed."""
    mark = os.environ.get(SESSION_MARK)
    if mark is None:
        return
    deadline = time.monotonic() + LEFTOVER_GRACE_SECONDS
    while True:
        shared = devcluster.shared_processes()
        leftovers = {
            pid: command
            for pid, command in devcluster.session_processes(SESSION_MARK, mark).items()
            if pid not in shared
        }
        if not leftovers or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not leftovers:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write_sep("=", "processes left behind", red=True)
    reporter.write_line(
        f"{len(leftovers)} processes this session started still run after every fixture was "
        "torn down (a cluster started for the session must stop with it); killing them:",
        red=True,
    )
    for pid, command in sorted(leftovers.items()):
        reporter.write_line(f"  {pid} {command[:200]}", red=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def cluster() -> Iterator[devcluster.Cluster]:
    """The dev cluster of `make cluster-up`; started for this session if it is not running."""
    # Several sessions may share one cluster (a developer's, helpers', CI's steps); the one
    # that started it stops it when the last of them is done.
    user = str(os.getpid())
    yield devcluster.use(user, start=True)
    devcluster.release(user)


@pytest.fixture(scope="session")
def kube_client(cluster: devcluster.Cluster):
    from kubernetes import config

    return config.new_client_from_config(str(devcluster.KUBECONFIG))


@pytest.fixture(scope="session")
def mlflow_uri(cluster: devcluster.Cluster) -> str:
    return cluster.mlflow_url


@pytest.fixture
def namespace(kube_client) -> Iterator[str]:
    """A fresh namespace per test, deleted (with everything in it) afterwards."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube_client)
    core.create_namespace({"metadata": {"name": name, "labels": {"lorasweep.io/test": "true"}}})
    wait_for(
        lambda: devcluster.has_default_service_account(core, name),
        timeout=30,
        what=f"default ServiceAccount in {name}",
    )
    yield name
    core.delete_namespace(name)

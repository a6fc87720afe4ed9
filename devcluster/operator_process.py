"""The operator as users run it (`kopf run`), as a process of its own against the dev cluster:
one per test, watching its namespace, or the one `make operator-up` runs in the background."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from devcluster.paths import OPERATOR_KUBECONFIG, REPO, STATE_DIR
from devcluster.processes import free_ports, log, process_alive, start, stop, wait_until
from devcluster.supervisor import Cluster, apply_crds


class OperatorProcess:
    """`kopf run` of the operator, watching one namespace; killable, restartable."""

    def __init__(self, namespace: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.namespace = namespace
        self.env = env or {}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        [port] = free_ports(1)
        env = {**os.environ, "KUBECONFIG": str(OPERATOR_KUBECONFIG), **self.env}
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kopf",
                    "run",
                    "--standalone",
                    "-m",
                    "sweep_operator.handlers",
                    f"--namespace={self.namespace}",
                    f"--liveness=http://127.0.0.1:{port}/healthz",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        wait_until("the operator's liveness endpoint", lambda: self._healthy(port), 60)

    def _healthy(self, port: int) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the operator exited; log:\n{self.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """A crash: SIGKILL, no chance to clean up."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def release_sweeps(api, namespace: str) -> None:
    """Drop the operator's finalizer from a namespace's sweeps, so that they, and the
    namespace, can go once the operator that would have removed it is gone."""
    from kubernetes import client

    from sweep_operator.api import GROUP, PLURAL, VERSION

    custom = client.CustomObjectsApi(api)
    for sweep in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            sweep["metadata"]["name"],
            {"metadata": {"finalizers": None}},
        )


def operator_up() -> None:
    """Apply the CRD and run the operator in the background, watching all namespaces."""
    cluster = Cluster.load()
    if cluster is None or not cluster.healthy():
        raise SystemExit("the cluster is not up: run `make cluster-up` first")
    if "operator" in cluster.pids and process_alive(cluster.pids["operator"]):
        log(f"operator already running (pid {cluster.pids['operator']})")
        return
    apply_crds(cluster)
    env = {
        **os.environ,
        "KUBECONFIG": str(OPERATOR_KUBECONFIG),
        "LORASWEEP_MLFLOW_TRACKING_URI": cluster.mlflow_url,
    }
    log_file = STATE_DIR / "operator.log"
    argv = [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces"]
    pid = start("operator", [*argv, "-m", "sweep_operator.handlers"], env, log_file)
    cluster.pids["operator"] = pid
    cluster.save()
    log(f"operator running (pid {pid}); log: {log_file.relative_to(REPO)}")


def operator_down() -> None:
    cluster = Cluster.load()
    if cluster is None or "operator" not in cluster.pids:
        log("operator not running")
        return
    stop("operator", cluster.pids.pop("operator"))
    cluster.save()
    log("operator stopped")

"""The cluster's processes, in start order: each one's command line, built from the bin folder
and its ports, and what tells that it serves."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devcluster.certificates import client_ssl_context
from devcluster.nodes import LOCAL_NODE
from devcluster.paths import (
    AUDIT_LOG,
    CERTS_DIR,
    KUBECONFIG,
    PACKAGE,
    PODS_DIR,
    STATE_DIR,
)
from devcluster.processes import free_ports, http_ok

CONTROLLERS = ",".join(
    [
        "job-controller",
        "garbage-collector-controller",
        "ttl-after-finished-controller",
        "namespace-controller",
        "serviceaccount-controller",
        "serviceaccount-token-controller",
        "root-ca-certificate-publisher-controller",
        "deployment-controller",
        "replicaset-controller",
        # Claims bind to the pre-provisioned volumes of create_volume_claim; the protection
        # controllers keep a claim and its volume while a pod uses them.
        "persistentvolume-binder-controller",
        "persistentvolume-protection-controller",
        "persistentvolumeclaim-protection-controller",
        # Built-in admin, edit and view gain the rules of ClusterRoles labelled to aggregate
        # into them (the chart's sweep editor and viewer).
        "clusterrole-aggregation-controller",
    ]
)
# Only the operator's requests are audited (its client certificate's CN, see certificates.py):
# the benchmark counts them, and tests/e2e/test_rbac.py compares what they do with the chart's
# RBAC.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: [lorasweep-operator]
- level: None
"""
AUDIT_POLICY_FILE = STATE_DIR / "audit-policy.yaml"
# The audit log is rotated at this size, in MB, keeping this many rotated files (audit-<time>.log
# beside it): a long-lived dev cluster's log stays bounded, and the e2e suite's fits many times.
AUDIT_LOG_MAX_MB = 100
AUDIT_LOG_BACKUPS = 3
MLFLOW_DIR = STATE_DIR / "mlflow"


@dataclass(frozen=True)
class Ports:
    """The loopback ports of the cluster's servers, free when the cluster starts."""

    etcd: int
    etcd_peer: int
    api: int
    controller_manager: int
    scheduler: int
    kwok: int
    mlflow: int

    @classmethod
    def free(cls) -> Ports:
        return cls(*free_ports(7))

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.api}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow}"


@dataclass(frozen=True)
class Component:
    name: str
    argv: list[str]
    # None: the environment of whoever starts the cluster.
    env: dict[str, str] | None = None
    # What start-up waits for, up to ready_timeout seconds; None: only that it keeps running.
    ready: Callable[[], bool] | None = None
    ready_timeout: float = 0.0


def api_ready(api_url: str) -> bool:
    return http_ok(f"{api_url}/readyz", client_ssl_context())


def mlflow_store_uri(folder: Path) -> str:
    """The MLflow store (sqlite) of a server whose files are in `folder`."""
    return f"sqlite:///{folder / 'mlflow.db'}"


def mlflow_server_command(venv_bin: Path, folder: Path, port: int) -> list[str]:
    """The MLflow server, its store and artifacts in `folder`: one worker, as small as the
    dev cluster's 2 cores need."""
    return [
        str(venv_bin / "mlflow"),
        "server",
        f"--backend-store-uri={mlflow_store_uri(folder)}",
        f"--artifacts-destination={folder / 'artifacts'}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--workers=1",
    ]


def mlflow_ready(mlflow_url: str) -> bool:
    return http_ok(f"{mlflow_url}/health")


def components(bin_dir: str, ports: Ports) -> dict[str, Component]:
    """Every process of the cluster but Kueue (see devcluster.kueue), by name, in start
    order."""
    etcd_url = f"http://127.0.0.1:{ports.etcd}"
    peer_url = f"http://127.0.0.1:{ports.etcd_peer}"
    venv_bin = Path(sys.executable).parent
    table = [
        Component(
            "etcd",
            [
                f"{bin_dir}/etcd",
                "--name=default",
                f"--data-dir={STATE_DIR / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
                "--quota-backend-bytes=4294967296",
            ],
            ready=lambda: http_ok(f"{etcd_url}/health"),
            ready_timeout=30,
        ),
        Component(
            "kube-apiserver",
            [
                f"{bin_dir}/kube-apiserver",
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ports.api}",
                f"--client-ca-file={CERTS_DIR / 'ca.crt'}",
                f"--tls-cert-file={CERTS_DIR / 'apiserver.crt'}",
                f"--tls-private-key-file={CERTS_DIR / 'apiserver.key'}",
                f"--service-account-key-file={CERTS_DIR / 'sa.pub'}",
                f"--service-account-signing-key-file={CERTS_DIR / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=RBAC",
                # Scheduler and controller-manager read this CA at start; without it they log noise.
                f"--requestheader-client-ca-file={CERTS_DIR / 'ca.crt'}",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                "--requestheader-allowed-names=front-proxy-client",
                "--profiling=false",
                f"--audit-policy-file={AUDIT_POLICY_FILE}",
                f"--audit-log-path={AUDIT_LOG}",
                "--audit-log-format=json",
                f"--audit-log-maxsize={AUDIT_LOG_MAX_MB}",
                f"--audit-log-maxbackup={AUDIT_LOG_BACKUPS}",
                "--v=1",
            ],
            ready=lambda: api_ready(ports.api_url),
            ready_timeout=90,
        ),
        Component(
            "kube-controller-manager",
            [
                f"{bin_dir}/kube-controller-manager",
                f"--kubeconfig={KUBECONFIG}",
                f"--authentication-kubeconfig={KUBECONFIG}",
                f"--authorization-kubeconfig={KUBECONFIG}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports.controller_manager}",
                "--leader-elect=false",
                f"--controllers={CONTROLLERS}",
                f"--service-account-private-key-file={CERTS_DIR / 'sa.key'}",
                f"--root-ca-file={CERTS_DIR / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--profiling=false",
                # The defaults (20 requests/s, 5 Job syncs) make the Job controller, not the
                # operator, what a sweep of 1,000 parallel trials waits for; large clusters
                # raise them too.
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--concurrent-job-syncs=20",
            ],
        ),
        Component(
            "kube-scheduler",
            [
                f"{bin_dir}/kube-scheduler",
                f"--kubeconfig={KUBECONFIG}",
                f"--authentication-kubeconfig={KUBECONFIG}",
                f"--authorization-kubeconfig={KUBECONFIG}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports.scheduler}",
                "--leader-elect=false",
                "--profiling=false",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
            ],
        ),
        Component(
            "kwok",
            [
                f"{bin_dir}/kwok",
                f"--kubeconfig={KUBECONFIG}",
                f"--config={PACKAGE / 'kwok-stages.yaml'}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-label-selector=lorasweep.io/node-mode=sim",
                "--node-ip=127.0.0.1",
                "--cidr=10.244.0.1/16",
                f"--server-address=127.0.0.1:{ports.kwok}",
            ],
        ),
        Component(
            "pod-runner",
            [
                sys.executable,
                "-m",
                "devcluster.pod_runner",
                f"--kubeconfig={KUBECONFIG}",
                f"--node={LOCAL_NODE}",
                f"--workdir={PODS_DIR}",
            ],
            # The virtualenv's programs first: the runner hands its containers this PATH.
            env={**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}"},
        ),
        Component(
            "mlflow",
            mlflow_server_command(venv_bin, MLFLOW_DIR, ports.mlflow),
            ready=lambda: mlflow_ready(ports.mlflow_url),
            ready_timeout=120,
        ),
    ]
    return {component.name: component for component in table}

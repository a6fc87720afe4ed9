"""The dev and test cluster: a real control plane on loopback with fake GPU nodes and MLflow.

    python tests/cluster/devcluster.py up | down | status | logs POD [-n NAMESPACE]

`up` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok (simulating
the `sim` GPU nodes), the pod runner (running pods of `local-gpu-0` as local processes), Kueue
(its CRDs, its manager and webhooks, the ClusterQueue `gpus`) and an MLflow server, each on a
free loopback port, then writes `.cluster/kubeconfig` and `.cluster/env`. Every process is
recorded by pid in `.cluster/state.json`, which is what `down` stops, with its process group
and those of its descendants; `up` on a healthy cluster does nothing. Tests stop one of them
and start it again as it was (`stop_process`, `start_process`: same arguments, port and data).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from kubernetes import client

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = REPO / ".cluster"
STATE_FILE = STATE_DIR / "state.json"
LOCK_FILE = REPO / ".cluster.lock"
KUBECONFIG = STATE_DIR / "kubeconfig"
ENV_FILE = STATE_DIR / "env"
OPERATOR_KUBECONFIG = STATE_DIR / "operator.kubeconfig"
AUDIT_LOG = STATE_DIR / "logs" / "audit.log"
VOLUMES_DIR = STATE_DIR / "volumes"
# Only the operator's requests are audited (its client certificate's CN, see _make_certs): the
# benchmark counts them, and tests/e2e/test_rbac.py compares what they do with the chart's RBAC.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: [lorasweep-operator]
- level: None
"""
# The audit log is rotated at this size, in MB, keeping this many rotated files (audit-<time>.log
# beside it): a long-lived dev cluster's log stays bounded, and the e2e suite's fits many times.
AUDIT_LOG_MAX_MB = 100
AUDIT_LOG_BACKUPS = 3
HERE = Path(__file__).resolve().parent
# What the operator and trainer images set, for the same programs run here from the virtualenv
# (the operator, MLflow, the pod runner and so the trials). Without it MLflow's telemetry thread
# unsets a variable of os.environ while an MLflow call reads os.environ (requests' proxy
# lookup), and that call fails with KeyError '_MLFLOW_TELEMETRY_SESSION_ID': a trial program
# crashed so, failing its trial.
IMAGE_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true"}

SIM_NODES = {"sim-gpu-0": 4, "sim-gpu-1": 4}
LOCAL_NODE = "local-gpu-0"
LOCAL_NODE_GPUS = 2
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
NODE_CPUS = 32
NODE_MEMORY_GI = 256
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


# Kueue meters the sim nodes' GPUs: one ResourceFlavor for them (Kueue puts its node labels
# on the pods it admits) and one ClusterQueue whose quota is what those nodes hold. cpu and
# memory are covered too, because Kueue refuses a workload that requests a resource its
# ClusterQueue does not name.
KUEUE_FLAVOR = "sim-gpu"
KUEUE_CLUSTER_QUEUE = "gpus"
# Only the webhooks of what Kueue runs here: its own API and batch/v1 Jobs. The others
# (Pods, Deployments, ...) are served only for enabled integrations, and a registered webhook
# with nobody behind it would refuse every such object.
KUEUE_WEBHOOK_GROUPS = {"kueue.x-k8s.io", "batch"}
METRICS_CERTS = Path("/etc/kueue/metrics/certs")


def log(message: str) -> None:
    print(f"devcluster: {message}", file=sys.stderr, flush=True)


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
            not self.dead_processes()
            and _api_ready(self.api_url)
            and _http_ok(f"{self.mlflow_url}/health")
        )


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


def _free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _client_ssl_context() -> ssl.SSLContext:
    certs = STATE_DIR / "certs"
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    context.load_cert_chain(str(certs / "admin.crt"), str(certs / "admin.key"))
    return context


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False


def _api_ready(api_url: str) -> bool:
    return _http_ok(f"{api_url}/readyz", _client_ssl_context())


def _wait(what: str, check, timeout: float, pid: int | None = None, log_file: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if pid is not None and not process_alive(pid):
            tail = log_file.read_text()[-3000:] if log_file and log_file.exists() else ""
            raise RuntimeError(f"{what} exited during start-up; log {log_file}:\n{tail}")
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s (log: {log_file})")


# The command line of each process _start started, by pid: what Cluster.commands keeps of it.
_started_commands: dict[int, list[str]] = {}


def _start(
    name: str, argv: list[str], env: dict[str, str] | None = None, log_file: Path | None = None
) -> int:
    log_file = log_file or STATE_DIR / "logs" / f"{name}.log"
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
    _started_commands[process.pid] = argv
    return process.pid


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=STATE_DIR / "certs")


def _make_certs() -> None:
    """A CA, the apiserver's serving cert, an admin client cert and the service-account key."""
    (STATE_DIR / "certs").mkdir(parents=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "3650",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=lorasweep-dev-ca",
    )
    for name, subject, ext in [
        (
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
            "extendedKeyUsage=serverAuth",
        ),
        ("admin", "/O=system:masters/CN=lorasweep-admin", "extendedKeyUsage=clientAuth"),
        # The operator's own identity, so the audit log can count its requests apart.
        ("operator", "/O=system:masters/CN=lorasweep-operator", "extendedKeyUsage=clientAuth"),
        # Kueue's webhook server; the apiserver calls it at 127.0.0.1 and trusts the CA.
        ("kueue", "/CN=kueue-webhook", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
    ]:
        (STATE_DIR / "certs" / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            subject,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            f"{name}.crt",
            "-extfile",
            f"{name}.ext",
        )
    _openssl("genrsa", "-out", "sa.key", "2048")
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")


def _write_kubeconfig(api_url: str, path: Path, user: str) -> None:
    certs = STATE_DIR / "certs"

    def b64(name: str) -> str:
        return base64.b64encode((certs / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "lorasweep-dev",
                "cluster": {"server": api_url, "certificate-authority-data": b64("ca.crt")},
            }
        ],
        "users": [
            {
                "name": f"lorasweep-{user}",
                "user": {
                    "client-certificate-data": b64(f"{user}.crt"),
                    "client-key-data": b64(f"{user}.key"),
                },
            }
        ],
        "contexts": [
            {
                "name": "lorasweep-dev",
                "context": {
                    "cluster": "lorasweep-dev",
                    "user": f"lorasweep-{user}",
                    "namespace": "default",
                },
            }
        ],
        "current-context": "lorasweep-dev",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)


def _build_bins() -> tuple[str, str]:
    """(the control plane's bin folder, Kueue's folder), as build-bins.sh prints them."""
    env = {**os.environ, "LORASWEEP_SKIP_TOOLS": "1"}
    out = subprocess.run(
        ["bash", str(HERE / "build-bins.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    bin_dir, kueue_dir = out.stdout.strip().splitlines()[-2:]
    return bin_dir, kueue_dir


def _node_manifest(name: str, gpus: int, mode: str) -> dict:
    capacity = {
        "cpu": str(NODE_CPUS),
        "memory": f"{NODE_MEMORY_GI}Gi",
        "pods": "110",
        "nvidia.com/gpu": str(gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.count": str(gpus),
                "lorasweep.io/node-mode": mode,
            },
        },
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": f"{mode} node of the lorasweep dev cluster",
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "v1.36.3",
                "containerRuntimeVersion": mode,
                "kernelVersion": "",
                "osImage": "",
                "bootID": "",
                "machineID": "",
                "systemUUID": "",
                "kubeProxyVersion": "",
            },
        },
    }


def create_nodes(gpus_by_node: dict[str, int], mode: str) -> None:
    """Ready GPU nodes; `sim` ones are kwok's (by label), `local` ones the pod runner's."""
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(str(KUBECONFIG)))
    for name, gpus in gpus_by_node.items():
        node = _node_manifest(name, gpus, mode)
        api.create_node(node)
        # Create drops the status; the status subresource takes it.
        api.patch_node_status(name, {"status": node["status"]})
        # Admission taints a new node not-ready; with no node lifecycle controller running,
        # nothing else would ever lift it.
        api.patch_node(name, {"spec": {"taints": None}})


def has_default_service_account(core, namespace: str) -> bool:
    """Pods are refused in a namespace until its default ServiceAccount exists."""
    from kubernetes.client.exceptions import ApiException

    try:
        core.read_namespaced_service_account("default", namespace)
    except ApiException:
        return False
    return True


def create_volume_claim(
    core: client.CoreV1Api, namespace: str, name: str, size: str = "1Gi"
) -> Path:
    """A PersistentVolumeClaim `name`, bound to a pre-provisioned hostPath volume of its own (the
    dev cluster has no provisioner); returns the volume's directory, under .cluster/volumes/.

    The PersistentVolume, `<namespace>-<name>`, belongs to the namespace: deleting the namespace
    deletes it too, so tests need not clean it up. Pods of local-gpu-0 see the directory (or
    their mount's subPath of it) at their mountPath; simulated pods ignore volumes."""
    volume = f"{namespace}-{name}"
    path = VOLUMES_DIR / volume
    path.mkdir(parents=True, exist_ok=True)
    owner = core.read_namespace(namespace).metadata
    access = {"accessModes": ["ReadWriteMany"], "storageClassName": "local"}
    core.create_persistent_volume(
        {
            "metadata": {
                "name": volume,
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Namespace", "name": namespace, "uid": owner.uid}
                ],
            },
            "spec": {
                **access,
                "capacity": {"storage": size},
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(path), "type": "Directory"},
                # Reserved for this claim alone, as an administrator pre-binds a volume.
                "claimRef": {"namespace": namespace, "name": name},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": name},
            "spec": {**access, "resources": {"requests": {"storage": size}}, "volumeName": volume},
        },
    )

    def bound() -> bool:
        claim = core.read_namespaced_persistent_volume_claim(name, namespace)
        return claim.status.phase == "Bound"

    _wait(f"claim {namespace}/{name} to bind", bound, 30)
    return path


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
        (STATE_DIR / "started-for-users").unlink(missing_ok=True)
        return cluster


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
    (STATE_DIR / "logs").mkdir(exist_ok=True)
    etcd_port, peer_port, api_port, cm_port, sched_port, kwok_port, mlflow_port = _free_ports(7)
    api_url = f"https://127.0.0.1:{api_port}"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    pids: dict[str, int] = {}
    cluster = Cluster(
        api_url=api_url, mlflow_url=mlflow_url, bin_dir=bin_dir, pids=pids, kueue_dir=kueue_dir
    )
    # Save as we go, so a failed start can still be torn down by pid.
    cluster.save()
    try:
        _start_all(
            cluster,
            bin_dir,
            etcd_port,
            peer_port,
            api_port,
            cm_port,
            sched_port,
            kwok_port,
            mlflow_port,
        )
    except BaseException:
        log("start failed; stopping what was started")
        _down(keep_logs=True)
        raise
    ENV_FILE.write_text(
        f"export KUBECONFIG={KUBECONFIG}\n"
        f"export MLFLOW_TRACKING_URI={mlflow_url}\n"
        f"export PATH={bin_dir}:$PATH\n"
    )
    log(f"up in {time.monotonic() - started:.1f}s: {api_url}, MLflow {mlflow_url}")
    log(f"use it with: source {ENV_FILE.relative_to(REPO)}")
    return cluster


def audit_flags() -> list[str]:
    """The kube-apiserver's audit flags, with the policy file they name written: the operator's
    requests, as JSON lines in AUDIT_LOG, rotated."""
    policy = STATE_DIR / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    return [
        f"--audit-policy-file={policy}",
        f"--audit-log-path={AUDIT_LOG}",
        "--audit-log-format=json",
        f"--audit-log-maxsize={AUDIT_LOG_MAX_MB}",
        f"--audit-log-maxbackup={AUDIT_LOG_BACKUPS}",
    ]


def _start_all(
    cluster: Cluster,
    bin_dir: str,
    etcd_port: int,
    peer_port: int,
    api_port: int,
    cm_port: int,
    sched_port: int,
    kwok_port: int,
    mlflow_port: int,
) -> None:
    pids = cluster.pids
    logs = STATE_DIR / "logs"
    certs = STATE_DIR / "certs"
    _make_certs()

    def record(name: str, pid: int) -> int:
        pids[name] = pid
        cluster.commands[name] = _started_commands[pid]
        cluster.save()
        return pid

    etcd_url = f"http://127.0.0.1:{etcd_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    pid = record(
        "etcd",
        _start(
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
        ),
    )
    _wait("etcd", lambda: _http_ok(f"{etcd_url}/health"), 30, pid, logs / "etcd.log")

    pid = record(
        "kube-apiserver",
        _start(
            "kube-apiserver",
            [
                f"{bin_dir}/kube-apiserver",
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--client-ca-file={certs / 'ca.crt'}",
                f"--tls-cert-file={certs / 'apiserver.crt'}",
                f"--tls-private-key-file={certs / 'apiserver.key'}",
                f"--service-account-key-file={certs / 'sa.pub'}",
                f"--service-account-signing-key-file={certs / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=RBAC",
                # Scheduler and controller-manager read this CA at start; without it they log noise.
                f"--requestheader-client-ca-file={certs / 'ca.crt'}",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                "--requestheader-allowed-names=front-proxy-client",
                "--profiling=false",
                *audit_flags(),
                "--v=1",
            ],
        ),
    )
    _wait(
        "kube-apiserver", lambda: _api_ready(cluster.api_url), 90, pid, logs / "kube-apiserver.log"
    )
    _write_kubeconfig(cluster.api_url, KUBECONFIG, "admin")
    _write_kubeconfig(cluster.api_url, OPERATOR_KUBECONFIG, "operator")

    pid = record(
        "kube-controller-manager",
        _start(
            "kube-controller-manager",
            [
                f"{bin_dir}/kube-controller-manager",
                f"--kubeconfig={KUBECONFIG}",
                f"--authentication-kubeconfig={KUBECONFIG}",
                f"--authorization-kubeconfig={KUBECONFIG}",
                "--bind-address=127.0.0.1",
                f"--secure-port={cm_port}",
                "--leader-elect=false",
                f"--controllers={CONTROLLERS}",
                f"--service-account-private-key-file={certs / 'sa.key'}",
                f"--root-ca-file={certs / 'ca.crt'}",
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
    )
    pid = record(
        "kube-scheduler",
        _start(
            "kube-scheduler",
            [
                f"{bin_dir}/kube-scheduler",
                f"--kubeconfig={KUBECONFIG}",
                f"--authentication-kubeconfig={KUBECONFIG}",
                f"--authorization-kubeconfig={KUBECONFIG}",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
                "--leader-elect=false",
                "--profiling=false",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
            ],
        ),
    )
    record(
        "kwok",
        _start(
            "kwok",
            [
                f"{bin_dir}/kwok",
                f"--kubeconfig={KUBECONFIG}",
                f"--config={HERE / 'kwok-stages.yaml'}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-label-selector=lorasweep.io/node-mode=sim",
                "--node-ip=127.0.0.1",
                "--cidr=10.244.0.1/16",
                f"--server-address=127.0.0.1:{kwok_port}",
            ],
        ),
    )
    create_nodes(SIM_NODES, "sim")
    create_nodes({LOCAL_NODE: LOCAL_NODE_GPUS}, "local")

    runner_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    record(
        "pod-runner",
        _start(
            "pod-runner",
            [
                sys.executable,
                str(HERE / "pod_runner.py"),
                f"--kubeconfig={KUBECONFIG}",
                f"--node={LOCAL_NODE}",
                f"--workdir={STATE_DIR / 'pods'}",
            ],
            env=runner_env,
        ),
    )

    start_kueue(cluster)

    mlflow_dir = STATE_DIR / "mlflow"
    mlflow_dir.mkdir()
    pid = record(
        "mlflow",
        _start(
            "mlflow",
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                f"--backend-store-uri=sqlite:///{mlflow_dir / 'mlflow.db'}",
                f"--artifacts-destination={mlflow_dir / 'artifacts'}",
                "--host=127.0.0.1",
                f"--port={mlflow_port}",
                "--workers=1",
            ],
        ),
    )
    _wait("mlflow", lambda: _http_ok(f"{cluster.mlflow_url}/health"), 120, pid, logs / "mlflow.log")
    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(str(KUBECONFIG)))
    _wait("default service account", lambda: has_default_service_account(core, "default"), 60)
    for name, pid in pids.items():
        if not process_alive(pid):
            raise RuntimeError(f"{name} died during start-up; see {logs / (name + '.log')}")


def _kubectl_apply(cluster: Cluster, path: Path) -> None:
    subprocess.run(
        [f"{cluster.bin_dir}/kubectl", "apply", "--server-side", "-f", str(path)],
        check=True,
        capture_output=True,
        env={**os.environ, "KUBECONFIG": str(KUBECONFIG)},
    )


def _wait_established(cluster: Cluster, path: Path) -> None:
    subprocess.run(
        [
            f"{cluster.bin_dir}/kubectl",
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            str(path),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "KUBECONFIG": str(KUBECONFIG)},
    )


def kueue_webhooks(manifests: list[dict], url: str, ca_bundle: str) -> list[dict]:
    """Kueue's webhook configurations for a manager outside the cluster: only the webhooks of
    KUEUE_WEBHOOK_GROUPS, each calling `url` + its path instead of the in-cluster Service."""
    configurations = []
    for manifest in manifests:
        webhooks = []
        for webhook in manifest["webhooks"]:
            groups = {g for rule in webhook["rules"] for g in rule["apiGroups"]}
            if not groups <= KUEUE_WEBHOOK_GROUPS:
                continue
            path = webhook["clientConfig"]["service"]["path"]
            webhooks.append(
                {**webhook, "clientConfig": {"url": f"{url}{path}", "caBundle": ca_bundle}}
            )
        name = f"kueue-{manifest['metadata']['name']}"
        configurations.append({**manifest, "metadata": {"name": name}, "webhooks": webhooks})
    return configurations


def start_kueue(cluster: Cluster) -> None:
    """Kueue's CRDs, its manager on loopback (batch/v1 Jobs only, no leader election, our own
    certificate), its webhooks, and the ResourceFlavor and ClusterQueue of the sim GPUs."""
    from kubernetes import client, config

    started = time.monotonic()
    kueue_dir = Path(cluster.kueue_dir)
    logs = STATE_DIR / "logs"
    home = STATE_DIR / "kueue"
    (home / "certs").mkdir(parents=True)
    certs = STATE_DIR / "certs"
    shutil.copy(certs / "kueue.crt", home / "certs" / "tls.crt")
    shutil.copy(certs / "kueue.key", home / "certs" / "tls.key")
    _kubectl_apply(cluster, kueue_dir / "crds")
    _wait_established(cluster, kueue_dir / "crds")
    webhook_port, health_port = _free_ports(2)
    configuration = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(home / "certs")},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": ["batch/job"]},
        # Its on-demand visibility API server would take a fixed port (8082).
        "featureGates": {"VisibilityOnDemand": False},
    }
    (home / "config.yaml").write_text(json.dumps(configuration, indent=2))
    # Without internal cert management Kueue also reads a metrics certificate from a fixed
    # path, even with metrics off. It gets ours there in a private mount namespace, as a
    # container would, so the machine's /etc keeps only the empty mount point.
    METRICS_CERTS.mkdir(parents=True, exist_ok=True)
    argv = [str(kueue_dir / "kueue"), f"--config={home / 'config.yaml'}"]
    script = f'mount --bind {home / "certs"} {METRICS_CERTS} && exec "$@"'
    pid = _start(
        "kueue",
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
        env={**os.environ, "KUBECONFIG": str(KUBECONFIG)},
    )
    cluster.pids["kueue"] = pid
    cluster.commands["kueue"] = _started_commands[pid]
    cluster.save()
    ready = f"http://127.0.0.1:{health_port}/readyz"
    _wait("kueue", lambda: _http_ok(ready), 90, pid, logs / "kueue.log")

    api = config.new_client_from_config(str(KUBECONFIG))
    admission = client.AdmissionregistrationV1Api(api)
    manifests = yaml_documents(kueue_dir / "webhooks.yaml")
    ca_bundle = base64.b64encode((certs / "ca.crt").read_bytes()).decode()
    for webhook_config in kueue_webhooks(manifests, f"https://127.0.0.1:{webhook_port}", ca_bundle):
        if webhook_config["kind"] == "MutatingWebhookConfiguration":
            admission.create_mutating_webhook_configuration(webhook_config)
        else:
            admission.create_validating_webhook_configuration(webhook_config)

    custom = client.CustomObjectsApi(api)
    custom.create_cluster_custom_object(
        "kueue.x-k8s.io",
        "v1beta2",
        "resourceflavors",
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": KUEUE_FLAVOR},
            "spec": {"nodeLabels": {"lorasweep.io/node-mode": "sim"}},
        },
    )
    custom.create_cluster_custom_object(
        "kueue.x-k8s.io",
        "v1beta2",
        "clusterqueues",
        cluster_queue_manifest(
            KUEUE_CLUSTER_QUEUE,
            {
                "nvidia.com/gpu": sum(SIM_NODES.values()),
                "cpu": NODE_CPUS * len(SIM_NODES),
                "memory": f"{NODE_MEMORY_GI * len(SIM_NODES)}Gi",
            },
        ),
    )
    log(f"kueue up in {time.monotonic() - started:.1f}s")


def cluster_queue_manifest(name: str, quota: dict[str, int | str]) -> dict:
    """A ClusterQueue over the sim GPUs' flavor that preempts lower-priority workloads of its
    own queue for higher-priority ones."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {},
            "resourceGroups": [
                {
                    "coveredResources": list(quota),
                    "flavors": [
                        {
                            "name": KUEUE_FLAVOR,
                            "resources": [
                                {"name": resource, "nominalQuota": value}
                                for resource, value in quota.items()
                            ],
                        }
                    ],
                }
            ],
            "preemption": {"withinClusterQueue": "LowerPriority"},
        },
    }


def yaml_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def down(keep_logs: bool = False) -> None:
    with _exclusive():
        _down(keep_logs)


def release(user: str) -> None:
    """A user (a test session) is done with the cluster; the last one out stops it, if the
    cluster was started for a user rather than by `make cluster-up`."""
    with _exclusive():
        users = STATE_DIR / "users"
        (users / user).unlink(missing_ok=True)
        others = [u for u in users.glob("*") if process_alive(int(u.name))]
        if not others and (STATE_DIR / "started-for-users").exists():
            _down(keep_logs=False)


def use(user: str, start: bool) -> Cluster:
    """Register a user (a test session, by pid) of the cluster, starting it if needed."""
    with _exclusive():
        running = Cluster.load()
        fresh = running is None or not running.healthy()
        cluster = _up()
        if fresh and start:
            (STATE_DIR / "started-for-users").touch()
        (STATE_DIR / "users").mkdir(exist_ok=True)
        (STATE_DIR / "users" / user).touch()
        return cluster


def _down(keep_logs: bool = False) -> None:
    cluster = Cluster.load()
    if cluster is None:
        log("not running")
    else:
        # Reverse start order: clients first, etcd last.
        for name, pid in reversed(list(cluster.pids.items())):
            _stop(name, pid)
        log(f"stopped {', '.join(reversed(cluster.pids)) or 'nothing'}")
    if keep_logs:
        for path in STATE_DIR.iterdir():
            if path.name != "logs":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    else:
        shutil.rmtree(STATE_DIR, ignore_errors=True)


def _stop(name: str, pid: int, grace: float = 10.0) -> None:
    """Stop a process started by _start with everything it started: its process group (MLflow's
    server workers), which outlives a leader that has exited, and the groups of its
    descendants (the pod runner's containers run in sessions of their own)."""
    groups = _groups_under(pid)
    _signal_groups(groups, signal.SIGTERM)
    if _ended(groups, grace):
        return
    log(f"{name} ignored SIGTERM; killing it")
    _signal_groups(groups, signal.SIGKILL)
    # SIGKILL is not instant either: the next process stopped (etcd after the apiserver) or
    # the session's final check must not find this one still there.
    if not _ended(groups, 10):
        log(f"{name} still runs after SIGKILL (process groups {sorted(_live_groups(groups))})")


def _ended(groups: set[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _live_groups(groups):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _process_table() -> dict[int, tuple[int, int]]:
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


def _groups_under(pid: int) -> set[int]:
    """The process group `pid` leads, and the groups of its running descendants."""
    table = _process_table()
    groups, parents = {pid}, {pid}
    while True:
        children = {p for p, (ppid, _) in table.items() if ppid in parents and p not in parents}
        if not children:
            return groups
        groups |= {table[p][1] for p in children}
        parents |= children


def _live_groups(groups: set[int]) -> set[int]:
    return {pgid for _, pgid in _process_table().values()} & groups


def _signal_groups(groups: set[int], signum: int) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)


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
            groups = _groups_under(pid)
            _signal_groups(groups, signal.SIGKILL)
            if not _ended(groups, 10):
                raise RuntimeError(f"{name} still runs after SIGKILL")
        else:
            _stop(name, pid)
        return Stopped(name=name, argv=current.commands[name], env=env)


def start_process(cluster: Cluster, stopped: Stopped) -> None:
    """Start a process stop_process stopped, with the same arguments (so the same port, data
    and certificates) and environment, record its new pid (in `cluster` too), and wait until
    it serves again."""
    with _exclusive():
        current = Cluster.load()
        if current is None:
            raise ValueError("the cluster is down")
        pid = _start(stopped.name, stopped.argv, stopped.env)
        current.pids[stopped.name] = pid
        current.save()
        cluster.pids[stopped.name] = pid
    logs = STATE_DIR / "logs"
    log_file = logs / f"{stopped.name}.log"
    if stopped.name == "kube-apiserver":
        _wait(stopped.name, lambda: _api_ready(cluster.api_url), 90, pid, log_file)
    elif stopped.name == "mlflow":
        _wait(stopped.name, lambda: _http_ok(f"{cluster.mlflow_url}/health"), 120, pid, log_file)
    elif not process_alive(pid):
        raise RuntimeError(f"{stopped.name} exited at once; see {log_file}")
    log(f"{stopped.name} started again (pid {pid})")


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


def shared_processes() -> set[int]:
    """The processes of the running cluster and their descendants, when test sessions other
    than the ones that ended still use it: theirs to stop, not ours."""
    cluster = Cluster.load()
    users = STATE_DIR / "users"
    if cluster is None or not any(process_alive(int(u.name)) for u in users.glob("*")):
        return set()
    table = _process_table()
    groups = set().union(*(_groups_under(pid) for pid in cluster.pids.values()))
    return {pid for pid, (_, pgid) in table.items() if pgid in groups}


def apply_crds(cluster: Cluster) -> None:
    """The project's CRDs, applied as a user would (`kubectl apply --server-side`)."""
    subprocess.run(
        [f"{cluster.bin_dir}/kubectl", "apply", "--server-side", "-f", str(REPO / "crds")],
        check=True,
        capture_output=True,
        env={**os.environ, "KUBECONFIG": str(KUBECONFIG)},
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
    pid = _start("operator", [*argv, "-m", "sweep_operator.handlers"], env, log_file)
    cluster.pids["operator"] = pid
    cluster.save()
    log(f"operator running (pid {pid}); log: {log_file.relative_to(REPO)}")


def operator_down() -> None:
    cluster = Cluster.load()
    if cluster is None or "operator" not in cluster.pids:
        log("operator not running")
        return
    _stop("operator", cluster.pids.pop("operator"))
    cluster.save()
    log("operator stopped")


def memory_mib(cluster: Cluster) -> dict[str, float]:
    """Resident memory of each of the cluster's processes and their children, in MiB."""
    usage: dict[str, float] = {}
    for name, pid in cluster.pids.items():
        out = subprocess.run(
            ["ps", "-o", "rss=", "-g", str(pid)], capture_output=True, text=True
        ).stdout
        usage[name] = round(sum(int(x) for x in out.split()) / 1024, 1)
    return usage


def status() -> int:
    cluster = Cluster.load()
    if cluster is None:
        print("not running")
        return 1
    dead = cluster.dead_processes()
    print(
        json.dumps(
            {
                "api": cluster.api_url,
                "mlflow": cluster.mlflow_url,
                "healthy": cluster.healthy(),
                "dead": dead,
                "memory_mib": memory_mib(cluster),
            },
            indent=2,
        )
    )
    return 0 if not dead else 1


def pod_log_path(namespace: str, pod: str, container: str | None = None) -> Path:
    folder = STATE_DIR / "pods" / namespace / pod
    if container is None:
        logs = sorted(folder.glob("*.log"))
        if not logs:
            raise FileNotFoundError(f"no log for pod {namespace}/{pod} under {folder}")
        return logs[0]
    return folder / f"{container}.log"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the cluster (no-op when it is already up)")
    sub.add_parser("down", help="stop every process the cluster started and remove its state")
    sub.add_parser("status", help="health and memory of the running cluster")
    sub.add_parser("operator-up", help="apply the CRD and run the operator in the background")
    sub.add_parser("operator-down", help="stop the operator")
    logs = sub.add_parser("logs", help="the log of a pod run by the pod runner")
    logs.add_argument("pod")
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("-c", "--container")
    args = parser.parse_args()
    if args.command == "up":
        up()
    elif args.command == "down":
        down()
    elif args.command == "status":
        return status()
    elif args.command == "operator-up":
        operator_up()
    elif args.command == "operator-down":
        operator_down()
    elif args.command == "logs":
        sys.stdout.write(pod_log_path(args.namespace, args.pod, args.container).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

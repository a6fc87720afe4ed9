"""Kueue on the dev cluster: its CRDs, its manager on loopback, its webhooks, and the
ResourceFlavor and ClusterQueue that meter the sim nodes' GPUs."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from devcluster.nodes import NODE_CPUS, NODE_MEMORY_GI, SIM_NODES
from devcluster.paths import CERTS_DIR, KUBECONFIG, LOGS_DIR, STATE_DIR
from devcluster.processes import free_ports, http_ok, log, start, wait_until

if TYPE_CHECKING:
    from devcluster.supervisor import Cluster

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


def _kubectl(cluster: Cluster, *args: str) -> None:
    subprocess.run(
        [f"{cluster.bin_dir}/kubectl", *args],
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
    home = STATE_DIR / "kueue"
    (home / "certs").mkdir(parents=True)
    shutil.copy(CERTS_DIR / "kueue.crt", home / "certs" / "tls.crt")
    shutil.copy(CERTS_DIR / "kueue.key", home / "certs" / "tls.key")
    crds = str(kueue_dir / "crds")
    _kubectl(cluster, "apply", "--server-side", "-f", crds)
    _kubectl(cluster, "wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
    webhook_port, health_port = free_ports(2)
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
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]
    pid = start("kueue", argv, env={**os.environ, "KUBECONFIG": str(KUBECONFIG)})
    cluster.pids["kueue"] = pid
    cluster.commands["kueue"] = argv
    cluster.save()
    ready = f"http://127.0.0.1:{health_port}/readyz"
    wait_until("kueue", lambda: http_ok(ready), 90, pid, LOGS_DIR / "kueue.log")

    api = config.new_client_from_config(str(KUBECONFIG))
    admission = client.AdmissionregistrationV1Api(api)
    manifests = yaml_documents(kueue_dir / "webhooks.yaml")
    ca_bundle = base64.b64encode((CERTS_DIR / "ca.crt").read_bytes()).decode()
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

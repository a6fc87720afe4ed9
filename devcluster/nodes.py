"""The cluster's nodes: kwok's simulated GPU nodes and the pod runner's local one, and the
pre-provisioned volumes that local pods mount."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from devcluster.paths import KUBECONFIG, VOLUMES_DIR
from devcluster.processes import wait_until

if TYPE_CHECKING:
    from kubernetes import client

SIM_NODES = {"sim-gpu-0": 4, "sim-gpu-1": 4}
LOCAL_NODE = "local-gpu-0"
LOCAL_NODE_GPUS = 2
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
NODE_CPUS = 32
NODE_MEMORY_GI = 256


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

    wait_until(f"claim {namespace}/{name} to bind", bound, 30)
    return path

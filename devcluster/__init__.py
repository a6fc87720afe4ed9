"""The dev cluster: a real control plane on loopback with fake GPU nodes, a kubelet stand-in
that runs pods as local processes, Kueue and MLflow; for `make demo`, the tests and the
benchmarks alike.

    python -m devcluster up | down | status | operator-up | operator-down | logs POD [-n NS]
"""

from devcluster.supervisor import (
    AUDIT_LOG,
    IMAGE_ENV,
    KUBECONFIG,
    KUEUE_CLUSTER_QUEUE,
    OPERATOR_KUBECONFIG,
    REPO,
    SIM_NODES,
    STATE_DIR,
    Cluster,
    Stopped,
    apply_crds,
    cluster_queue_manifest,
    create_nodes,
    create_volume_claim,
    down,
    has_default_service_account,
    pod_log_path,
    process_alive,
    release,
    session_processes,
    shared_processes,
    start_process,
    stop_process,
    up,
    use,
)

__all__ = [
    "AUDIT_LOG",
    "IMAGE_ENV",
    "KUBECONFIG",
    "KUEUE_CLUSTER_QUEUE",
    "OPERATOR_KUBECONFIG",
    "REPO",
    "SIM_NODES",
    "STATE_DIR",
    "Cluster",
    "Stopped",
    "apply_crds",
    "cluster_queue_manifest",
    "create_nodes",
    "create_volume_claim",
    "down",
    "has_default_service_account",
    "pod_log_path",
    "process_alive",
    "release",
    "session_processes",
    "shared_processes",
    "start_process",
    "stop_process",
    "up",
    "use",
]

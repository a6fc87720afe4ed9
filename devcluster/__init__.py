"""The dev cluster: a real control plane on loopback with fake GPU nodes, a kubelet stand-in
that runs pods as local processes, Kueue and MLflow; for `make demo`, the tests and the
benchmarks alike.

    python -m devcluster up | down | status | operator-up | operator-down | logs POD [-n NS]

Modules, by role: `supervisor` (the cluster's state, its users, up and down), `components`
(each process's command line and health check), `certificates`, `nodes` (and the volumes of
local pods), `kueue`, `processes` (starting and stopping process trees), `operator_process`,
`pod_runner` with `pod_env`, `pod_mounts` and `pod_status`, `cli` and `demo`. This module
gathers what the tests, the benchmarks and the docs' scripts use.
"""

from devcluster.components import AUDIT_LOG_BACKUPS
from devcluster.kueue import KUEUE_CLUSTER_QUEUE, cluster_queue_manifest
from devcluster.nodes import (
    SIM_NODES,
    create_nodes,
    create_volume_claim,
    has_default_service_account,
)
from devcluster.paths import (
    AUDIT_LOG,
    KUBECONFIG,
    OPERATOR_KUBECONFIG,
    REPO,
    STATE_DIR,
    pod_log_path,
)
from devcluster.processes import IMAGE_ENV, image_env_vars, process_alive, session_processes
from devcluster.supervisor import (
    Cluster,
    Stopped,
    apply_crds,
    down,
    release,
    shared_processes,
    start_process,
    stop_process,
    up,
    use,
)

__all__ = [
    "AUDIT_LOG",
    "AUDIT_LOG_BACKUPS",
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
    "image_env_vars",
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

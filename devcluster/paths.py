"""Where the dev cluster keeps its state: everything under the repository's .cluster/."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
STATE_DIR = REPO / ".cluster"
STATE_FILE = STATE_DIR / "state.json"
LOCK_FILE = REPO / ".cluster.lock"
KUBECONFIG = STATE_DIR / "kubeconfig"
ENV_FILE = STATE_DIR / "env"
OPERATOR_KUBECONFIG = STATE_DIR / "operator.kubeconfig"
LOGS_DIR = STATE_DIR / "logs"
CERTS_DIR = STATE_DIR / "certs"
AUDIT_LOG = LOGS_DIR / "audit.log"
VOLUMES_DIR = STATE_DIR / "volumes"
PODS_DIR = STATE_DIR / "pods"
# Who uses the cluster (test sessions, by pid), and whether it was started for them rather
# than by `make cluster-up`.
USERS_DIR = STATE_DIR / "users"
STARTED_FOR_USERS = STATE_DIR / "started-for-users"


def pod_log_path(namespace: str, pod: str, container: str | None = None) -> Path:
    """The log of a pod the pod runner ran: its container's, or its first container's."""
    folder = PODS_DIR / namespace / pod
    if container is None:
        logs = sorted(folder.glob("*.log"))
        if not logs:
            raise FileNotFoundError(f"no log for pod {namespace}/{pod} under {folder}")
        return logs[0]
    return folder / f"{container}.log"

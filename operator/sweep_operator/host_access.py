"""The operator's floor under the pods it has made: none gets access to its node.

A sweep's `jobTemplate` or `spec.trainer.volumes` could otherwise ask the operator for a pod
that reaches the node: a privileged container, a hostPath volume, the node's network, PID or
IPC namespace, a host port. The operator refuses such a trial whoever asks. Everything else
is the namespace's Pod Security level, which the apiserver enforces on the pods the Job
controller makes; it may refuse more, and it stays the final word.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HOST_NAMESPACES = ("hostNetwork", "hostPID", "hostIPC")
CONTAINER_KINDS = ("initContainers", "containers", "ephemeralContainers")
# What the refusal lists as not allowed, in every message.
REFUSED = "privileged containers, hostPath volumes, hostNetwork, hostPID, hostIPC, hostPort"


def host_access(pod: Mapping[str, Any], path: str) -> list[tuple[str, str]]:
    """Where a pod spec (or a part of one: only the keys it has are read) asks for access to
    its node: (field under `path`, what it says) pairs, empty when it asks for none.

    Malformed entries (a volume that is not a mapping) are skipped: the apiserver refuses
    them with its own message."""
    found = [(f"{path}.{key}", "is true") for key in HOST_NAMESPACES if pod.get(key) is True]
    for i, volume in enumerate(_list(pod.get("volumes"))):
        if isinstance(volume, Mapping) and volume.get("hostPath") is not None:
            found.append(
                (f"{path}.volumes[{i}].hostPath", f"is set (volume {volume.get('name')!r})")
            )
    for kind in CONTAINER_KINDS:
        for i, container in enumerate(_list(pod.get(kind))):
            if not isinstance(container, Mapping):
                continue
            where = f"{path}.{kind}[{i}]"
            security = container.get("securityContext")
            if isinstance(security, Mapping) and security.get("privileged") is True:
                found.append((f"{where}.securityContext.privileged", "is true"))
            for j, port in enumerate(_list(container.get("ports"))):
                if isinstance(port, Mapping) and port.get("hostPort"):
                    found.append((f"{where}.ports[{j}].hostPort", f"is {port['hostPort']}"))
    return found


def refusal(what: str) -> str:
    """The message for one finding: what asks for host access, and what is not allowed."""
    return f"{what}: the operator creates no trial pod with access to its node ({REFUSED})"


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []

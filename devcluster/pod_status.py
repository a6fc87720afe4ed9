"""The pod statuses the pod runner reports, as a kubelet writes them: Running, how the
containers ended (with their termination messages), or a start that failed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kubernetes import client

MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ContainerEnd:
    name: str
    code: int
    message: str
    started_at: str


def running_status(pod: client.V1Pod, started_at: dict[str, str]) -> dict:
    """Every container (name: when it started) running and ready."""
    stamp = now()
    return {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "startTime": stamp,
        "conditions": [
            {"type": t, "status": "True", "lastTransitionTime": stamp}
            for t in ("Initialized", "Ready", "ContainersReady")
        ],
        "containerStatuses": [
            {
                "name": name,
                "image": _image(pod, name),
                "ready": True,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": started}},
            }
            for name, started in started_at.items()
        ],
    }


def ended_status(pod: client.V1Pod, ends: list[ContainerEnd]) -> dict:
    """Succeeded if every container exited 0, else Failed; each container terminated."""
    failed = any(end.code != 0 for end in ends)
    stamp = now()
    return {
        "phase": "Failed" if failed else "Succeeded",
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "lastTransitionTime": stamp,
                "reason": "PodFailed" if failed else "PodCompleted",
            }
        ],
        "containerStatuses": [
            {
                "name": end.name,
                "image": _image(pod, end.name),
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {
                    "terminated": {
                        # A signal death reads as 128 + signal, as container runtimes report it.
                        "exitCode": end.code if end.code >= 0 else 128 - end.code,
                        "reason": "Completed" if end.code == 0 else "Error",
                        "message": end.message,
                        "startedAt": end.started_at,
                        "finishedAt": stamp,
                    }
                },
            }
            for end in ends
        ],
    }


def failed_start_status(pod: client.V1Pod, message: str) -> dict:
    """Failed without running: every container terminated with a StartError."""
    stamp = now()
    return {
        "phase": "Failed",
        "message": message[:MAX_MESSAGE_BYTES],
        "reason": "PodRunnerStartError",
        "containerStatuses": [
            {
                "name": c.name,
                "image": c.image or "",
                "ready": False,
                "restartCount": 0,
                "state": {
                    "terminated": {
                        "exitCode": 128,
                        "reason": "StartError",
                        "message": message[:MAX_MESSAGE_BYTES],
                        "startedAt": stamp,
                        "finishedAt": stamp,
                    }
                },
            }
            for c in pod.spec.containers
        ],
    }


def termination_message(message_file: Path, log_file: Path, code: int, fallback: bool) -> str:
    """What the container wrote to its message file; with FallbackToLogsOnError (`fallback`),
    the tail of its log when it failed and wrote nothing."""
    message = message_file.read_bytes()[:MAX_MESSAGE_BYTES].decode(errors="replace")
    if not message and code != 0 and fallback:
        lines = log_file.read_bytes().decode(errors="replace").splitlines()
        message = "\n".join(lines[-FALLBACK_LOG_LINES:])[-MAX_MESSAGE_BYTES:]
    return message


def _image(pod: client.V1Pod, container_name: str) -> str:
    return next((c.image or "" for c in pod.spec.containers if c.name == container_name), "")

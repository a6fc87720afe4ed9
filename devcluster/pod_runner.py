"""A kubelet stand-in for one node: runs the containers of the pods bound to it as local processes.

The real Job controller and scheduler put pods on `local-gpu-0`; this process starts each
container's command and args with the pod's environment (and of its own only PATH and HOME, see
devcluster.pod_env), reports Running, then Succeeded or Failed by exit code with the
termination message, and ends the process when the pod is deleted (SIGTERM, then SIGKILL after
the grace period) and reports how it ended before the deletion finishes, as a kubelet would. A
container's processes end with its main one, as they would in its PID namespace: what is left
of its process group is killed then. Images are ignored: the command runs with this machine's
file system (PATH leads to the project's virtualenv first), except that each container runs in
a private mount namespace with its termination message file bind-mounted at its
terminationMessagePath, each claim's hostPath volume at its mountPath and, for a pod with a
subdomain, an /etc/hosts resolving the DNS names of the pod and its Indexed Job's other pods to
127.0.0.1 (every local pod shares this machine's loopback).

Per pod, under WORKDIR/<namespace>/<pod>/: <container>.log (stdout and stderr),
<container>.termination-log (what the container sees at its terminationMessagePath) and hosts
(the pod's /etc/hosts, when it has a subdomain).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from devcluster.pod_env import CONFIG_MAP, container_env, env_sources, expand, process_env
from devcluster.pod_mounts import (
    Bind,
    hosts_file,
    in_mount_namespace,
    termination_message_bind,
    volume_binds,
)
from devcluster.pod_status import (
    ContainerEnd,
    ended_status,
    failed_start_status,
    now,
    running_status,
    termination_message,
)

RETRY_SECONDS = 1.0  # between tries of an API write the apiserver could not take
log = logging.getLogger("pod-runner")


@dataclass
class RunningContainer:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    message_path: Path
    fallback_to_logs: bool
    started_at: str


@dataclass
class RunningPod:
    namespace: str
    name: str
    uid: str
    containers: list[RunningContainer] = field(default_factory=list)
    terminating: bool = False


class PodRunner:
    def __init__(self, api: client.CoreV1Api, node: str, workdir: Path) -> None:
        self.api = api
        self.batch = client.BatchV1Api(api.api_client)
        self.node = node
        self.workdir = workdir
        self.pods: dict[str, RunningPod] = {}
        # Every pod this runner started, finished or not: a late watch event for one of them
        # must never start it again or mistake it for a pod lost in a restart.
        self.handled: set[str] = set()
        # Reentrant: the SIGTERM handler (stop_all) runs on the main thread, which may hold it.
        self.lock = threading.RLock()

    def _env_sources(
        self, pod: client.V1Pod, container: client.V1Container
    ) -> dict[tuple[str, str], dict[str, str]]:
        """The data of the ConfigMaps and Secrets the container's env reads, decoded; one that
        does not exist is left out."""
        found = {}
        namespace = pod.metadata.namespace
        for kind, name in env_sources(container):
            try:
                if kind == CONFIG_MAP:
                    data = self.api.read_namespaced_config_map(name, namespace).data or {}
                else:
                    secret = self.api.read_namespaced_secret(name, namespace).data or {}
                    data = {k: base64.b64decode(v).decode() for k, v in secret.items()}
            except ApiException as error:
                if error.status == 404:
                    continue
                raise
            found[kind, name] = data
        return found

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, pod: client.V1Pod) -> None:
        key = pod.metadata.uid
        folder = self.workdir / pod.metadata.namespace / pod.metadata.name
        folder.mkdir(parents=True, exist_ok=True)
        running = RunningPod(pod.metadata.namespace, pod.metadata.name, key)
        try:
            hosts = hosts_file(self.batch, pod, folder)
            for container in pod.spec.containers:
                running.containers.append(self._start_container(pod, container, folder, hosts))
        except Exception as error:  # a bad pod must not take the runner down
            log.exception("cannot start %s/%s", pod.metadata.namespace, pod.metadata.name)
            for started in running.containers:
                _terminate(started.process, 0)
            self._report_failed_start(pod, str(error))
            return
        with self.lock:
            self.pods[key] = running
        started_at = {c.name: c.started_at for c in running.containers}
        self._patch_status(running, running_status(pod, started_at))
        threading.Thread(target=self._wait_for_exit, args=(pod, running), daemon=True).start()

    def _start_container(
        self, pod: client.V1Pod, container: client.V1Container, folder: Path, hosts: Path | None
    ) -> RunningContainer:
        if not container.command:
            raise ValueError(
                f"container {container.name!r} has no command: the pod runner cannot run an "
                "image's entrypoint, give the command explicitly"
            )
        # A fresh, empty message file, as a kubelet gives every container.
        message_path = folder / f"{container.name}.termination-log"
        message_path.write_bytes(b"")
        env = container_env(pod, container, self._env_sources(pod, container))
        argv = [expand(part, env) for part in [*container.command, *(container.args or [])]]
        binds = volume_binds(self.api, pod, container, env)
        if hosts is not None:
            binds.append(Bind(hosts, Path("/etc/hosts")))
        # Last, so that it stays visible where its path is inside a volume mounted above.
        binds.append(termination_message_bind(container, message_path))
        cwd = (
            Path(container.working_dir)
            if container.working_dir and Path(container.working_dir).is_dir()
            else folder
        )
        log_path = folder / f"{container.name}.log"
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                in_mount_namespace(argv, binds, cwd),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=process_env(env, os.environ),
                cwd=cwd,
                start_new_session=True,
            )
        log.info(
            "started %s/%s[%s] pid %d: %s with %s",
            pod.metadata.namespace,
            pod.metadata.name,
            container.name,
            process.pid,
            argv,
            binds,
        )
        return RunningContainer(
            name=container.name,
            process=process,
            log_path=log_path,
            message_path=message_path,
            fallback_to_logs=container.termination_message_policy == "FallbackToLogsOnError",
            started_at=now(),
        )

    def _wait_for_exit(self, pod: client.V1Pod, running: RunningPod) -> None:
        statuses = []
        for container in running.containers:
            code = container.process.wait()
            # A container ends with its main process: the kernel kills whatever else runs in
            # its PID namespace. Here that is the rest of its process group (a worker deaf to
            # SIGTERM, say), which would otherwise outlive the pod.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(container.process.pid, signal.SIGKILL)
            statuses.append((container, code))
        with self.lock:
            # From now on a deletion finishes at once: there is nothing left to stop.
            self.pods.pop(running.uid, None)
            terminating = running.terminating
        ends = [
            ContainerEnd(
                c.name,
                code,
                termination_message(c.message_path, c.log_path, code, c.fallback_to_logs),
                c.started_at,
            )
            for c, code in statuses
        ]
        log.info(
            "%s/%s ended: %s",
            running.namespace,
            running.name,
            [(c.name, code) for c, code in statuses],
        )
        # A deleted pod reports its end too, before the deletion finishes, as from a kubelet: the
        # Job controller judges a pod by its terminal phase and conditions (a podFailurePolicy
        # that ignores DisruptionTarget, set by an eviction). The strategic merge patch merges
        # conditions by type, so that condition stays.
        self._patch_status(running, ended_status(pod, ends))
        if terminating:
            self._finalize_deletion(running)

    def _report_failed_start(self, pod: client.V1Pod, message: str) -> None:
        running = RunningPod(pod.metadata.namespace, pod.metadata.name, pod.metadata.uid)
        self._patch_status(running, failed_start_status(pod, message))

    def terminate(self, pod: client.V1Pod, finalize: bool = True) -> None:
        """The pod is being deleted: stop its processes, then let the deletion finish."""
        with self.lock:
            running = self.pods.get(pod.metadata.uid)
            if running is not None:
                if running.terminating:
                    return
                running.terminating = True
        if running is None:
            if not finalize:
                return
            phase = pod.status.phase if pod.status else None
            if pod.metadata.uid not in self.handled and phase not in ("Succeeded", "Failed"):
                # Not run by this runner (it restarted while the pod ran): its end must reach
                # the API all the same, or the Job's tracking finalizer keeps the deleted pod,
                # and its GPUs, for ever. (A pod this runner ran reports its own end.)
                self._report_failed_start(pod, "the pod runner restarted while this pod ran")
            self._finalize_deletion(
                RunningPod(pod.metadata.namespace, pod.metadata.name, pod.metadata.uid)
            )
            return
        grace = pod.metadata.deletion_grace_period_seconds
        grace = 30 if grace is None else grace
        for container in running.containers:
            threading.Thread(
                target=_terminate, args=(container.process, grace), daemon=True
            ).start()

    def _finalize_deletion(self, running: RunningPod) -> None:
        def delete() -> None:
            self.api.delete_namespaced_pod(
                running.name,
                running.namespace,
                grace_period_seconds=0,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=running.uid)
                ),
            )

        # 409: the uid precondition failed, a new pod of that name is not ours to delete.
        _until_accepted(delete, f"finish deleting {running.namespace}/{running.name}", (404, 409))

    def _patch_status(self, running: RunningPod, status: dict) -> None:
        _until_accepted(
            lambda: self.api.patch_namespaced_pod_status(
                running.name, running.namespace, {"status": status}
            ),
            f"patch {running.namespace}/{running.name}",
            (404,),
        )

    # --- the watch ---------------------------------------------------------------------------

    def handle(self, pod: client.V1Pod, event_type: str) -> None:
        uid = pod.metadata.uid
        if event_type == "DELETED":
            self.terminate(pod, finalize=False)
            self.handled.discard(uid)
            return
        if pod.metadata.deletion_timestamp is not None:
            self.terminate(pod)
            return
        phase = pod.status.phase if pod.status else None
        if uid in self.handled or phase in ("Succeeded", "Failed"):
            return
        self.handled.add(uid)
        if phase == "Running":
            # Running in the API but unknown here: this runner restarted and lost the process.
            self._report_failed_start(pod, "the pod runner restarted while this pod ran")
            return
        self.start(pod)

    def stop_all(self) -> None:
        with self.lock:
            running = list(self.pods.values())
        for pod in running:
            for container in pod.containers:
                _terminate(container.process, 5)

    def run(self) -> None:
        selector = f"spec.nodeName={self.node}"
        while True:
            try:
                pods = self.api.list_pod_for_all_namespaces(field_selector=selector)
                for pod in pods.items:
                    self.handle(pod, "ADDED")
                stream = watch.Watch().stream(
                    self.api.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=pods.metadata.resource_version,
                    timeout_seconds=300,
                )
                for event in stream:
                    self.handle(event["object"], event["type"])
            except ApiException as error:
                log.warning("watch ended (%s); listing again", error.reason)
                time.sleep(1)
            except Exception:
                log.exception("watch failed; listing again")
                time.sleep(1)


def _until_accepted(call: Callable[[], object], what: str, done_codes: tuple[int, ...]) -> None:
    """Make an API write, again and again while the apiserver cannot take it (down,
    restarting, overloaded), as a kubelet's status manager does: a pod whose end never reaches
    the API would leave its Job running for ever. `done_codes` end it as well as success does
    (the pod is gone); another refusal is logged and dropped."""
    while True:
        try:
            call()
            return
        except ApiException as error:
            if error.status in done_codes:
                return
            if error.status != 429 and error.status < 500:
                log.warning("cannot %s: %s", what, error.reason)
                return
            reason = f"{error.status} {error.reason}"
        except (urllib3.exceptions.HTTPError, OSError) as error:
            reason = str(error)
        log.warning("cannot %s yet (%s); trying again", what, reason)
        time.sleep(RETRY_SECONDS)


def _terminate(process: subprocess.Popen[bytes], grace: float) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api = client.CoreV1Api(config.new_client_from_config(args.kubeconfig))
    runner = PodRunner(api, args.node, args.workdir)

    def shut_down(*_: object) -> None:
        # Trial processes run in sessions of their own; they must not outlive their kubelet.
        runner.stop_all()
        os._exit(0)

    signal.signal(signal.SIGTERM, shut_down)
    runner.run()


if __name__ == "__main__":
    main()

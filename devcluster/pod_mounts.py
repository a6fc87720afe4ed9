"""What a local container sees of the file system: bind mounts into a private mount namespace
of its own, as a container runtime makes them (its termination message file, PersistentVolume
Claims from their hostPath volumes, and an /etc/hosts for a pod with a subdomain)."""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devcluster.pod_env import expand

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"


@dataclass(frozen=True)
class Bind:
    """A bind mount into a container's private mount namespace."""

    source: Path
    target: Path
    read_only: bool = False


def in_mount_namespace(argv: list[str], binds: list[Bind], cwd: Path) -> list[str]:
    """argv run in a private mount namespace of its own with `binds` mounted, as a container
    runtime would. The shell execs argv, so the process keeps its pid and process group."""
    # By absolute path: the process's PATH is its pod's, which may not lead to them.
    unshare, sh, mount = (_tool(name) for name in ("unshare", "sh", "mount"))
    steps = [
        f"{mount} -o {'bind,ro' if b.read_only else 'bind'} "
        f"{shlex.quote(str(b.source))} {shlex.quote(str(b.target))}"
        for b in binds
    ]
    # The working directory may be a mount point: enter it once the volume is mounted there.
    # The shell's cd sets PWD and OLDPWD, which a container runtime does not.
    enter = f"cd {shlex.quote(str(cwd))} && unset PWD OLDPWD"
    script = " && ".join([*steps, enter, 'exec "$@"'])
    return [unshare, "--mount", "--propagation", "private", sh, "-c", script, "sh", *argv]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not on the pod runner's PATH")
    return path


def termination_message_bind(container: client.V1Container, message_file: Path) -> Bind:
    """`message_file` at the container's terminationMessagePath, as a kubelet mounts the file
    it then reads the termination message from. The mount point, created on this machine if
    missing (as for volume mounts), stays empty: only the container's namespace sees the
    file."""
    target = Path(container.termination_message_path or DEFAULT_TERMINATION_MESSAGE_PATH)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch(exist_ok=True)
    return Bind(message_file, target)


def hosts_file(batch: client.BatchV1Api, pod: client.V1Pod, folder: Path) -> Path | None:
    """For a pod with a subdomain, an /etc/hosts that resolves its own DNS names and those of
    its Indexed Job's other pods (`<job>-<index>.<subdomain>`, how they rendezvous) to
    127.0.0.1, as kubelet and cluster DNS would make them resolve."""
    subdomain = pod.spec.subdomain
    if not subdomain:
        return None
    namespace = pod.metadata.namespace
    own = pod.spec.hostname or pod.metadata.name
    hostnames = {own}
    job_name = (pod.metadata.labels or {}).get(JOB_NAME_LABEL)
    if job_name:
        try:
            job = batch.read_namespaced_job(job_name, namespace)
        except ApiException as error:
            if error.status != 404:
                raise
        else:
            if job.spec.completion_mode == "Indexed":
                hostnames.update(f"{job_name}-{i}" for i in range(job.spec.completions or 0))
    lines = []
    for name in sorted(hostnames):
        fqdn = f"{name}.{subdomain}.{namespace}.svc.cluster.local"
        aliases = [f"{name}.{subdomain}", f"{name}.{subdomain}.{namespace}"]
        aliases += [f"{name}.{subdomain}.{namespace}.svc", fqdn]
        if name == own:
            aliases.append(name)
        lines.append(" ".join(["127.0.0.1", *aliases]))
    path = folder / "hosts"
    machine = Path("/etc/hosts").read_text()
    path.write_text(
        f"{machine.rstrip()}\n# the pod runner, for pod {own}\n" + "\n".join(lines) + "\n"
    )
    return path


def volume_binds(
    core: client.CoreV1Api, pod: client.V1Pod, container: client.V1Container, env: dict[str, str]
) -> list[Bind]:
    """The container's PersistentVolumeClaim mounts, each from its volume's hostPath. Other
    volumes are not mounted: an emptyDir stays this machine's directory of that path."""
    volumes = pod.spec.volumes or []
    claims = {v.name: v.persistent_volume_claim for v in volumes if v.persistent_volume_claim}
    binds = []
    for mount in container.volume_mounts or []:
        claim = claims.get(mount.name)
        if claim is None:
            continue
        volume = _claimed_path(core, pod.metadata.namespace, claim.claim_name)
        source = volume / (mount.sub_path or expand(mount.sub_path_expr or "", env))
        # A kubelet creates a missing subPath; the runtime creates the mount point.
        source.mkdir(parents=True, exist_ok=True)
        target = Path(mount.mount_path)
        target.mkdir(parents=True, exist_ok=True)
        binds.append(Bind(source, target, bool(mount.read_only or claim.read_only)))
    return binds


def _claimed_path(core: client.CoreV1Api, namespace: str, claim_name: str) -> Path:
    claim = core.read_namespaced_persistent_volume_claim(claim_name, namespace)
    if not claim.spec.volume_name:
        raise ValueError(f"PersistentVolumeClaim {claim_name!r} is not bound to a volume")
    volume = core.read_persistent_volume(claim.spec.volume_name)
    if volume.spec.host_path is None:
        raise ValueError(
            f"PersistentVolume {volume.metadata.name!r} is not a hostPath volume: the pod "
            "runner mounts only those"
        )
    return Path(volume.spec.host_path.path)

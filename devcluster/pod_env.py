"""A container's environment as its pod states it, resolved as a kubelet resolves it: envFrom,
then env (a later name wins), with `$(VAR)` expansion, the downward API's fieldRefs, and keys of
ConfigMaps and Secrets; and the process environment made of it. Pure: the pod runner reads the
ConfigMaps and Secrets first (`env_sources` names them), so what a local pod sees is tested
without a cluster."""

from __future__ import annotations

import re
from collections.abc import Mapping

from kubernetes import client

# The only variables of the pod runner's own environment that a container gets (unless its pod
# sets them): what a container runtime gives every container whatever its pod says. PATH stands
# for the image's: the runner's, the project's virtualenv first, so that `python` is the
# interpreter with the project installed. HOME, because a runtime always sets it (from the
# image's user), and the caches of Hugging Face, torch and pip live under it. Nothing else: a
# variable that a Job forgot must be missing here as it is in a real pod, not filled in from
# whoever started the dev cluster.
HOST_ENV = ("PATH", "HOME")
CONFIG_MAP = "configMap"
SECRET = "secret"
# (kind, name) of a ConfigMap or Secret: its data, decoded. One that does not exist is absent.
Sources = Mapping[tuple[str, str], Mapping[str, str]]


class MissingEnvSource(ValueError):
    """A ConfigMap, Secret or key that the env needs and that does not exist, as a kubelet's
    CreateContainerConfigError."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values; $$(VAR) escapes it."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0).startswith("$$"):
            return match.group(0)[1:]
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$?\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, text)


def field_value(pod: client.V1Pod, path: str) -> str:
    """A downward API fieldRef of the pod; every local pod has the node's loopback address."""
    fields = {
        "metadata.name": pod.metadata.name,
        "metadata.namespace": pod.metadata.namespace,
        "metadata.uid": pod.metadata.uid,
        "spec.nodeName": pod.spec.node_name,
        "spec.serviceAccountName": pod.spec.service_account_name or "default",
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        values = getattr(pod.metadata, match.group(1)) or {}
        return values.get(match.group(2), "")
    return fields.get(path) or ""


def env_sources(container: client.V1Container) -> set[tuple[str, str]]:
    """The ConfigMaps and Secrets that the container's envFrom and env read, as (kind, name)."""
    found = set()
    for source in container.env_from or []:
        if source.config_map_ref is not None:
            found.add((CONFIG_MAP, source.config_map_ref.name))
        elif source.secret_ref is not None:
            found.add((SECRET, source.secret_ref.name))
    for var in container.env or []:
        value_from = var.value_from
        if value_from is None:
            continue
        if value_from.config_map_key_ref is not None:
            found.add((CONFIG_MAP, value_from.config_map_key_ref.name))
        elif value_from.secret_key_ref is not None:
            found.add((SECRET, value_from.secret_key_ref.name))
    return found


def container_env(
    pod: client.V1Pod, container: client.V1Container, sources: Sources
) -> dict[str, str]:
    """The environment the pod states for `container`, and nothing else."""
    env: dict[str, str] = {}
    for source in container.env_from or []:
        ref = source.config_map_ref or source.secret_ref
        kind = CONFIG_MAP if source.config_map_ref is not None else SECRET
        data = sources.get((kind, ref.name))
        if data is None:
            if ref.optional:
                continue
            raise MissingEnvSource(f"{kind} {ref.name!r} not found")
        env.update({f"{source.prefix or ''}{k}": v for k, v in data.items()})
    for var in container.env or []:
        value_from = var.value_from
        if value_from is None:
            env[var.name] = expand(var.value or "", env)
        elif value_from.field_ref is not None:
            env[var.name] = field_value(pod, value_from.field_ref.field_path)
        elif value_from.config_map_key_ref is not None or value_from.secret_key_ref is not None:
            key_ref = value_from.config_map_key_ref or value_from.secret_key_ref
            kind = CONFIG_MAP if value_from.config_map_key_ref is not None else SECRET
            data = sources.get((kind, key_ref.name))
            if data is not None and key_ref.key in data:
                env[var.name] = data[key_ref.key]
            elif not key_ref.optional:
                raise MissingEnvSource(f"key {key_ref.key!r} not found in {kind} {key_ref.name!r}")
    return env


def process_env(pod_env: Mapping[str, str], host_env: Mapping[str, str]) -> dict[str, str]:
    """What a container's process runs with: the pod's env over HOST_ENV from `host_env`."""
    kept = {name: host_env[name] for name in HOST_ENV if name in host_env}
    return {**kept, **pod_env}

"""What a local pod's process sees of its environment (devcluster.pod_env): its pod's env,
resolved as a kubelet resolves it, and of the pod runner's own environment only PATH and
HOME."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from devcluster.pod_env import (
    MissingEnvSource,
    container_env,
    env_sources,
    expand,
    process_env,
)


def pod(
    env: list[dict[str, Any]] | None = None, env_from: list[dict] | None = None
) -> client.V1Pod:
    return client.V1Pod.model_validate(
        {
            "metadata": {
                "name": "sweep-0003-x7k2p",
                "namespace": "llm-training",
                "uid": "0b9d1c52",
                "labels": {"lorasweep.io/trial": "sweep-0003"},
                "annotations": {"lorasweep.io/parameters": '{"lora_rank": 16}'},
            },
            "spec": {
                "nodeName": "local-gpu-0",
                "containers": [{"name": "trainer", "env": env or [], "envFrom": env_from or []}],
            },
        }
    )


def resolve(p: client.V1Pod, sources: dict | None = None) -> dict[str, str]:
    return container_env(p, p.spec.containers[0], sources or {})


def test_values_expand_variables_defined_before_them():
    env = [
        {"name": "ROOT", "value": "/data"},
        {"name": "TRAIN", "value": "$(ROOT)/train.jsonl"},
        {"name": "LATER", "value": "$(UNDEFINED) and $$(ROOT)"},
    ]
    assert resolve(pod(env)) == {
        "ROOT": "/data",
        "TRAIN": "/data/train.jsonl",
        "LATER": "$(UNDEFINED) and $(ROOT)",
    }


def test_the_downward_api_gives_the_pods_own_fields():
    def field(path: str) -> dict:
        return {"fieldRef": {"fieldPath": path}}

    env = [
        {"name": "POD", "valueFrom": field("metadata.name")},
        {"name": "NAMESPACE", "valueFrom": field("metadata.namespace")},
        {"name": "UID", "valueFrom": field("metadata.uid")},
        {"name": "NODE", "valueFrom": field("spec.nodeName")},
        {"name": "SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")},
        {"name": "POD_IP", "valueFrom": field("status.podIP")},
        {"name": "TRIAL", "valueFrom": field("metadata.labels['lorasweep.io/trial']")},
        {"name": "PARAMS", "valueFrom": field("metadata.annotations['lorasweep.io/parameters']")},
        {"name": "MISSING", "valueFrom": field("metadata.annotations['not-there']")},
    ]
    assert resolve(pod(env)) == {
        "POD": "sweep-0003-x7k2p",
        "NAMESPACE": "llm-training",
        "UID": "0b9d1c52",
        "NODE": "local-gpu-0",
        "SERVICE_ACCOUNT": "default",
        "POD_IP": "127.0.0.1",
        "TRIAL": "sweep-0003",
        "PARAMS": '{"lora_rank": 16}',
        "MISSING": "",
    }


def test_env_from_config_maps_and_secrets_with_env_winning():
    sources = {
        ("configMap", "settings"): {"EPOCHS": "3", "SEED": "1"},
        ("secret", "tracking"): {"TOKEN": "s3cret"},
    }
    env_from = [
        {"configMapRef": {"name": "settings"}},
        {"secretRef": {"name": "tracking"}, "prefix": "MLFLOW_"},
    ]
    env = [
        {"name": "SEED", "value": "42"},
        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "tracking", "key": "TOKEN"}}},
        {"name": "N", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "EPOCHS"}}},
    ]
    p = pod(env, env_from)
    assert env_sources(p.spec.containers[0]) == {("configMap", "settings"), ("secret", "tracking")}
    assert resolve(p, sources) == {
        "EPOCHS": "3",
        "SEED": "42",
        "MLFLOW_TOKEN": "s3cret",
        "KEY": "s3cret",
        "N": "3",
    }


def test_a_missing_optional_source_is_skipped_and_a_required_one_fails():
    optional = pod(
        [
            {
                "name": "A",
                "valueFrom": {"configMapKeyRef": {"name": "x", "key": "a", "optional": True}},
            }
        ],
        [{"secretRef": {"name": "y", "optional": True}}],
    )
    assert resolve(optional) == {}

    required = pod([{"name": "A", "valueFrom": {"secretKeyRef": {"name": "y", "key": "a"}}}])
    with pytest.raises(MissingEnvSource, match="key 'a' not found in secret 'y'"):
        resolve(required, {("secret", "y"): {"b": "1"}})
    with pytest.raises(MissingEnvSource, match="configMap 'x' not found"):
        resolve(pod(env_from=[{"configMapRef": {"name": "x"}}]))


def test_a_process_gets_the_pods_env_and_only_path_and_home_of_the_host():
    host = {
        "PATH": "/repo/.venv/bin:/usr/bin:/bin",
        "HOME": "/root",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": "/repo",
        "KUBECONFIG": "/repo/.cluster/kubeconfig",
    }
    assert process_env({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, host) == {
        "PATH": "/repo/.venv/bin:/usr/bin:/bin",
        "HOME": "/root",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    }
    # The pod's own PATH wins, as over an image's.
    assert process_env({"PATH": "/opt/bin"}, host)["PATH"] == "/opt/bin"
    assert process_env({}, {"PATH": "/usr/bin"}) == {"PATH": "/usr/bin"}


def test_command_expansion_uses_the_resolved_env():
    env = resolve(pod([{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]))
    assert expand("--run-name=$(POD)", env) == "--run-name=sweep-0003-x7k2p"

"""Helpers for e2e tests that drive HyperparameterSweeps through the real apiserver."""

from __future__ import annotations

from kubernetes import client

from sweep_operator.api import GROUP, PLURAL, VERSION
from sweep_operator.trials import LABEL_SWEEP
from tests.support import wait_for


def sweep_manifest(name: str, spec: dict) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "HyperparameterSweep",
        "metadata": {"name": name},
        "spec": spec,
    }


def get_sweep(custom, namespace: str, name: str) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def wait_for_phase(
    custom, namespace: str, name: str, phases: tuple[str, ...], timeout: float
) -> dict:
    def check():
        sweep = get_sweep(custom, namespace, name)
        return sweep if sweep.get("status", {}).get("phase") in phases else None

    try:
        return wait_for(check, timeout, f"sweep {name} to reach {phases}")
    except AssertionError as error:
        status = get_sweep(custom, namespace, name).get("status")
        raise AssertionError(f"{error}; status: {status}") from None


def replanned_with_room(custom, namespace: str, name: str, parallelism: int) -> dict:
    """Raise the sweep's parallelism and wait until the operator has planned the new spec
    (status.observedGeneration): a reconcile that had slots for more trials has run since."""
    patch = {"spec": {"parallelism": parallelism}}
    sweep = custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)
    generation = sweep["metadata"]["generation"]

    def planned() -> dict | None:
        sweep = get_sweep(custom, namespace, name)
        return sweep if sweep["status"].get("observedGeneration") == generation else None

    return wait_for(planned, 30, f"the operator to plan generation {generation} of {name}")


def sweep_events(kube_client, namespace: str, sweep: str, reason: str) -> list[client.CoreV1Event]:
    """The sweep's Events with this reason, once there is one (up to 30 s):
    kopf posts an Event after the reconcile that made it, so it can come after the status
    that the same reconcile wrote."""

    def listed() -> list[client.CoreV1Event]:
        return (
            client.CoreV1Api(kube_client)
            .list_namespaced_event(
                namespace, field_selector=f"involvedObject.name={sweep},reason={reason}"
            )
            .items
        )

    return wait_for(listed, 30, f"a {reason} Event of {sweep}")


def trial_jobs(batch, namespace: str, sweep: str) -> list[client.V1Job]:
    return batch.list_namespaced_job(namespace, label_selector=f"{LABEL_SWEEP}={sweep}").items


def sim_spec(trials: int, parallelism: int, annotations: dict, **extra) -> dict:
    return {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "algorithm": {"name": "grid"},
        "parameters": {"lora_rank": {"values": list(range(1, trials + 1))}},
        "parallelism": parallelism,
        "trainer": {
            "image": "lorasweep-e2e",
            "command": ["train"],
            "nodeSelector": {"lorasweep.io/node-mode": "sim"},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "podAnnotations": annotations,
        },
        **extra,
    }

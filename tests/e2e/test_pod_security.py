"""Trial pods under the apiserver's Pod Security admission, and the operator's own refusal of
pods with access to their node."""

from __future__ import annotations

import json
import sys

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sweep_operator.api import GROUP, PLURAL, VERSION
from tests.e2e.sweeps import sweep_manifest, trial_jobs, wait_for_phase
from tests.support import wait_for

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
# A trial that reports eval_loss = 1 / lora_rank, as the README's smallest program does.
PROGRAM = """
import json, os
rank = json.loads(os.environ["LORASWEEP_PARAMS"])["lora_rank"]
with open(os.environ["LORASWEEP_RESULT_PATH"], "w") as out:
    json.dump({"metrics": {"eval_loss": 1 / rank}}, out)
"""


def local_spec(**trainer) -> dict:
    return {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "algorithm": {"name": "grid"},
        "parameters": {"lora_rank": {"values": [4, 8]}},
        "parallelism": 2,
        "trainer": {
            "image": "lorasweep-e2e",
            "command": [sys.executable, "-c", PROGRAM],
            "nodeSelector": {"lorasweep.io/node-mode": "local"},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            **trainer,
        },
    }


def unrestricted_pod() -> dict:
    """A pod that sets none of what the restricted level requires (non-root, no privilege
    escalation, no capabilities, a seccomp profile)."""
    return {
        "metadata": {"name": "unrestricted"},
        "spec": {
            "nodeSelector": {"lorasweep.io/node-mode": "local"},
            "containers": [{"name": "main", "image": "x"}],
        },
    }


def test_trials_run_in_a_namespace_that_enforces_the_restricted_level(
    operator, kube_client, custom, batch, namespace
):
    core = client.CoreV1Api(kube_client)
    core.patch_namespace(namespace, {"metadata": {"labels": RESTRICTED}})

    def refused() -> ApiException | None:
        try:
            core.create_namespaced_pod(namespace, unrestricted_pod(), dry_run="All")
        except ApiException as error:
            return error
        return None

    # The apiserver's PodSecurity admission is on and enforces the level here (once its cache
    # of the namespace has the new labels: a dry run goes through admission and creates none).
    error = wait_for(refused, 30, "the restricted level to be enforced")
    assert error.status == 403
    assert 'violates PodSecurity "restricted:latest"' in json.loads(error.body)["message"]

    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("restricted", local_spec())
    )
    status = wait_for_phase(custom, namespace, "restricted", ("Succeeded", "Failed"), 120)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["succeeded"] == 2
    assert status["bestTrial"]["parameters"] == {"lora_rank": 8}
    pods = core.list_namespaced_pod(namespace, label_selector="lorasweep.io/sweep=restricted")
    assert {p.status.phase for p in pods.items} == {"Succeeded"}


JOB_TEMPLATE = """\
apiVersion: batch/v1
kind: Job
spec:
  template:
    spec:
      restartPolicy: Never
      nodeSelector: {{{{ pod.nodeSelector | yaml }}}}
      {pod}
      containers:
        - name: trainer
          image: {{{{ container.image | yaml }}}}
          command: {{{{ container.command | yaml }}}}
          env: {{{{ container.env | yaml }}}}
          resources: {{{{ container.resources | yaml }}}}
          {container}
"""


@pytest.mark.parametrize(
    ("pod", "container", "field"),
    [
        ("hostNetwork: true", "", "spec.template.spec.hostNetwork is true"),
        (
            "volumes: [{name: node, hostPath: {path: /}}]",
            "volumeMounts: [{name: node, mountPath: /node}]",
            "spec.template.spec.volumes[0].hostPath is set (volume 'node')",
        ),
        (
            "hostPID: false",
            "securityContext: {privileged: true}",
            "spec.template.spec.containers[0].securityContext.privileged is true",
        ),
    ],
)
def test_a_job_template_asking_for_host_access_fails_the_sweep_before_any_job(
    operator, custom, batch, namespace, pod, container, field
):
    """Even where the namespace would let such a pod in (this one enforces no level), the
    operator makes none."""
    template = JOB_TEMPLATE.format(pod=pod, container=container)
    manifest = sweep_manifest("host", local_spec(jobTemplate=template))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    status = wait_for_phase(custom, namespace, "host", ("Failed",), 60)["status"]
    assert status["message"] == (
        f"spec.trainer.jobTemplate: the trial Job's {field}: the operator creates no trial pod "
        "with access to its node (privileged containers, hostPath volumes, hostNetwork, "
        "hostPID, hostIPC, hostPort)"
    )
    assert trial_jobs(batch, namespace, "host") == []

"""The operator's floor under trial pods: no access to the node, whoever asks."""

from __future__ import annotations

import pytest

from sweep_operator.host_access import host_access
from sweep_operator.render import RenderError, SweepRef, render_trial_job
from sweep_operator.semantic import check_spec
from sweep_operator.trials import NewTrial
from tests.unit.sweep_helpers import make_spec, raw_spec

SWEEP = SweepRef(name="rank-lr", namespace="team-a", uid="1234-uid")
TRIAL = NewTrial(index=0, name="rank-lr-0000", parameters={"lora_rank": 8})
REFUSED = (
    "the operator creates no trial pod with access to its node (privileged containers, "
    "hostPath volumes, hostNetwork, hostPID, hostIPC, hostPort)"
)


def test_a_restricted_pod_asks_for_nothing():
    pod = {
        "hostNetwork": False,
        "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "d", "persistentVolumeClaim": {}}],
        "containers": [
            {
                "name": "trainer",
                "securityContext": {"privileged": False, "allowPrivilegeEscalation": False},
                "ports": [{"containerPort": 29500}],
            }
        ],
    }
    assert host_access(pod, "spec") == []


def test_every_kind_of_host_access_is_found_with_its_field():
    pod = {
        "hostNetwork": True,
        "hostPID": True,
        "hostIPC": True,
        "volumes": [{"name": "ok", "emptyDir": {}}, {"name": "root", "hostPath": {"path": "/"}}],
        "initContainers": [{"name": "setup", "securityContext": {"privileged": True}}],
        "containers": [
            {
                "name": "trainer",
                "ports": [{"containerPort": 80}, {"containerPort": 8080, "hostPort": 80}],
            }
        ],
        "ephemeralContainers": [{"name": "debug", "securityContext": {"privileged": True}}],
    }
    assert host_access(pod, "spec.template.spec") == [
        ("spec.template.spec.hostNetwork", "is true"),
        ("spec.template.spec.hostPID", "is true"),
        ("spec.template.spec.hostIPC", "is true"),
        ("spec.template.spec.volumes[1].hostPath", "is set (volume 'root')"),
        ("spec.template.spec.initContainers[0].securityContext.privileged", "is true"),
        ("spec.template.spec.containers[0].ports[1].hostPort", "is 80"),
        ("spec.template.spec.ephemeralContainers[0].securityContext.privileged", "is true"),
    ]


def test_malformed_entries_are_left_to_the_apiserver():
    pod = {"volumes": "none", "containers": ["trainer", {"securityContext": "privileged"}]}
    assert host_access(pod, "spec") == []


def template_asking_for(pod_field: str, container_field: str = "") -> str:
    """A minimal trial Job template with these fields in its pod and its container."""
    return (
        "apiVersion: batch/v1\n"
        "kind: Job\n"
        "spec:\n"
        "  template:\n"
        "    spec:\n"
        "      restartPolicy: Never\n"
        f"      {pod_field}\n"
        "      containers:\n"
        "        - name: trainer\n"
        "          image: {{ container.image | yaml }}\n"
        f"          {container_field}\n"
    )


@pytest.mark.parametrize(
    ("pod_field", "container_field", "found"),
    [
        ("hostNetwork: true", "", "spec.template.spec.hostNetwork is true"),
        (
            "hostPID: false",
            "securityContext: {privileged: true}",
            "spec.template.spec.containers[0].securityContext.privileged is true",
        ),
        (
            "volumes: [{name: node, hostPath: {path: /var/run}}]",
            "",
            "spec.template.spec.volumes[0].hostPath is set (volume 'node')",
        ),
    ],
)
def test_a_job_template_asking_for_host_access_is_refused_naming_the_field(
    pod_field, container_field, found
):
    raw = raw_spec()
    raw["trainer"]["jobTemplate"] = template_asking_for(pod_field, container_field)
    spec = make_spec(**raw)
    with pytest.raises(RenderError) as caught:
        render_trial_job(SWEEP, spec, TRIAL)
    assert str(caught.value) == f"spec.trainer.jobTemplate: the trial Job's {found}: {REFUSED}"
    # The sweep's check: Failed before any Job exists, with the same message.
    [problem] = check_spec(spec, SWEEP)
    assert str(problem) == str(caught.value)


def test_an_operator_wide_template_gets_no_exception():
    with pytest.raises(RenderError) as caught:
        render_trial_job(SWEEP, make_spec(), TRIAL, template=template_asking_for("hostIPC: true"))
    assert str(caught.value) == (
        f"template: the trial Job's spec.template.spec.hostIPC is true: {REFUSED}"
    )


def test_a_hostpath_volume_of_the_sweep_is_refused_at_its_own_field():
    raw = raw_spec()
    raw["trainer"]["volumes"] = [
        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
        {"name": "node", "hostPath": {"path": "/"}},
    ]
    [problem] = check_spec(make_spec(**raw), SWEEP)
    assert str(problem) == f"spec.trainer.volumes[1].hostPath: is set (volume 'node'): {REFUSED}"

"""Sweeps through the dev cluster's real Kueue: trials queued for quota, admitted, preempted
for a higher priority, and kept waiting while the quota is gone; measured from the pods."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime

import pytest
from kubernetes import client

import devcluster
from devcluster.operator_process import OperatorProcess, release_sweeps
from sweep_operator.api import GROUP, PLURAL, VERSION
from sweep_operator.trials import LABEL_SWEEP, LABEL_TRIAL
from tests.e2e.sweeps import get_sweep, sim_spec, sweep_manifest, wait_for_phase
from tests.support import wait_for

KUEUE = ("kueue.x-k8s.io", "v1beta2")
QUEUE = "trials"
RESULT = '{"metrics": {"eval_loss": 0.5}}'
SIM_GPUS = sum(devcluster.SIM_NODES.values())


def create_local_queue(custom, namespace: str, cluster_queue: str) -> None:
    custom.create_namespaced_custom_object(
        *KUEUE,
        namespace,
        "localqueues",
        {
            "apiVersion": "/".join(KUEUE),
            "kind": "LocalQueue",
            "metadata": {"name": QUEUE},
            "spec": {"clusterQueue": cluster_queue},
        },
    )


@pytest.fixture
def queued_namespace(namespace, custom) -> str:
    """The test's namespace with the LocalQueue `trials` of the cluster's ClusterQueue."""
    create_local_queue(custom, namespace, devcluster.KUEUE_CLUSTER_QUEUE)
    return namespace


@pytest.fixture
def second_namespace(
    kube_client, custom, sweep_crd, tmp_path
) -> Iterator[tuple[str, OperatorProcess]]:
    """Another team's namespace, LocalQueue and operator, on the same ClusterQueue."""
    core = client.CoreV1Api(kube_client)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"lorasweep.io/test": "true"}}})
    wait_for(lambda: devcluster.has_default_service_account(core, name), 30, "ServiceAccount")
    create_local_queue(custom, name, devcluster.KUEUE_CLUSTER_QUEUE)
    process = OperatorProcess(name, tmp_path / "operator-2.log")
    process.start()
    yield name, process
    process.stop()
    release_sweeps(kube_client, name)
    core.delete_namespace(name)


def queued_sweep(trials: int, parallelism: int, duration: str, **trainer) -> dict:
    annotations = {"lorasweep.io/sim-duration": duration, "lorasweep.io/sim-result": RESULT}
    spec = sim_spec(trials, parallelism, annotations)
    spec["trainer"].update(queueName=QUEUE, **trainer)
    return spec


def create_sweep(custom, namespace: str, name: str, spec: dict) -> None:
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest(name, spec)
    )


def trial_pods(core, namespace: str, sweep: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=f"{LABEL_SWEEP}={sweep}").items


def _time(value: datetime | None) -> float:
    assert value is not None
    return value.timestamp()


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals [start, end) open at one moment. Times have a resolution of a second,
    so an end and a start in the same second count as one after the other."""
    events = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def finished_at(pod: client.V1Pod) -> float:
    [status] = pod.status.container_statuses
    return _time(status.state.terminated.finished_at)


def test_two_sweeps_share_eight_gpus_through_one_cluster_queue(
    operator, queued_namespace, second_namespace, custom, kube_client
):
    core = client.CoreV1Api(kube_client)
    other, _ = second_namespace
    # Each sweep alone would take all 8 GPUs: 16 trials in flight ask for twice the quota.
    sweeps = {(queued_namespace, "team-a"), (other, "team-b")}
    # 6 s trials: more than 4 at once needs pods that start within a few seconds of each other
    # (times have a resolution of a second), however slowly a loaded machine starts them.
    for namespace, name in sweeps:
        create_sweep(custom, namespace, name, queued_sweep(10, 8, "6s"))
    for namespace, name in sweeps:
        sweep = wait_for_phase(custom, namespace, name, ("Succeeded", "Failed"), 150)
        assert sweep["status"]["phase"] == "Succeeded", sweep["status"]
        assert sweep["status"]["trials"]["succeeded"] == 10

    pods = [p for namespace, name in sweeps for p in trial_pods(core, namespace, name)]
    # Every trial ran exactly once: one pod per trial, and it succeeded.
    per_trial = Counter(p.metadata.labels[LABEL_TRIAL] for p in pods)
    assert len(per_trial) == 20 and set(per_trial.values()) == {1}, per_trial
    assert {p.status.phase for p in pods} == {"Succeeded"}
    holding = [(_time(p.status.start_time), finished_at(p)) for p in pods]
    existing = [(_time(p.metadata.creation_timestamp), finished_at(p)) for p in pods]
    print(f"peak GPUs in use {peak_overlap(holding)}, peak pods {peak_overlap(existing)}")
    assert peak_overlap(holding) <= SIM_GPUS
    # Kueue meters the Jobs before any pod exists (the scheduler alone would have let 16 pods
    # wait for the 8 GPUs), and both sweeps used the quota at once.
    assert peak_overlap(existing) <= SIM_GPUS
    assert peak_overlap(holding) > 4


@pytest.fixture
def priorities(custom) -> Iterator[tuple[str, str]]:
    """WorkloadPriorityClasses (low, high), named for this test."""
    names = (f"low-{uuid.uuid4().hex[:6]}", f"high-{uuid.uuid4().hex[:6]}")
    for name, value in zip(names, (10, 1000), strict=True):
        custom.create_cluster_custom_object(
            *KUEUE,
            "workloadpriorityclasses",
            {
                "apiVersion": "/".join(KUEUE),
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": name},
                "value": value,
            },
        )
    yield names
    for name in names:
        custom.delete_cluster_custom_object(*KUEUE, "workloadpriorityclasses", name)


def test_a_high_priority_sweep_preempts_trials_that_later_finish_once(
    operator, queued_namespace, second_namespace, priorities, custom, kube_client, batch
):
    core = client.CoreV1Api(kube_client)
    other, _ = second_namespace
    low, high = priorities
    # Long enough that none ends before the high sweep's trials are admitted and Kueue has
    # preempted for them, one scheduling cycle each, on a loaded machine: a low trial that
    # ended first would give its GPU up without a preemption.
    spec = queued_sweep(8, 8, "40s", workloadPriorityClass=low)
    create_sweep(custom, queued_namespace, "low", spec)

    def all_running():
        return (
            get_sweep(custom, queued_namespace, "low")
            .get("status", {})
            .get("trials", {})
            .get("running")
            == SIM_GPUS
        )

    wait_for(all_running, 60, "the low-priority sweep to take every GPU")
    create_sweep(custom, other, "high", queued_sweep(4, 4, "2s", workloadPriorityClass=high))

    def preempted():
        status = get_sweep(custom, queued_namespace, "low")["status"]
        return status if status["trials"]["queued"] > 0 else None

    waiting = wait_for(preempted, 60, "Kueue to preempt low-priority trials")
    assert waiting["phase"] == "Running" and waiting["trials"]["failed"] == 0

    high_sweep = wait_for_phase(custom, other, "high", ("Succeeded", "Failed"), 90)
    assert high_sweep["status"]["phase"] == "Succeeded", high_sweep["status"]
    low_sweep = wait_for_phase(custom, queued_namespace, "low", ("Succeeded", "Failed"), 240)
    trials = low_sweep["status"]["trials"]
    assert low_sweep["status"]["phase"] == "Succeeded", low_sweep["status"]
    assert (trials["total"], trials["succeeded"]) == (8, 8)
    assert (trials["failed"], trials["pruned"], trials["queued"]) == (0, 0, 0)

    # Kueue counts each Workload's evictions; the preempted trials ran again from the queue
    # and each is still one trial, succeeded once.
    workloads = custom.list_namespaced_custom_object(*KUEUE, queued_namespace, "workloads")
    preempted = {
        w["metadata"]["ownerReferences"][0]["name"]: eviction["count"]
        for w in workloads["items"]
        for eviction in (w["status"].get("schedulingStats") or {}).get("evictions", [])
        if eviction["reason"] == "Preempted"
    }
    print(f"low-priority trials preempted, then re-admitted: {preempted}")
    assert len(preempted) >= 4
    jobs = batch.list_namespaced_job(queued_namespace, label_selector=f"{LABEL_SWEEP}=low")
    assert len(jobs.items) == 8 and all(job.status.succeeded == 1 for job in jobs.items)
    events = core.list_namespaced_event(queued_namespace).items
    assert any(e.reason == "TrialRequeued" for e in events)


@pytest.fixture
def own_cluster_queue(namespace, custom) -> Iterator[str]:
    """A ClusterQueue of 8 GPUs for this test alone, whose quota it may take away."""
    name = namespace
    custom.create_cluster_custom_object(
        *KUEUE,
        "clusterqueues",
        devcluster.cluster_queue_manifest(name, {"nvidia.com/gpu": SIM_GPUS}),
    )
    create_local_queue(custom, namespace, name)
    yield name
    custom.delete_cluster_custom_object(*KUEUE, "clusterqueues", name)


def set_gpu_quota(custom, cluster_queue: str, gpus: int) -> None:
    queue = custom.get_cluster_custom_object(*KUEUE, "clusterqueues", cluster_queue)
    group = queue["spec"]["resourceGroups"][0]
    group["flavors"][0]["resources"][0]["nominalQuota"] = gpus
    custom.patch_cluster_custom_object(
        *KUEUE, "clusterqueues", cluster_queue, {"spec": {"resourceGroups": [group]}}
    )


def test_without_quota_trials_wait_queued_and_the_sweep_finishes_when_it_returns(
    operator, namespace, own_cluster_queue, custom, kube_client
):
    core = client.CoreV1Api(kube_client)
    create_sweep(custom, namespace, "patient", queued_sweep(6, 2, "2s"))

    def some_succeeded():
        status = get_sweep(custom, namespace, "patient").get("status", {})
        return status.get("trials", {}).get("succeeded", 0) >= 1

    wait_for(some_succeeded, 60, "a first trial to succeed")
    set_gpu_quota(custom, own_cluster_queue, 0)
    # Kueue refusing a trial is what shows the quota is gone (trials created just before may
    # still have been admitted).
    events = wait_for(
        lambda: [
            e for e in core.list_namespaced_event(namespace).items if e.reason == "WaitingForQuota"
        ],
        60,
        "the WaitingForQuota Event",
    )
    assert f"ClusterQueue {own_cluster_queue} (LocalQueue {QUEUE})" in events[0].message

    def only_queued():
        status = get_sweep(custom, namespace, "patient")["status"]
        trials = status["trials"]
        idle = trials["running"] == 0 and trials["pending"] == 0 and trials["queued"] > 0
        return status if idle else None

    waiting = wait_for(only_queued, 60, "the sweep to wait with queued trials only")
    assert waiting["phase"] == "Running" and waiting["trials"]["failed"] == 0
    assert f"{waiting['trials']['queued']} queued" in waiting["message"]
    # Nothing runs while the quota is gone: longer than a trial takes, nothing changes.
    time.sleep(5)
    still = get_sweep(custom, namespace, "patient")["status"]
    assert still["trials"] == waiting["trials"] and still["phase"] == "Running"

    set_gpu_quota(custom, own_cluster_queue, SIM_GPUS)
    done = wait_for_phase(custom, namespace, "patient", ("Succeeded", "Failed"), 90)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    trials = done["status"]["trials"]
    assert (trials["succeeded"], trials["failed"], trials["pruned"]) == (6, 0, 0)


def test_trials_the_operator_stops_stay_stopped_and_free_their_quota(
    operator, queued_namespace, custom, kube_client, batch
):
    core = client.CoreV1Api(kube_client)
    spec = queued_sweep(6, 3, "60s")
    spec["timeBudget"] = "6s"
    create_sweep(custom, queued_namespace, "budget", spec)
    sweep = wait_for_phase(custom, queued_namespace, "budget", ("Succeeded", "Failed"), 60)
    assert "timeBudget 6s exhausted" in sweep["status"]["message"]
    assert sweep["status"]["trials"]["pruned"] == 3

    def released():
        workloads = custom.list_namespaced_custom_object(*KUEUE, queued_namespace, "workloads")
        return all(w["spec"].get("active") is False for w in workloads["items"]) and (
            len(workloads["items"]) == 3
        )

    def stopped() -> bool:
        jobs = batch.list_namespaced_job(queued_namespace, label_selector=f"{LABEL_SWEEP}=budget")
        pods = trial_pods(core, queued_namespace, "budget")
        return all(job.spec.suspend for job in jobs.items) and not any(
            p.status.phase == "Running" for p in pods
        )

    # Kueue frees the stopped trials' quota and suspends their Jobs (the operator deactivated
    # their Workloads itself, so that comes after); it never admits them again, so nothing of
    # theirs runs afterwards.
    wait_for(released, 30, "the stopped trials' Workloads to be deactivated")
    wait_for(stopped, 30, "Kueue to suspend the stopped trials' Jobs and end their pods")
    time.sleep(3)
    assert stopped()
    assert get_sweep(custom, queued_namespace, "budget")["status"]["trials"]["pruned"] == 3

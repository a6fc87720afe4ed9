"""The test cluster does what the rest of the suite relies on: a real scheduler placing GPU pods,
kwok simulating the `sim` nodes, the pod runner executing `local-gpu-0`'s pods, and MLflow."""

from __future__ import annotations

import json
import sys
import time
import uuid

import pytest
from kubernetes import client

from tests.cluster import devcluster
from tests.support import process_alive, wait_for


def one_gpu_job(
    name: str,
    mode: str,
    *,
    annotations: dict | None = None,
    command: list[str] | None = None,
    env: list[dict] | None = None,
    termination_policy: str = "File",
) -> dict:
    container: dict = {
        "name": "main",
        "image": "lorasweep-test",
        "resources": {"limits": {"nvidia.com/gpu": 1}},
        "terminationMessagePolicy": termination_policy,
    }
    if command:
        container["command"] = command
    if env:
        container["env"] = env
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 3,
                    "nodeSelector": {"lorasweep.io/node-mode": mode},
                    "containers": [container],
                },
            },
        },
    }


def job_pod(core: client.CoreV1Api, namespace: str, job: str) -> client.V1Pod | None:
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    return pods[0] if pods else None


def finished_pod(core: client.CoreV1Api, namespace: str, job: str, timeout: float = 60):
    def check():
        pod = job_pod(core, namespace, job)
        return pod if pod and pod.status.phase in ("Succeeded", "Failed") else None

    return wait_for(check, timeout, f"pod of job {job} to finish")


def job_condition(batch: client.BatchV1Api, namespace: str, job: str, timeout: float = 60):
    def check():
        conditions = batch.read_namespaced_job_status(job, namespace).status.conditions or []
        done = [
            c.type for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"
        ]
        return done[0] if done else None

    return wait_for(check, timeout, f"job {job} to complete or fail")


@pytest.fixture
def core(kube_client) -> client.CoreV1Api:
    return client.CoreV1Api(kube_client)


@pytest.fixture
def batch(kube_client) -> client.BatchV1Api:
    return client.BatchV1Api(kube_client)


def test_nodes_are_ready_with_gpu_capacity(core):
    nodes = {n.metadata.name: n for n in core.list_node().items}
    assert set(nodes) >= {"sim-gpu-0", "sim-gpu-1", "local-gpu-0"}
    expected = {"sim-gpu-0": ("4", "sim"), "sim-gpu-1": ("4", "sim"), "local-gpu-0": ("2", "local")}
    for name, (gpus, mode) in expected.items():
        node = nodes[name]
        ready = {c.type: c.status for c in node.status.conditions}["Ready"]
        assert ready == "True"
        assert node.status.allocatable["nvidia.com/gpu"] == gpus
        assert node.status.capacity["cpu"] and node.status.capacity["memory"]
        assert node.metadata.labels["lorasweep.io/node-mode"] == mode
        assert node.metadata.labels["nvidia.com/gpu.product"]
        assert not node.spec.taints


def test_cluster_up_again_reuses_the_running_cluster(cluster):
    again = devcluster.up()
    assert again.api_url == cluster.api_url
    assert again.pids == cluster.pids


def test_sim_job_completes_with_its_termination_message(batch, core, namespace):
    result = json.dumps({"metrics": {"eval_loss": 0.42}})
    batch.create_namespaced_job(
        namespace,
        one_gpu_job(
            "sim-ok",
            "sim",
            annotations={"lorasweep.io/sim-duration": "500ms", "lorasweep.io/sim-result": result},
        ),
    )
    assert job_condition(batch, namespace, "sim-ok") == "Complete"
    pod = finished_pod(core, namespace, "sim-ok")
    assert pod.spec.node_name.startswith("sim-gpu-")
    assert pod.status.container_statuses[0].state.terminated.message == result


def test_sim_job_fails_when_annotated_to(batch, core, namespace):
    batch.create_namespaced_job(
        namespace,
        one_gpu_job(
            "sim-fail",
            "sim",
            annotations={"lorasweep.io/sim-duration": "200ms", "lorasweep.io/sim-exit-code": "3"},
        ),
    )
    assert job_condition(batch, namespace, "sim-fail") == "Failed"
    pod = finished_pod(core, namespace, "sim-fail")
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 3


def test_gpu_exhaustion_keeps_surplus_pods_pending_until_gpus_free(batch, core, namespace):
    """8 simulated GPUs, 10 one-GPU Jobs: 2 wait Pending, then run once others finish."""
    for i in range(10):
        batch.create_namespaced_job(
            namespace,
            one_gpu_job(f"fill-{i}", "sim", annotations={"lorasweep.io/sim-duration": "6s"}),
        )

    def saturated():
        pods = core.list_namespaced_pod(namespace).items
        bound = [p for p in pods if p.spec.node_name]
        unbound = [p for p in pods if not p.spec.node_name and p.status.phase == "Pending"]
        return (bound, unbound) if len(pods) == 10 and len(bound) == 8 else None

    bound, unbound = wait_for(saturated, 30, "8 pods bound and 2 pending")
    assert len(unbound) == 2
    per_node: dict[str, int] = {}
    for pod in bound:
        per_node[pod.spec.node_name] = per_node.get(pod.spec.node_name, 0) + 1
    assert per_node == {"sim-gpu-0": 4, "sim-gpu-1": 4}
    waiting = {p.metadata.name for p in unbound}
    reason = unbound[0].status.conditions[0]
    assert reason.reason == "Unschedulable" and "nvidia.com/gpu" in reason.message
    for i in range(10):
        assert job_condition(batch, namespace, f"fill-{i}", timeout=60) == "Complete"
    for pod in core.list_namespaced_pod(namespace).items:
        if pod.metadata.name in waiting:
            assert pod.status.phase == "Succeeded" and pod.spec.node_name


PROGRAM = """
import json, os, sys
open(os.environ["LORASWEEP_RESULT_PATH"], "w").write(json.dumps(
    {"metrics": {"x": float(os.environ["X"])}, "from_configmap": os.environ["FROM_CM"],
     "from_secret": os.environ["FROM_SECRET"], "pod": os.environ["POD_NAME"]}))
print("done")
sys.exit(int(os.environ["EXIT_CODE"]))
"""


@pytest.mark.parametrize("exit_code", [0, 3])
def test_local_job_runs_a_real_process(batch, core, namespace, exit_code):
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "cm"}, "data": {"value": "from-cm"}}
    )
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "secret"}, "stringData": {"value": "from-secret"}}
    )
    env = [
        {"name": "X", "value": "1.5"},
        {"name": "EXIT_CODE", "value": str(exit_code)},
        {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "value"}}},
        {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "secret", "key": "value"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    batch.create_namespaced_job(
        namespace, one_gpu_job("local", "local", command=["python", "-c", PROGRAM], env=env)
    )
    expected = "Complete" if exit_code == 0 else "Failed"
    assert job_condition(batch, namespace, "local") == expected
    pod = finished_pod(core, namespace, "local")
    assert pod.spec.node_name == "local-gpu-0"
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == exit_code
    assert json.loads(terminated.message) == {
        "metrics": {"x": 1.5},
        "from_configmap": "from-cm",
        "from_secret": "from-secret",
        "pod": pod.metadata.name,
    }
    log = devcluster.pod_log_path(namespace, pod.metadata.name).read_text()
    assert "done" in log


def test_local_job_falls_back_to_the_log_tail(batch, core, namespace):
    program = "import sys; print('step 1'); print('CUDA out of memory'); sys.exit(1)"
    batch.create_namespaced_job(
        namespace,
        one_gpu_job(
            "oom",
            "local",
            command=["python", "-c", program],
            termination_policy="FallbackToLogsOnError",
        ),
    )
    pod = finished_pod(core, namespace, "oom")
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 1
    assert terminated.message.splitlines()[-1] == "CUDA out of memory"


def test_deleting_a_local_job_terminates_its_process(batch, core, namespace, tmp_path):
    pid_file = tmp_path / "pid"
    program = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    )
    batch.create_namespaced_job(
        namespace, one_gpu_job("sleeper", "local", command=[sys.executable, "-c", program])
    )
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30, "the process"))
    assert process_alive(pid)
    batch.delete_namespaced_job("sleeper", namespace, propagation_policy="Background")
    wait_for(lambda: not process_alive(pid), 30, f"process {pid} to end")
    wait_for(lambda: job_pod(core, namespace, "sleeper") is None, 30, "the pod to be gone")


def test_mlflow_logs_a_run_and_reads_it_back(mlflow_uri):
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    experiment = mlflow.create_experiment(f"harness-{uuid.uuid4().hex[:8]}")
    run = mlflow.create_run(experiment, tags={"lorasweep.trial": "t-0001"})
    mlflow.log_param(run.info.run_id, "lora_rank", 8)
    for step, loss in enumerate([1.0, 0.5, 0.25]):
        mlflow.log_metric(
            run.info.run_id, "eval_loss", loss, step=step, timestamp=int(time.time() * 1000)
        )
    mlflow.set_terminated(run.info.run_id)
    found = mlflow.search_runs([experiment], filter_string="tags.`lorasweep.trial` = 't-0001'")
    assert [r.info.run_id for r in found] == [run.info.run_id]
    assert found[0].data.params == {"lora_rank": "8"}
    assert found[0].data.metrics["eval_loss"] == 0.25
    history = mlflow.get_metric_history(run.info.run_id, "eval_loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [1.0, 0.5, 0.25]

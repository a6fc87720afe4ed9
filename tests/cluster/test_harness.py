"""The test cluster does what the rest of the suite relies on: a real scheduler placing GPU pods,
kwok simulating the `sim` nodes, the pod runner executing `local-gpu-0`'s pods, and MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client, watch

import devcluster
from devcluster.processes import stop
from tests.support import free_port, process_alive, wait_for


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
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
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


def pod_history(
    core: client.CoreV1Api,
    namespace: str,
    since: str,
    done: Callable[[list[client.V1Pod]], bool],
    timeout: int = 30,
) -> list[client.V1Pod]:
    """The last state of each pod of the namespace since resource version `since`, in order of
    creation, deleted pods included (a Job's pod is gone once the Job controller is done with
    it); read from the watch until `done` holds for them."""
    pods: dict[str, client.V1Pod] = {}
    stream = watch.Watch().stream(
        core.list_namespaced_pod, namespace, resource_version=since, timeout_seconds=timeout
    )
    for event in stream:
        pod = event["object"]
        pods[pod.metadata.uid] = pod
        if done(list(pods.values())):
            return list(pods.values())
    seen = [(p.metadata.name, p.status.phase) for p in pods.values()]
    raise AssertionError(f"timed out after {timeout}s; pods seen: {seen}")


def local_pod(name: str, program: str, claim: str, mount: dict) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"lorasweep.io/node-mode": "local"},
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
            "containers": [
                {
                    "name": "main",
                    "image": "lorasweep-test",
                    "command": ["python", "-c", program],
                    "volumeMounts": [{"name": "data", **mount}],
                }
            ],
        },
    }


def finished(core: client.CoreV1Api, namespace: str, pod: str) -> client.V1Pod:
    def check():
        found = core.read_namespaced_pod(pod, namespace)
        return found if found.status.phase in ("Succeeded", "Failed") else None

    return wait_for(check, 30, f"pod {pod} to finish")


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
    # As this session's fixture did: `up` would keep the cluster running after the session.
    again = devcluster.use(str(os.getpid()), start=True)
    assert again.api_url == cluster.api_url
    assert again.pids == cluster.pids


# A cluster process and what it starts: a worker in its own process group (as MLflow's server
# has) and one in a session of its own (as the pod runner's containers), both deaf to SIGTERM.
# Prints their pids, then stays or, with `exit`, leaves them behind.
FAMILY_MARK = "LORASWEEP_HARNESS_FAMILY"
FAMILY = """
import subprocess, sys, time
deaf = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(flush=True); time.sleep(600)"]
worker = subprocess.Popen(deaf, stdout=subprocess.PIPE)
own_session = subprocess.Popen(deaf, stdout=subprocess.PIPE, start_new_session=True)
worker.stdout.readline(), own_session.stdout.readline()  # both ignore SIGTERM by now
print(worker.pid, own_session.pid, flush=True)
if sys.argv[1] != "exit":
    time.sleep(600)
"""


def start_family(leader: str, mark: str) -> tuple[subprocess.Popen[str], int, int]:
    """The FAMILY leader, started as devcluster starts a cluster process (a session of its own),
    with `mark` in its environment as a test session sets it; and its two workers' pids."""
    process = subprocess.Popen(
        [sys.executable, "-c", FAMILY, leader],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, FAMILY_MARK: mark},
    )
    assert process.stdout is not None
    worker, own_session = map(int, process.stdout.readline().split())
    return process, worker, own_session


def test_stopping_a_cluster_process_stops_everything_it_started():
    leader, worker, own_session = start_family("stay", uuid.uuid4().hex)
    stop("family", leader.pid, grace=1)
    leader.wait(timeout=10)
    assert not process_alive(worker) and not process_alive(own_session)


def test_a_group_is_stopped_after_its_leader_ended_and_a_session_mark_finds_the_rest():
    """A leader that exited leaves its group behind, which is still stopped; a process in a
    session of its own is then out of reach of the tree, and only the session's mark, which
    the final check of every test session looks for, still finds it."""
    mark = uuid.uuid4().hex
    leader, worker, own_session = start_family("exit", mark)
    leader.wait(timeout=10)
    try:
        stop("family", leader.pid, grace=1)
        assert not process_alive(worker)
        found = devcluster.session_processes(FAMILY_MARK, mark)
        assert list(found) == [own_session] and "SIG_IGN" in found[own_session]
    finally:
        os.kill(own_session, signal.SIGKILL)
    wait_for(lambda: not devcluster.session_processes(FAMILY_MARK, mark), 10, "it")


LEAKY_TESTS = """
import os, subprocess, sys

def test_waits_for_its_process():
    subprocess.run([sys.executable, "-c", "pass"], check=True)

def test_leaves_a_process_behind():
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    with open(os.environ["LEAKED_PID_FILE"], "w") as out:
        out.write(str(sleeper.pid))
"""


@pytest.mark.parametrize("leak", [False, True])
def test_a_test_session_that_leaves_a_process_behind_fails(tmp_path, leak):
    """The final check of tests/conftest.py, in a session of its own: a process a test started
    and left running fails the run, is named, and is killed."""
    tests = tmp_path / "test_leaky.py"
    tests.write_text(LEAKY_TESTS)
    selected = "leaves_a_process" if leak else "waits_for"
    leaked = tmp_path / "leaked.pid"
    run = subprocess.run(
        [
            *[sys.executable, "-m", "pytest", "-p", "tests.conftest", str(tests), "-k", selected],
            # Its temporary folders inside ours: its clean-up of old ones must not touch ours.
            f"--basetemp={tmp_path / 'base'}",
        ],
        cwd=devcluster.REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "LEAKED_PID_FILE": str(leaked)},
    )
    if not leak:
        assert run.returncode == 0, run.stdout
        assert "processes left behind" not in run.stdout and not leaked.exists()
        return
    pid = int(leaked.read_text())
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout
    assert "1 passed" in run.stdout and "processes left behind" in run.stdout
    assert f"  {pid} sleep 600" in run.stdout
    assert not process_alive(pid)


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
    # Long enough that the moment of 8 bound and 2 tried outlasts creating and scheduling
    # them on a loaded machine: once a first pod ends, a waiting one is bound.
    for i in range(10):
        batch.create_namespaced_job(
            namespace,
            one_gpu_job(f"fill-{i}", "sim", annotations={"lorasweep.io/sim-duration": "20s"}),
        )

    def saturated():
        pods = core.list_namespaced_pod(namespace).items
        bound = [p for p in pods if p.spec.node_name]
        unbound = [p for p in pods if not p.spec.node_name and p.status.phase == "Pending"]
        # Until the scheduler has tried a pending pod, it has no PodScheduled condition.
        tried = all(p.status.conditions for p in unbound)
        return (bound, unbound) if len(pods) == 10 and len(bound) == 8 and tried else None

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
open("/dev/termination-log", "w").write(json.dumps(
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


ENVIRONMENT = """
import json, os
open("/dev/termination-log", "w").write(json.dumps(dict(os.environ)))
"""


def test_a_local_pod_sees_its_own_env_and_not_the_runners(batch, core, namespace, cluster):
    """A Job that forgot a variable must fail here as on a real node: the pod runner hands a
    process its pod's env and, of its own environment, only PATH and HOME."""
    runner = cluster.pids["pod-runner"]
    environ = Path(f"/proc/{runner}/environ").read_text().split("\0")
    runner_env = dict(e.split("=", 1) for e in environ if "=" in e)
    # The dev cluster's processes have what the images set; a pod has it only if it says so.
    assert runner_env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    env = [{"name": "X", "value": "from the pod"}]
    job = one_gpu_job("env", "local", command=["python", "-c", ENVIRONMENT], env=env)
    batch.create_namespaced_job(namespace, job)
    assert job_condition(batch, namespace, "env") == "Complete"
    pod = finished_pod(core, namespace, "env")
    seen = json.loads(pod.status.container_statuses[0].state.terminated.message)
    kept = {"PATH", "HOME"} & set(runner_env)
    # LC_CTYPE is Python's own: it coerces the C locale to UTF-8 (PEP 538).
    assert set(seen) - {"LC_CTYPE"} == {"X", *kept}
    assert seen["X"] == "from the pod"
    assert all(seen[name] == runner_env[name] for name in kept)


MESSAGE_PATH = "/lorasweep-test-message/result.json"


def test_a_containers_message_comes_from_its_termination_message_path(batch, core, namespace):
    program = f"open({MESSAGE_PATH!r}, 'w').write('written at my terminationMessagePath')"
    job = one_gpu_job("message", "local", command=["python", "-c", program])
    job["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = MESSAGE_PATH
    batch.create_namespaced_job(namespace, job)
    assert job_condition(batch, namespace, "message") == "Complete"
    pod = finished_pod(core, namespace, "message")
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.message == "written at my terminationMessagePath"
    # The container wrote its own file, seen there in its mount namespace only.
    assert Path(MESSAGE_PATH).read_text() == ""


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


# A pod with a subdomain runs in a mount namespace of its own; its process must end the same.
@pytest.mark.parametrize("subdomain", [None, "workers"])
def test_deleting_a_local_job_terminates_its_process(batch, core, namespace, tmp_path, subdomain):
    pid_file = tmp_path / "pid"
    program = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    )
    job = one_gpu_job("sleeper", "local", command=[sys.executable, "-c", program])
    job["spec"]["template"]["spec"]["subdomain"] = subdomain
    batch.create_namespaced_job(namespace, job)
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30, "the process"))
    assert process_alive(pid)
    batch.delete_namespaced_job("sleeper", namespace, propagation_policy="Background")
    wait_for(lambda: not process_alive(pid), 30, f"process {pid} to end")
    wait_for(lambda: job_pod(core, namespace, "sleeper") is None, 30, "the pod to be gone")


LEAVES_A_WORKER = """
import os, subprocess, sys
deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
worker = subprocess.Popen([sys.executable, "-c", deaf])
open(os.environ["PID_FILE"], "w").write(str(worker.pid))
"""


def test_a_local_containers_processes_end_with_its_main_process(batch, core, namespace, tmp_path):
    """As in a container's PID namespace, a worker the main process leaves behind (one deaf to
    SIGTERM, even) ends when the main process does."""
    pid_file = tmp_path / "pid"
    job = one_gpu_job(
        "leaver",
        "local",
        command=[sys.executable, "-c", LEAVES_A_WORKER],
        env=[{"name": "PID_FILE", "value": str(pid_file)}],
    )
    batch.create_namespaced_job(namespace, job)
    assert job_condition(batch, namespace, "leaver") == "Complete"
    worker = int(pid_file.read_text())
    wait_for(lambda: not process_alive(worker), 10, f"the worker {worker} to end")


RUN_UNTIL_DISRUPTED = """
import os, sys, time
marker = os.environ["MARKER"]
if os.path.exists(marker):
    sys.exit(0)
open(marker, "w").close()
time.sleep(60)
"""


@pytest.mark.parametrize(
    ("disruption", "reason"),
    [("eviction", "EvictionByEvictionAPI"), ("node-loss", "DeletionByTaintManager")],
)
def test_a_disrupted_local_pod_ends_failed_so_its_job_replaces_it(
    batch, core, namespace, tmp_path, disruption, reason
):
    """A running pod that is deleted ends Failed, its DisruptionTarget condition kept, before it
    goes: a podFailurePolicy then ignores the failure and the Job runs a replacement."""
    marker = tmp_path / "started"
    job = one_gpu_job(
        "disrupted",
        "local",
        command=["python", "-c", RUN_UNTIL_DISRUPTED],
        env=[{"name": "MARKER", "value": str(marker)}],
    )
    job["spec"]["podFailurePolicy"] = {
        "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
    }
    since = core.list_namespaced_pod(namespace).metadata.resource_version
    batch.create_namespaced_job(namespace, job)
    wait_for(marker.exists, 30, "the first pod's process")
    first = job_pod(core, namespace, "disrupted").metadata.name
    if disruption == "eviction":
        eviction = client.V1Eviction(metadata=client.V1ObjectMeta(name=first, namespace=namespace))
        core.create_namespaced_pod_eviction(first, namespace, eviction)
    else:
        # What the taint-eviction controller does to the pods of a node that is gone.
        condition = {"type": "DisruptionTarget", "status": "True", "reason": reason}
        core.patch_namespaced_pod_status(first, namespace, {"status": {"conditions": [condition]}})
        core.delete_namespaced_pod(first, namespace)

    assert job_condition(batch, namespace, "disrupted") == "Complete"
    pods = pod_history(
        core,
        namespace,
        since,
        lambda pods: (
            len(pods) == 2 and all(p.status.phase in ("Succeeded", "Failed") for p in pods)
        ),
    )
    assert [p.status.phase for p in pods] == ["Failed", "Succeeded"]
    evicted = pods[0]
    assert evicted.metadata.name == first
    conditions = {c.type: c for c in evicted.status.conditions}
    assert conditions["DisruptionTarget"].status == "True"
    assert conditions["DisruptionTarget"].reason == reason
    assert evicted.status.container_statuses[0].state.terminated.exit_code == 143  # SIGTERM
    status = batch.read_namespaced_job_status("disrupted", namespace).status
    # An ignored failure does not count.
    assert (status.succeeded, status.failed) == (1, None)


RENDEZVOUS = """
import os, socket, time
host, port = os.environ["RENDEZVOUS"].split(":")
if os.environ["JOB_COMPLETION_INDEX"] == "0":
    with socket.create_server((host, int(port))) as server:
        server.settimeout(60)
        connection, _ = server.accept()
        with connection:
            message = connection.makefile().readline()
    open("/dev/termination-log", "w").write(message)
else:
    fqdn = f"{host}.{os.environ['NAMESPACE']}.svc.cluster.local"
    deadline = time.monotonic() + 60
    while True:
        try:
            connection = socket.create_connection((host, int(port)))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with connection:
        connection.sendall(f"hello; {fqdn} is {socket.gethostbyname(fqdn)}\\n".encode())
"""


def test_indexed_job_pods_reach_each_other_by_their_dns_names(batch, core, namespace):
    """Multi-node trials rendezvous on `<job>-0.<subdomain>`: the names of an Indexed Job's
    pods resolve in local pods, as cluster DNS resolves them, and only there."""
    port = free_port()
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "workers"},
            "spec": {
                "clusterIP": "None",
                "selector": {"batch.kubernetes.io/job-name": "rdzv"},
                "ports": [{"port": port}],
            },
        },
    )
    env = [
        {"name": "RENDEZVOUS", "value": f"rdzv-0.workers:{port}"},
        {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    batch.create_namespaced_job(
        namespace,
        {
            "metadata": {"name": "rdzv"},
            "spec": {
                "completionMode": "Indexed",
                "completions": 2,
                "parallelism": 2,
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "subdomain": "workers",
                        "restartPolicy": "Never",
                        "terminationGracePeriodSeconds": 3,
                        "nodeSelector": {"lorasweep.io/node-mode": "local"},
                        "containers": [
                            {
                                "name": "main",
                                "image": "lorasweep-test",
                                "command": ["python", "-c", RENDEZVOUS],
                                "env": env,
                            }
                        ],
                    }
                },
            },
        },
    )
    assert job_condition(batch, namespace, "rdzv") == "Complete"
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=rdzv").items
    server = next(p for p in pods if p.spec.hostname == "rdzv-0")
    message = server.status.container_statuses[0].state.terminated.message
    assert message == f"hello; rdzv-0.workers.{namespace}.svc.cluster.local is 127.0.0.1\n"
    assert "rdzv-0" not in Path("/etc/hosts").read_text()


WRITE_CHECKPOINT = "open('/lorasweep-test-ckpt/step-10', 'w').write('weights')"
READ_CHECKPOINT = """
import json, os
weights = open("/lorasweep-test-ckpt/step-10").read()
try:
    open("/lorasweep-test-ckpt/step-20", "w")
    error = None
except OSError as e:
    error = e.strerror
open("/dev/termination-log", "w").write(json.dumps([weights, error]))
"""


def test_local_pods_share_a_claimed_volume_at_its_sub_path(core, namespace):
    """Checkpoints on a PersistentVolumeClaim: one pod writes into its subPath, the next reads
    it back; the files are in the volume's directory, not at the mount path on this machine."""
    volume = devcluster.create_volume_claim(core, namespace, "checkpoints")
    mount = {"mountPath": "/lorasweep-test-ckpt", "subPath": "t1"}
    core.create_namespaced_pod(
        namespace, local_pod("writer", WRITE_CHECKPOINT, "checkpoints", mount)
    )
    writer = finished(core, namespace, "writer")
    assert (writer.spec.node_name, writer.status.phase) == ("local-gpu-0", "Succeeded")
    assert (volume / "t1" / "step-10").read_text() == "weights"
    assert not Path("/lorasweep-test-ckpt/step-10").exists()

    read_only = {**mount, "readOnly": True}
    core.create_namespaced_pod(
        namespace, local_pod("reader", READ_CHECKPOINT, "checkpoints", read_only)
    )
    reader = finished(core, namespace, "reader")
    assert reader.status.phase == "Succeeded"
    message = reader.status.container_statuses[0].state.terminated.message
    assert json.loads(message) == ["weights", "Read-only file system"]


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

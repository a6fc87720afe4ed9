"""Chaos: the operator, the apiserver and MLflow fail mid-sweep; no trial is lost or run twice.

Every random choice comes from one seed, LORASWEEP_CHAOS_SEED (default DEFAULT_SEED), named in
every failure message: `LORASWEEP_CHAOS_SEED=N pytest tests/e2e/test_chaos.py` replays it.
The apiserver and MLflow are the session's shared ones: each test that stops one starts it
again (same arguments, port and data) before it ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from mlflow import MlflowClient
from mlflow import artifacts as mlflow_artifacts

import devcluster
from devcluster.operator_process import OperatorProcess
from sweep_operator.api import GROUP, PLURAL, VERSION
from sweep_operator.render import builtin_template
from sweep_operator.trials import ANNOTATION_INDEX, ANNOTATION_PARAMETERS, LABEL_SWEEP
from tests.e2e.sweeps import get_sweep, sim_spec, sweep_manifest, trial_jobs, wait_for_phase
from tests.support import process_alive, wait_for

DEFAULT_SEED = 20261203
SEED = int(os.environ.get("LORASWEEP_CHAOS_SEED", DEFAULT_SEED))
REPLAY = f"replay with LORASWEEP_CHAOS_SEED={SEED}"
CHAOS_PROGRAM = Path(__file__).with_name("chaos_program.py")
POD_ANNOTATIONS_LINE = "      annotations: {{ pod.annotations | yaml }}\n"


@pytest.fixture(autouse=True)
def chaos_seed() -> int:
    """The seed, printed: pytest shows it with any failure of these tests, timeouts included."""
    print(f"chaos seed {SEED}: {REPLAY}")
    return SEED


def rng(test: str) -> random.Random:
    """The random choices of one test: the same for a seed whatever else runs."""
    return random.Random(f"{SEED}-{test}")


def known_sim_sweep(trials: int, parallelism: int, choices: random.Random) -> tuple[dict, int]:
    """A grid sweep of `trials` simulated trials (lora_rank 1..trials) whose results and run
    times are drawn from `choices`; and the rank of the one best trial (lowest eval_loss, all
    distinct). The pod annotations that steer kwok come from a jobTemplate, per rank."""
    losses = choices.sample(range(1_000, 10_000), trials)
    sim = {
        str(rank): {
            "lorasweep.io/sim-duration": f"{choices.randint(200, 1_500)}ms",
            "lorasweep.io/sim-result": json.dumps({"metrics": {"eval_loss": loss / 10_000}}),
        }
        for rank, loss in zip(range(1, trials + 1), losses, strict=True)
    }
    template = builtin_template()
    assert POD_ANNOTATIONS_LINE in template  # the line this test replaces
    template = f"{{%- set sim = {json.dumps(sim)} %}}\n" + template.replace(
        POD_ANNOTATIONS_LINE, "      annotations: {{ sim[params.lora_rank | string] | yaml }}\n"
    )
    spec = sim_spec(trials, parallelism, {})
    spec["trainer"]["jobTemplate"] = template
    best_rank = 1 + losses.index(min(losses))
    return spec, best_rank


def jobs_by_name(batch, namespace: str, sweep: str) -> dict[str, client.V1Job]:
    return {j.metadata.name: j for j in trial_jobs(batch, namespace, sweep)}


def assert_each_trial_once(batch, namespace: str, sweep: str, trials: int) -> None:
    """Exactly `trials` Jobs, one per index and parameter set, each run to success once."""
    jobs = trial_jobs(batch, namespace, sweep)
    names = sorted(j.metadata.name for j in jobs)
    assert names == [f"{sweep}-{i:04d}" for i in range(trials)], f"{names} ({REPLAY})"
    annotations = [j.metadata.annotations for j in jobs]
    indices = sorted(int(a[ANNOTATION_INDEX]) for a in annotations)
    assert indices == list(range(trials)), f"indices {indices} ({REPLAY})"
    parameters = {a[ANNOTATION_PARAMETERS] for a in annotations}
    assert len(parameters) == trials, f"a parameter set ran twice: {parameters} ({REPLAY})"
    runs = {j.metadata.name: (j.status.succeeded, j.status.failed) for j in jobs}
    assert all(run == (1, None) for run in runs.values()), f"{runs} ({REPLAY})"


@contextlib.contextmanager
def outage(cluster: devcluster.Cluster, name: str, crash: bool) -> Iterator[None]:
    """One of the cluster's processes is down for the block (SIGKILLed when `crash`, else
    stopped), and started again as it was when the block ends, however it ends."""
    stopped = devcluster.stop_process(cluster, name, crash=crash)
    try:
        yield
    finally:
        devcluster.start_process(cluster, stopped)


def test_operator_killed_ten_times_loses_and_duplicates_no_trial(
    operator: OperatorProcess, custom, batch, namespace, mlflow_uri
):
    """50 simulated trials, 6 at a time; the operator is SIGKILLed 10 times, each once a
    drawn number of Jobs exists (at once, right after a burst of creations, or a drawn moment
    later) and started again. Every trial runs exactly once, the best one is found, and the
    sweep has one MLflow parent run, closed with the best."""
    choices = rng("operator-kills")
    spec, best_rank = known_sim_sweep(50, 6, choices)
    experiment = f"chaos-kills-{uuid.uuid4().hex[:8]}"
    spec["mlflow"] = {"trackingUri": mlflow_uri, "experimentName": experiment}
    # Kill points: the number of Jobs created by then, and a delay after that (0: right
    # after the burst that created them, mid-burst when a burst is still going).
    points = sorted(choices.sample(range(1, 51), 10))
    delays = [choices.choice([0.0, 0.0, choices.uniform(0.05, 1.5)]) for _ in points]
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("kills", spec)
    )
    for created, delay in zip(points, delays, strict=True):
        wait_for(
            lambda: len(trial_jobs(batch, namespace, "kills")) >= created,  # noqa: B023
            120,
            f"{created} Jobs before a kill ({REPLAY})",
            interval=0.05,
        )
        time.sleep(delay)
        operator.kill()
        operator.start()

    status = wait_for_phase(custom, namespace, "kills", ("Succeeded", "Failed"), 180)["status"]
    assert status["phase"] == "Succeeded", f"{status} ({REPLAY})"
    assert_each_trial_once(batch, namespace, "kills", 50)
    counts = status["trials"]
    assert counts["total"] == 50 and counts["succeeded"] == 50, f"{counts} ({REPLAY})"
    best = status["bestTrial"]
    assert best["parameters"] == {"lora_rank": best_rank}, f"{best} ({REPLAY})"

    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    parents = mlflow.search_runs([experiment_id], filter_string="tags.`lorasweep.role` = 'parent'")
    assert [r.info.run_id for r in parents] == [status["mlflow"]["parentRunId"]], REPLAY

    def parent_closed():
        parent = mlflow.get_run(status["mlflow"]["parentRunId"])
        return parent if parent.info.status == "FINISHED" else None

    parent = wait_for(parent_closed, 60, f"the parent run to be closed ({REPLAY})")
    assert parent.data.params["best.lora_rank"] == str(best_rank), REPLAY


def test_apiserver_killed_mid_sweep_the_operator_reconnects_by_itself(
    operator: OperatorProcess, cluster, custom, batch, namespace, tmp_path
):
    """The apiserver is SIGKILLed while 20 simulated trials run 4 at a time, and 2 local
    trials (real processes) end while it is down; it is started again on the same port and
    etcd. The same operator process (its watches reconnect), the pod runner and the cluster's
    controllers finish both sweeps, each trial once, with every result."""
    choices = rng("apiserver")
    spec, best_rank = known_sim_sweep(20, 4, choices)
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("outage", spec)
    )
    trace, cue = tmp_path / "trace", tmp_path / "apiserver-down"
    local = chaos_trials([2, 3], 2, ["--seconds=0", f"--start-after={cue}", f"--trace={trace}"])
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("local", local)
    )
    created = choices.randint(4, 12)
    wait_for(
        lambda: len(trial_jobs(batch, namespace, "outage")) >= created,
        120,
        f"{created} Jobs before the apiserver goes ({REPLAY})",
        interval=0.05,
    )

    def local_pids() -> list[int]:
        lines = trace.read_text().splitlines() if trace.exists() else []
        return [int(line.split()[2]) for line in lines] if len(lines) == 2 else []

    pids = wait_for(local_pids, 120, "the local trials' processes")
    with outage(cluster, "kube-apiserver", crash=True):
        cue.touch()  # the local trials end now; nobody can tell the apiserver
        wait_for(lambda: not any(map(process_alive, pids)), 60, "the local trials to end")
        time.sleep(choices.uniform(0.5, 3.0))  # simulated trials end meanwhile too

    status = wait_for_phase(custom, namespace, "outage", ("Succeeded", "Failed"), 180)["status"]
    assert operator.process is not None and operator.process.poll() is None, "operator exited"
    assert status["phase"] == "Succeeded", f"{status} ({REPLAY})"
    assert_each_trial_once(batch, namespace, "outage", 20)
    assert status["trials"]["succeeded"] == 20, f"{status['trials']} ({REPLAY})"
    assert status["bestTrial"]["parameters"] == {"lora_rank": best_rank}, REPLAY
    local_status = wait_for_phase(custom, namespace, "local", ("Succeeded", "Failed"), 60)
    assert local_status["status"]["trials"]["succeeded"] == 2, local_status["status"]
    assert local_status["status"]["bestTrial"]["value"] == 0.1, local_status["status"]
    assert devcluster.Cluster.load().healthy(), "the cluster did not recover"


def chaos_trials(ranks: list[int], parallelism: int, args: list[str], **extra) -> dict:
    """A grid over lora_rank of chaos_program.py trials on local-gpu-0 (real processes)."""
    return {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "algorithm": {"name": "grid"},
        "parameters": {"lora_rank": {"values": ranks}},
        "parallelism": parallelism,
        "trainer": {
            "image": "lorasweep-e2e",
            "command": [sys.executable, str(CHAOS_PROGRAM)],
            "args": ["--rank={{ params.lora_rank }}", *args],
            "env": devcluster.image_env_vars(),
            "nodeSelector": {"lorasweep.io/node-mode": "local"},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "terminationGracePeriodSeconds": 5,
        },
        **extra,
    }


def trial_runs(mlflow: MlflowClient, experiment_id: str, sweep: str) -> dict[str, object]:
    runs = mlflow.search_runs([experiment_id], filter_string=f"tags.`lorasweep.sweep` = '{sweep}'")
    return {r.data.tags["lorasweep.trial"]: r for r in runs if "lorasweep.trial" in r.data.tags}


def test_mlflow_stopped_mid_sweep_loses_no_result_and_catches_up(
    operator: OperatorProcess, cluster, custom, namespace, mlflow_uri, tmp_path
):
    """MLflow stops while trials run (local processes, 2 at a time): trial 0 ended before,
    trial 1 runs with its MLflow run, trial 2 (the best, rank 3) waits for the outage, then
    ends during it with its result only in its termination message, trial 3 starts during it.
    The
    sweep's time budget is then cut, so the operator stops trials 1 and 3 and ends the sweep
    while MLflow is still down. Once MLflow is back on the same store, the parent run is
    closed with the best trial and the stopped trial's run says why it was stopped."""
    choices = rng("mlflow")
    experiment = f"chaos-{uuid.uuid4().hex[:8]}"
    # Trials 1 and 3 run until stopped; 0 and 2 take a second, 2 once MLflow is down.
    seconds = "{{ 600 if trial.index in (1, 3) else 1 }}"
    down = tmp_path / "mlflow-down"
    start_after = f"{{{{ '{down}' if trial.index == 2 else '' }}}}"
    spec = chaos_trials(
        [1, 2, 3, 4],
        2,
        [f"--seconds={seconds}", f"--start-after={start_after}", f"--trace={tmp_path / 'trace'}"],
        mlflow={"trackingUri": mlflow_uri, "experimentName": experiment},
    )
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("offline", spec)
    )
    mlflow = MlflowClient(tracking_uri=mlflow_uri)

    def status() -> dict:
        return get_sweep(custom, namespace, "offline").get("status") or {}

    def counts() -> dict:
        return status().get("trials") or {}

    def ready_for_the_outage() -> str | None:
        experiment_id = (status().get("mlflow") or {}).get("experimentId")
        if not experiment_id or counts().get("succeeded") != 1:
            return None
        runs = trial_runs(mlflow, experiment_id, "offline")
        return experiment_id if "offline-0001" in runs else None

    experiment_id = wait_for(ready_for_the_outage, 120, "trial 0 done and trial 1's MLflow run")
    with outage(cluster, "mlflow", crash=False):
        down.touch()
        wait_for(
            lambda: counts().get("succeeded") == 2 and counts().get("running") == 2,
            120,
            "trial 2 done and trial 3 running without MLflow",
        )
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "offline", {"spec": {"timeBudget": "1s"}}
        )
        ended = wait_for_phase(custom, namespace, "offline", ("Succeeded", "Failed"), 60)
        # The operator tried to close the parent run, and will again.
        wait_for(
            lambda: "cannot close the MLflow parent run yet" in operator.log_path.read_text(),
            60,
            "the operator to find MLflow down",
        )
        time.sleep(choices.uniform(0.0, 3.0))  # down a while longer

    result = ended["status"]
    assert result["phase"] == "Succeeded", result
    assert result["trials"]["succeeded"] == 2 and result["trials"]["pruned"] == 2, result
    best = result["bestTrial"]
    assert best["name"] == "offline-0002" and best["value"] == 0.1, best

    def parent_closed():
        parent = mlflow.get_run(result["mlflow"]["parentRunId"])
        return parent if parent.info.status == "FINISHED" else None

    parent = wait_for(parent_closed, 60, "the parent run to be closed")
    assert parent.data.params["best.lora_rank"] == "3"
    assert parent.data.metrics["best_value"] == 0.1
    assert parent.data.tags["lorasweep.best_trial"] == "offline-0002"

    def stopped_run_tagged():
        run = trial_runs(mlflow, experiment_id, "offline")["offline-0001"]
        return run if "lorasweep.stopped_reason" in run.data.tags else None

    stopped = wait_for(stopped_run_tagged, 60, "trial 1's run to be tagged stopped")
    assert "timeBudget" in stopped.data.tags["lorasweep.stopped_reason"]
    assert stopped.info.status == "KILLED"
    # Trials 2 and 3 never had a run; trial 2's result came from its termination message.
    assert set(trial_runs(mlflow, experiment_id, "offline")) == {"offline-0000", "offline-0001"}

    def report_published() -> bool:
        listed = mlflow_artifacts.list_artifacts(
            run_id=result["mlflow"]["parentRunId"], tracking_uri=mlflow_uri
        )
        return "best_config.yaml" in {a.path for a in listed}

    wait_for(report_published, 60, "the report in the parent run's artifacts")


def test_deleting_a_sweep_mid_run_leaves_no_process_or_object(
    operator: OperatorProcess, custom, batch, kube_client, namespace, tmp_path
):
    """Two trials run as local processes, each with a worker that ignores SIGTERM; the sweep
    is deleted. Every process of every trial ends, and no Job, pod or other object of the
    sweep is left."""
    trace = tmp_path / "trace"
    mark = uuid.uuid4().hex
    spec = chaos_trials([1, 2, 3, 4], 2, ["--seconds=600", f"--trace={trace}", "--worker"])
    # Every process of the sweep's trials, reparented or not, carries this in its environment.
    spec["trainer"]["env"].append({"name": "CHAOS_SWEEP_MARK", "value": mark})
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("doomed", spec)
    )

    def workers() -> list[int]:
        lines = trace.read_text().splitlines() if trace.exists() else []
        found = [int(line.split()[2]) for line in lines if line.startswith("worker ")]
        return found if len(found) == 2 else []

    wait_for(workers, 120, "2 trials with their workers")
    pids = [int(line.split()[2]) for line in trace.read_text().splitlines()]
    assert len(devcluster.session_processes("CHAOS_SWEEP_MARK", mark)) == 4
    time.sleep(rng("delete").uniform(0.0, 2.0))  # the trials get going
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "doomed")

    def sweep_gone() -> bool:
        found = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        return not found

    core = client.CoreV1Api(kube_client)
    selector = f"{LABEL_SWEEP}=doomed"
    wait_for(sweep_gone, 60, "the sweep to go")
    wait_for(lambda: not trial_jobs(batch, namespace, "doomed"), 60, "the Jobs to go")
    wait_for(
        lambda: not core.list_namespaced_pod(namespace, label_selector=selector).items,
        60,
        "the pods to go",
    )
    wait_for(
        lambda: not devcluster.session_processes("CHAOS_SWEEP_MARK", mark),
        30,
        "every process of the trials to end",
    )
    assert not any(process_alive(pid) for pid in pids)
    assert not core.list_namespaced_config_map(namespace, label_selector=selector).items
    assert not core.list_namespaced_service(namespace, label_selector=selector).items

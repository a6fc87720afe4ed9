"""TPE with early stopping on the real cluster: trials whose learning curves are known."""

from __future__ import annotations

import csv
import io
import math
import sys
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import yaml
from kubernetes import client
from mlflow import MlflowClient
from mlflow import artifacts as mlflow_artifacts

import devcluster
from sweep_operator.api import GROUP, PLURAL, VERSION
from tests.e2e.sweeps import get_sweep, sim_spec, sweep_manifest, trial_jobs, wait_for_phase
from tests.support import process_alive, wait_for

CURVE_PROGRAM = Path(__file__).with_name("curve_program.py")


def final_loss(lr: float, rank: int) -> float:
    """The curve program's final eval_loss (its definition, restated)."""
    return (math.log10(lr) + 3) ** 2 + (math.log2(rank) - 4) ** 2 / 4 + 0.1 + 1 / 13


# A trial takes 12 steps of this long. A stop must reach it before its last step: curves are
# read every CURVE_POLL_SECONDS, then a reconcile plans and the Job controller ends the pod, and
# a loaded machine adds seconds to that. At 0.4 s a step, all five trials a run stopped had
# already ended once in a CI run.
SECONDS_PER_STEP = 0.8


def curve_sweep(algorithm: dict, early_stopping: dict, trace: Path, mlflow_uri: str) -> dict:
    """8 trials of the curve program over learning rate and rank, 2 at a time, on local-gpu-0."""
    return {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "algorithm": algorithm,
        "parameters": {
            "learning_rate": {"type": "log_uniform", "min": 1.0e-5, "max": 1.0e-1},
            "lora_rank": {"type": "int", "min": 4, "max": 64},
        },
        "maxTrials": 8,
        "parallelism": 2,
        "earlyStopping": early_stopping,
        "trainer": {
            "image": "lorasweep-e2e",
            "command": [sys.executable, str(CURVE_PROGRAM)],
            "args": [
                "--lr={{ params.learning_rate }}",
                "--rank={{ params.lora_rank }}",
                f"--trace={trace}",
                f"--seconds-per-step={SECONDS_PER_STEP}",
            ],
            "env": devcluster.image_env_vars(),
            "nodeSelector": {"lorasweep.io/node-mode": "local"},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
        },
        "mlflow": {
            "trackingUri": mlflow_uri,
            "experimentName": f"e2e-{algorithm['name']}-{uuid.uuid4().hex[:8]}",
        },
    }


def test_tpe_with_median_stopping(
    operator, custom, batch, kube_client, namespace, mlflow_uri, tmp_path
):
    trace = tmp_path / "trace"
    spec = curve_sweep(
        {"name": "tpe", "seed": 7, "startupTrials": 3},
        {"algorithm": "median", "minSteps": 3, "minTrials": 1},
        trace,
        mlflow_uri,
    )
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("tpe", spec)
    )
    status = wait_for_phase(custom, namespace, "tpe", ("Succeeded", "Failed"), 300)["status"]
    assert status["phase"] == "Succeeded", status

    def settled():
        """The status and the Jobs agree. A trial may complete in the moment the operator
        stops it; its Job then ends Complete, it counts as a success, and the status, derived
        from the Jobs on every reconcile, follows within seconds."""
        jobs = {j.metadata.name: j for j in trial_jobs(batch, namespace, "tpe")}
        stopped = {
            n
            for n, j in jobs.items()
            if "lorasweep.io/stopped" in (j.metadata.annotations or {}) and not j.status.succeeded
        }
        status = get_sweep(custom, namespace, "tpe")["status"]
        return (jobs, stopped, status) if len(stopped) == status["trials"]["pruned"] else None

    jobs, stopped, status = wait_for(settled, 30, "the status to count the stopped trials")
    counts = status["trials"]
    assert counts["succeeded"] + counts["pruned"] == 8 and counts["pruned"] >= 1, counts
    assert len(jobs) == 8
    events = trace.read_text().split("\n")
    ended = {line.split()[1] for line in events if line.startswith("end ")}
    pids = {line.split()[1]: int(line.split()[2]) for line in events if line.startswith("start")}
    for name in stopped:
        assert jobs[name].spec.suspend is True
        assert not process_alive(pids[name])  # its process is gone
    # Stopped mid-run, not after the fact. (A trial that ends in the very moment it is stopped
    # may still write its end: its pod is deleted before its success is reported.)
    interrupted = stopped - ended
    assert interrupted
    succeeded = set(jobs) - stopped

    # The best trial is the best of the completed ones, by the program's known function.
    best = status["bestTrial"]
    finals = {n: final_loss(**_params(jobs[n])) for n in succeeded}
    assert best["name"] == min(finals, key=finals.get)
    assert math.isclose(best["value"], finals[best["name"]], rel_tol=1e-6)

    mlflow = MlflowClient(tracking_uri=mlflow_uri)

    def tagged():
        """The trial runs, once every stopped one says why. A run is tagged once its Job shows
        the stop (a trial that completes as it is stopped stays a success): the trials stopped
        by the sweep's last plan are tagged by the reconcile after it."""
        sweep_runs = mlflow.search_runs(
            [status["mlflow"]["experimentId"]], filter_string="tags.`lorasweep.sweep` = 'tpe'"
        )
        runs = {
            r.data.tags["lorasweep.trial"]: r
            for r in sweep_runs
            if "lorasweep.trial" in r.data.tags
        }
        reasons = [runs[n].data.tags.get("lorasweep.stopped_reason") for n in stopped]
        return runs if all(reasons) else None

    runs = wait_for(tagged, 30, "the stopped trials' runs to say why")
    for name in interrupted:
        assert runs[name].info.status == "KILLED"

    # The report: a ConfigMap named after the sweep and artifacts of the parent run, published
    # in the background once the sweep has ended.
    core = client.CoreV1Api(kube_client)

    def final_report() -> dict[str, str] | None:
        data = core.read_namespaced_config_map("tpe-report", namespace).data
        rows = list(csv.DictReader(io.StringIO(data["trials_summary.csv"])))
        return data if sorted(r["name"] for r in rows) == sorted(jobs) else None

    report = wait_for(final_report, 30, "the final report")
    best_config = yaml.safe_load(report["best_config.yaml"])
    assert best_config["parameters"] == best["parameters"]

    def artifacts() -> set[str] | None:
        listed = mlflow_artifacts.list_artifacts(
            run_id=status["mlflow"]["parentRunId"], tracking_uri=mlflow_uri
        )
        paths = {a.path for a in listed}
        return paths if "optimization_plot.png" in paths else None

    published = wait_for(artifacts, 30, "the report's artifacts")
    assert {"best_config.yaml", "trials_summary.csv", "optimization_plot.png"} <= published

    # Fewer than 15 scored trials: importance says so rather than naming a winner.
    def importance_of_all():
        importance = get_sweep(custom, namespace, "tpe")["status"].get("parameterImportance")
        return importance if importance and importance["trials"] == counts["succeeded"] else None

    importance = wait_for(importance_of_all, 60, "the importance of the scored trials")
    assert not importance.get("parameters")


def _params(job: client.V1Job) -> dict:
    import json

    params = json.loads(job.metadata.annotations["lorasweep.io/parameters"])
    return {"lr": params["learning_rate"], "rank": params["lora_rank"]}


def test_time_budget_stops_running_trials_at_the_deadline(operator, custom, batch, namespace):
    spec = sim_spec(4, 2, {"lorasweep.io/sim-duration": "10m"}, timeBudget="8s")
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("budget", spec)
    )
    sweep = wait_for_phase(custom, namespace, "budget", ("Succeeded", "Failed"), 60)
    status = sweep["status"]
    reasons = {c["reason"] for c in status["conditions"] if c["status"] == "True"}
    assert "BudgetExhausted" in reasons, status
    jobs = trial_jobs(batch, namespace, "budget")
    # Nothing new after the deadline: only the first two trials ever ran, and both stopped.
    assert sorted(j.metadata.name for j in jobs) == ["budget-0000", "budget-0001"]
    assert all(j.spec.suspend for j in jobs)
    assert status["trials"]["pruned"] == 2
    # The sweep ends at its deadline: timeBudget after its first trial started.
    started = datetime.fromisoformat(status["startTime"])
    assert datetime.fromisoformat(status["completionTime"]) - started == timedelta(seconds=8)


def test_bohb_with_hyperband_brackets(operator, custom, batch, namespace, mlflow_uri, tmp_path):
    """bohb proposes from the values at a rung, Hyperband stops trials within their bracket,
    and the sweep's best is the best of the trials that finished."""
    # Five random startup trials: the fourth and fifth (indexes 3 and 4, bracket 1) are then
    # known draws worse than the second (index 1), so they are stopped at the first rung, step
    # 3 of 12, whatever the timing. With three, whether any trial was stopped before it ended
    # hung on what bohb proposed and on the last rung, 3 steps before the end.
    spec = curve_sweep(
        {"name": "bohb", "seed": 3, "startupTrials": 5},
        {
            "algorithm": "hyperband",
            "minSteps": 1,
            "maxSteps": 12,
            "reductionFactor": 3,
            "minTrials": 1,
        },
        tmp_path / "trace",
        mlflow_uri,
    )
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("bohb", spec)
    )
    status = wait_for_phase(custom, namespace, "bohb", ("Succeeded", "Failed"), 300)["status"]
    assert status["phase"] == "Succeeded", status
    jobs = {j.metadata.name: j for j in trial_jobs(batch, namespace, "bohb")}
    assert len(jobs) == 8
    reasons = {
        name: (j.metadata.annotations or {})["lorasweep.io/stopped"]
        for name, j in jobs.items()
        if "lorasweep.io/stopped" in (j.metadata.annotations or {}) and not j.status.succeeded
    }
    assert reasons, "Hyperband stopped no trial"
    assert all(r.startswith("Hyperband bracket ") for r in reasons.values()), reasons
    finals = {n: final_loss(**_params(j)) for n, j in jobs.items() if n not in reasons}
    assert status["bestTrial"]["name"] == min(finals, key=finals.get)

"""`make demo`, smaller: examples/demo-sweep.yaml with the real trainer on local-gpu-0."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

import devcluster
from devcluster import demo
from sweep_operator.api import GROUP, PLURAL, VERSION
from tests.e2e.sweeps import get_sweep, wait_for_phase


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    demo.build_assets(folder)
    return folder


def kubectl(cluster, *args: str) -> str:
    result = subprocess.run(
        [f"{cluster.bin_dir}/kubectl", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": str(devcluster.KUBECONFIG)},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_demo_sweep_trains_real_adapters_and_reports_the_best_mlflow_run(
    cluster, operator, kube_client, namespace, mlflow_uri, assets
):
    from kubernetes import client
    from mlflow import MlflowClient

    manifest = demo.demo_manifest(assets)
    spec = manifest["spec"]
    # The same sweep, smaller: 2 x 2 trials of 10 steps instead of 2 x 3 of 40.
    learning_rates = spec["parameters"]["learning_rate"]["values"][-2:]
    spec["parameters"]["learning_rate"]["values"] = learning_rates
    spec["trainer"]["config"] |= {"max_steps": 10, "eval_steps": 5, "logging_steps": 5}
    experiment = f"e2e-demo-{uuid.uuid4().hex[:8]}"
    # The test's operator has no default tracking URI (make operator-up's has): give it here.
    spec["mlflow"] |= {"trackingUri": mlflow_uri, "experimentName": experiment}
    manifest["metadata"]["namespace"] = namespace
    name = manifest["metadata"]["name"]
    custom = client.CustomObjectsApi(kube_client)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)

    # Two waves of the real trainer, each starting with torch's imports: on a loaded 2-core
    # machine that alone takes a minute.
    status = wait_for_phase(custom, namespace, name, ("Succeeded", "Failed"), 300)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["succeeded"] == 4 and status["trials"]["failed"] == 0

    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    children = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{status['mlflow']['parentRunId']}'",
    )
    assert len(children) == 4
    best_run = min(children, key=lambda run: run.data.metrics["eval_loss"])
    best = status["bestTrial"]
    assert best["mlflowRunId"] == best_run.info.run_id
    assert best["value"] == pytest.approx(best_run.data.metrics["eval_loss"])
    assert best["name"] == best_run.data.tags["lorasweep.trial"]

    grid = {
        (rank, lr) for rank in spec["parameters"]["lora_rank"]["values"] for lr in learning_rates
    }
    seen = set()
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert tags["lorasweep.sweep"] == name
        assert tags["lorasweep.trial"].startswith(f"{name}-")
        assert params["model_name_or_path"] == str(assets.resolve() / "model")
        assert params["max_steps"] == "10"
        seen.add((int(params["lora_rank"]), float(params["learning_rate"])))
        # Per-step metrics: training loss every 5 steps from step 1, eval_loss at 5 and 10.
        eval_steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "eval_loss")]
        assert eval_steps == [5, 10]
        assert len(mlflow.get_metric_history(run.info.run_id, "loss")) >= 2
    assert seen == grid
    # Each trial wrote its adapter to a folder of its own, although they share /tmp.
    assert len({run.data.tags["output.adapter_dir"] for run in children}) == 4
    assert get_sweep(custom, namespace, name)["status"]["progress"] == "4/4"

    # README's "Watch it with kubectl" commands, on this sweep.
    table = kubectl(cluster, "get", "hps", "-n", namespace)
    assert "Succeeded" in table and "eval_loss" in table and "4/4" in table
    events = kubectl(cluster, "describe", "hps", name, "-n", namespace)
    assert "TrialSucceeded" in events and "NewBestTrial" in events
    jobs = kubectl(cluster, "get", "jobs,pods", "-n", namespace, "-l", f"lorasweep.io/sweep={name}")
    assert jobs.count(f"job.batch/{name}-") == 4
    jsonpath = "-o=jsonpath={.status.bestTrial}"
    assert json.loads(kubectl(cluster, "get", "hps", name, "-n", namespace, jsonpath)) == best

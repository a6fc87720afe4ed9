"""Trials as a GPU cluster runs them, on the real dev cluster with the real trainer on CPU:
evicted or lost pods that resume from their checkpoint, trials of several processes and of
several nodes, and the best adapter registered in MLflow and loaded back with peft."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest
from kubernetes import client

import devcluster
from devcluster import demo
from sweep_operator.api import GROUP, PLURAL, VERSION
from tests.e2e.sweeps import sweep_manifest, trial_jobs, wait_for_phase
from tests.support import wait_for

CHECKPOINT_STEPS = 5


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return demo.build_assets(tmp_path_factory.mktemp("gpu-trials"))


def real_trainer_spec(assets: dict[str, Path], mlflow_uri: str, **trainer: object) -> dict:
    """One trial of the bundled trainer on local-gpu-0, logging every step."""
    return {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "algorithm": {"name": "grid"},
        "parameters": {"learning_rate": {"values": [5.0e-3]}},
        "parallelism": 1,
        "trainer": {
            "image": "lorasweep-trainer:0.1.0",
            "model": str(assets["model"].resolve()),
            "data": {
                "train": str(assets["train"].resolve()),
                "eval": str(assets["eval"].resolve()),
            },
            "config": {
                "max_steps": 20,
                "eval_steps": 10,
                "logging_steps": 1,
                "per_device_train_batch_size": 8,
                "cutoff_len": 64,
            },
            "env": devcluster.image_env_vars(),
            "nodeSelector": {"lorasweep.io/node-mode": "local"},
            "activeDeadlineSeconds": 600,
            **trainer,
        },
        "mlflow": {"trackingUri": mlflow_uri, "experimentName": f"e2e-gpu-{uuid.uuid4().hex[:8]}"},
    }


def create(custom: client.CustomObjectsApi, namespace: str, name: str, spec: dict) -> None:
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, {**sweep_manifest(name, spec)}
    )


def run_to_the_end(custom: client.CustomObjectsApi, namespace: str, name: str, spec: dict):
    """Apply a sweep and wait for its end; (status, seconds from apply to the end)."""
    create(custom, namespace, name, spec)
    started = time.monotonic()
    status = wait_for_phase(custom, namespace, name, ("Succeeded", "Failed"), 240)["status"]
    assert status["phase"] == "Succeeded", status
    return status, time.monotonic() - started


def child_runs(mlflow_uri: str, status: dict) -> list:
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    parent = status["mlflow"]["parentRunId"]
    return mlflow.search_runs(
        [status["mlflow"]["experimentId"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
    )


def complete_checkpoints(folder: Path) -> list[int]:
    return sorted(
        int(path.name.split("-")[1])
        for path in folder.glob("checkpoint-*")
        if (path / "trainer_state.json").exists()
    )


def last_logged_step(log: Path) -> int:
    steps = re.findall(r"step (\d+)/\d+", log.read_text())
    return max(map(int, steps))


def disrupt(core: client.CoreV1Api, namespace: str, pod: str, how: str) -> None:
    if how == "eviction":
        core.create_namespaced_pod_eviction(
            pod,
            namespace,
            {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod}},
        )
        return
    # A lost node: the taint manager (or the pod GC) marks the pod and deletes it.
    core.patch_namespaced_pod_status(
        pod,
        namespace,
        {
            "status": {
                "conditions": [
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "DeletionByTaintManager",
                        "message": "node local-gpu-0 is gone",
                    }
                ]
            }
        },
    )
    core.delete_namespaced_pod(pod, namespace)


@pytest.mark.parametrize("how", ["eviction", "node-loss"])
def test_disrupted_trial_resumes_from_its_checkpoint_in_the_same_run(
    operator, kube_client, namespace, mlflow_uri, assets, how
):
    core = client.CoreV1Api(kube_client)
    custom = client.CustomObjectsApi(kube_client)
    volume = devcluster.create_volume_claim(core, namespace, "checkpoints")
    spec = real_trainer_spec(
        assets,
        mlflow_uri,
        checkpoints={"claimName": "checkpoints", "intervalSteps": CHECKPOINT_STEPS},
    )
    # Far more steps than a checkpoint's: the disruption lands mid-run even when the tiny model
    # trains fast and the machine is slow to list and disrupt the pod.
    max_steps = 100
    spec["trainer"]["config"]["max_steps"] = max_steps
    create(custom, namespace, "resume", spec)
    trial = "resume-0000"

    # Disrupt the trial once it has a complete checkpoint, long before its last step.
    wait_for(lambda: complete_checkpoints(volume / trial), 120, "a first checkpoint")
    pod = core.list_namespaced_pod(namespace, label_selector=f"lorasweep.io/trial={trial}")
    first = pod.items[0].metadata.name
    disrupt(core, namespace, first, how)
    wait_for(
        lambda: (
            not any(
                p.metadata.name == first
                for p in core.list_namespaced_pod(
                    namespace, label_selector="lorasweep.io/sweep"
                ).items
            )
        ),
        60,
        "the disrupted pod to go",
    )
    trained_until = last_logged_step(devcluster.pod_log_path(namespace, first))
    assert trained_until < max_steps, "the trial ended before it was disrupted"

    status = wait_for_phase(custom, namespace, "resume", ("Succeeded", "Failed"), 240)["status"]
    assert status["phase"] == "Succeeded", status
    assert (
        status["trials"] | {"total": 1, "succeeded": 1, "failed": 0, "pruned": 0}
        == (status["trials"])
    )
    [job] = trial_jobs(client.BatchV1Api(kube_client), namespace, "resume")
    # The Job ignored the disrupted pod: nothing counts as failed, it completed on its retry.
    assert (job.status.succeeded, job.status.failed or 0) == (1, 0)
    assert any(c.type == "Complete" and c.status == "True" for c in job.status.conditions)

    [run] = child_runs(mlflow_uri, status)
    assert run.info.status == "FINISHED"
    assert status["bestTrial"]["mlflowRunId"] == run.info.run_id
    resumed_from = int(run.data.tags["lorasweep.resumed_from_step"])
    assert resumed_from > 0 and resumed_from % CHECKPOINT_STEPS == 0
    # At most one checkpoint interval was trained twice.
    assert 0 <= trained_until - resumed_from <= CHECKPOINT_STEPS, (trained_until, resumed_from)

    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=mlflow_uri).get_metric_history(run.info.run_id, "loss")
    steps = [point.step for point in history]
    # One clean curve: every step once, none missing, across both pods.
    assert sorted(steps) == list(range(1, max_steps + 1)), steps
    print(
        f"{how}: pod {first} trained to step {trained_until}, resumed from {resumed_from}, "
        f"run {run.info.run_id}, {trained_until - resumed_from} steps trained twice"
    )


def test_two_process_trial_trains_once_and_reports_one_result(
    operator, kube_client, namespace, mlflow_uri, assets
):
    custom = client.CustomObjectsApi(kube_client)
    spec = real_trainer_spec(assets, mlflow_uri, gpus=2)
    status, elapsed = run_to_the_end(custom, namespace, "ddp", spec)
    assert status["trials"]["succeeded"] == 1 and status["trials"]["total"] == 1
    [run] = child_runs(mlflow_uri, status)
    assert run.data.metrics["eval_loss"] == pytest.approx(status["bestTrial"]["value"])
    assert run.data.tags["env.world_size"] == "2"
    print(f"2-process trial: {elapsed:.1f}s from apply to Succeeded")


def test_two_node_trial_is_one_trial_with_one_result(
    operator, kube_client, namespace, mlflow_uri, assets
):
    custom = client.CustomObjectsApi(kube_client)
    core = client.CoreV1Api(kube_client)
    spec = real_trainer_spec(assets, mlflow_uri, nodes=2)
    status, elapsed = run_to_the_end(custom, namespace, "nodes", spec)
    assert status["trials"]["succeeded"] == 1 and status["trials"]["total"] == 1
    [job] = trial_jobs(client.BatchV1Api(kube_client), namespace, "nodes")
    assert job.spec.completion_mode == "Indexed" and job.status.succeeded == 2
    pods = core.list_namespaced_pod(namespace, label_selector="lorasweep.io/trial=nodes-0000")
    assert sorted(p.spec.hostname for p in pods.items) == ["nodes-0000-0", "nodes-0000-1"]
    [run] = child_runs(mlflow_uri, status)
    assert run.data.metrics["eval_loss"] == pytest.approx(status["bestTrial"]["value"])
    print(f"2-node trial: {elapsed:.1f}s from apply to Succeeded")


def test_best_adapter_is_registered_and_reproduces_its_eval_loss(
    operator, kube_client, namespace, mlflow_uri, assets, tmp_path, monkeypatch
):
    import mlflow

    from lora_trainer.config import load_config
    from lora_trainer.train import evaluate_adapter

    custom = client.CustomObjectsApi(kube_client)
    model_name = f"e2e-adapter-{uuid.uuid4().hex[:8]}"
    spec = real_trainer_spec(assets, mlflow_uri)
    spec["parameters"]["learning_rate"]["values"] = [1.0e-3, 5.0e-3]
    spec["mlflow"]["registeredModel"] = model_name
    status, _ = run_to_the_end(custom, namespace, "keep", spec)
    best = status["bestTrial"]
    assert best["adapterUri"] == f"models:/{model_name}/1"

    version = mlflow.MlflowClient(tracking_uri=mlflow_uri).get_model_version(model_name, "1")
    assert version.run_id == best["mlflowRunId"]
    assert version.tags["lorasweep.trial"] == best["name"]
    # As a user would: `models:/` URIs resolve through the registry of MLFLOW_TRACKING_URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    adapter = mlflow.artifacts.download_artifacts(
        artifact_uri=best["adapterUri"], dst_path=str(tmp_path)
    )
    trainer = spec["trainer"]
    config = load_config(
        overrides=[
            f"model_name_or_path={trainer['model']}",
            f"train_file={trainer['data']['train']}",
            f"eval_file={trainer['data']['eval']}",
            *(f"{k}={v}" for k, v in trainer["config"].items()),
            *(f"{k}={v}" for k, v in best["parameters"].items()),
        ],
        environ={},
    )
    assert evaluate_adapter(config, Path(adapter)) == pytest.approx(best["value"], abs=1e-4)

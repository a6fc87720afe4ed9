"""Coarse -> refined on the real cluster: `lorasweep refine` narrows a finished TPE sweep, and the
refined sweep starts from the coarse sweep's trials (warm start); a warm start naming a sweep
that does not exist fails the sweep without a Job. Also what the report of the coarse sweep
holds (sensitivity, correlations, importance, learning curves)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import yaml
from kubernetes import client
from mlflow import artifacts as mlflow_artifacts

import devcluster
from sweep_operator.api import GROUP, PLURAL, VERSION, HyperparameterSweep
from sweep_operator.space import in_space
from tests.e2e.sweeps import (
    get_sweep,
    replanned_with_room,
    sweep_events,
    sweep_manifest,
    trial_jobs,
    wait_for_phase,
)
from tests.support import wait_for
from tests.unit.sweep_helpers import trial_parameters

CURVE_PROGRAM = Path(__file__).with_name("curve_program.py")


def curve_spec(trace: Path, mlflow_uri: str) -> dict:
    return {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "algorithm": {"name": "tpe", "seed": 3, "startupTrials": 3},
        "parameters": {
            "learning_rate": {"type": "log_uniform", "min": 1.0e-6, "max": 1.0e-1},
            "lora_rank": {"type": "int", "min": 4, "max": 64, "step": 4},
        },
        "maxTrials": 6,
        "parallelism": 2,
        "trainer": {
            "image": "lorasweep-e2e",
            "command": [sys.executable, str(CURVE_PROGRAM)],
            "args": [
                "--lr={{ params.learning_rate }}",
                "--rank={{ params.lora_rank }}",
                f"--trace={trace}",
                "--seconds-per-step=0.05",
            ],
            "env": devcluster.image_env_vars(),
            "nodeSelector": {"lorasweep.io/node-mode": "local"},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
        },
        "mlflow": {"trackingUri": mlflow_uri, "experimentName": f"e2e-warm-{uuid.uuid4().hex[:8]}"},
    }


def parameters(job: client.V1Job) -> dict:
    return json.loads(job.metadata.annotations["lorasweep.io/parameters"])


def test_refine_a_finished_sweep_and_warm_start_from_it(
    operator, custom, batch, kube_client, namespace, mlflow_uri, tmp_path
):
    spec = curve_spec(tmp_path / "trace", mlflow_uri)
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("coarse", spec)
    )
    coarse = wait_for_phase(custom, namespace, "coarse", ("Succeeded", "Failed"), 300)
    assert coarse["status"]["phase"] == "Succeeded", coarse["status"]
    coarse_jobs = {j.metadata.name: parameters(j) for j in trial_jobs(batch, namespace, "coarse")}
    assert len(coarse_jobs) == 6

    # The report a tuner reads, from the ConfigMap and the parent run.
    def reported():
        data = (
            client.CoreV1Api(kube_client)
            .read_namespaced_config_map("coarse-report", namespace)
            .data
        )
        rows = list(csv.DictReader(io.StringIO(data["sensitivity.csv"])))
        return data if sum(int(r["count"]) for r in rows if r["parameter"] == "lora_rank") else None

    report = wait_for(reported, 60, "the final report of sweep coarse")
    correlations = list(csv.DictReader(io.StringIO(report["correlations.csv"])))
    assert [(r["parameter"], r["method"], r["count"]) for r in correlations] == [
        ("learning_rate", "spearman", "6"),
        ("lora_rank", "spearman", "6"),
    ]
    assert report["importance.csv"] == "parameter,percent,min_percent,max_percent,signal\n"

    def importance_of_all():
        status = get_sweep(custom, namespace, "coarse")["status"]
        importance = status.get("parameterImportance") or {}
        return importance if importance.get("trials") == 6 else None

    # Computed in the background from the final report's trials, then put in status.
    importance = wait_for(importance_of_all, 60, "the importance of sweep coarse's 6 trials")
    assert importance.get("parameters", []) == []
    assert importance["message"].startswith("computed from 15 scored trials on; 6 so far")
    listed = mlflow_artifacts.list_artifacts(
        run_id=coarse["status"]["mlflow"]["parentRunId"], tracking_uri=mlflow_uri
    )
    assert {
        "learning_curves.png",
        "sensitivity.csv",
        "correlations.csv",
        "importance.csv",
    } <= {a.path for a in listed}

    # `lorasweep refine` prints the narrowed sweep, warm-started from coarse.
    refine = ["refine", "coarse", "-n", namespace, "--top", "3", "--max-trials", "3"]
    printed = subprocess.run(
        [sys.executable, "-m", "sweep_operator.cli", *refine],
        env={**os.environ, "KUBECONFIG": str(devcluster.KUBECONFIG)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed.startswith("# refined from sweep coarse: around its 3 best of 6 succeeded")
    manifest = yaml.safe_load(printed)
    refined = HyperparameterSweep.model_validate(manifest).spec
    assert manifest["metadata"] == {"name": "coarse-refined", "namespace": namespace}
    assert refined.algorithm.warm_start.sweeps == ["coarse"]
    old = spec["parameters"]["learning_rate"]
    new = refined.parameters["learning_rate"]
    assert old["min"] <= new.min < new.max <= old["max"]
    assert math.log(new.max / new.min) < math.log(old["max"] / old["min"])
    best = coarse["status"]["bestTrial"]["parameters"]
    assert in_space(refined.parameters, best) is None

    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    done = wait_for_phase(custom, namespace, "coarse-refined", ("Succeeded", "Failed"), 300)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    inside = [n for n, p in coarse_jobs.items() if in_space(refined.parameters, p) is None]
    assert len(inside) >= 3  # the top three at least
    [said] = sweep_events(kube_client, namespace, "coarse-refined", "WarmStart")
    left_out = 6 - len(inside)
    assert said.message.startswith(
        f"TPE starts from {len(inside)} of the 6 succeeded trials of coarse"
        + (f" ({left_out} outside this sweep's space left out)" if left_out else "")
    )
    assert said.message.endswith("; 0 random startup trials")
    # The refined sweep's own trials, named and counted as usual; the coarse ones unchanged.
    jobs = {j.metadata.name: parameters(j) for j in trial_jobs(batch, namespace, "coarse-refined")}
    assert sorted(jobs) == ["coarse-refined-0000", "coarse-refined-0001", "coarse-refined-0002"]
    assert done["status"]["trials"]["total"] == 3
    assert {j.metadata.name for j in trial_jobs(batch, namespace, "coarse")} == set(coarse_jobs)
    for trial in jobs.values():
        assert in_space(refined.parameters, trial) is None
    # With as many warm-start trials as startupTrials, TPE proposes from the first trial on:
    # not the random draw a sweep without warm start would make.
    assert jobs["coarse-refined-0000"] != trial_parameters(refined, 0)


def test_a_warm_start_from_a_missing_sweep_fails_without_a_job(
    operator, custom, batch, kube_client, namespace, mlflow_uri, tmp_path
):
    spec = curve_spec(tmp_path / "trace", mlflow_uri)
    spec["algorithm"]["warmStart"] = {"sweeps": ["coarse"]}
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, sweep_manifest("orphan", spec)
    )
    status = wait_for_phase(custom, namespace, "orphan", ("Failed", "Succeeded"), 60)["status"]
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "WarmStartNotFound"
    assert status["message"] == (
        "spec.algorithm.warmStart.sweeps[0]: there is no HyperparameterSweep coarse in this "
        "namespace; warm start reads the finished trials of an existing sweep"
    )
    assert sweep_events(kube_client, namespace, "orphan", "WarmStartNotFound")
    assert replanned_with_room(custom, namespace, "orphan", 4)["status"]["phase"] == "Failed"
    assert trial_jobs(batch, namespace, "orphan") == []

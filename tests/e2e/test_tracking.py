"""The operator's MLflow adapter against the real tracking server."""

from __future__ import annotations

import uuid

from mlflow import MlflowClient

from lora_trainer.contract import TAG_SWEEP, TAG_TRIAL
from sweep_operator.tracking import SweepRuns


def test_parent_run_is_found_again_after_a_restart(mlflow_uri):
    experiment, uid = f"tracking-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    first = SweepRuns(mlflow_uri).ensure_parent_run(experiment, "s", "ns", uid)
    # A new SweepRuns is what a restarted operator has: nothing in memory.
    again = SweepRuns(mlflow_uri).ensure_parent_run(experiment, "s", "ns", uid)
    assert again == first
    other = SweepRuns(mlflow_uri).ensure_parent_run(experiment, "s", "ns", str(uuid.uuid4()))
    assert other[0] == first[0] and other[1] != first[1]


def test_trial_results_and_intermediate_values_in_bulk(mlflow_uri):
    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    experiment = mlflow.create_experiment(f"tracking-{uuid.uuid4().hex[:8]}")
    curves = {}
    # More runs than one bulk request may name, so batching is exercised.
    for i in range(105):
        run = mlflow.create_run(experiment, tags={TAG_SWEEP: "s", TAG_TRIAL: f"s-{i:04d}"})
        curve = [(step, 1.0 / (step + 1) + i) for step in range(3)]
        for step, value in curve:
            mlflow.log_metric(run.info.run_id, "eval_loss", value, step=step)
        curves[run.info.run_id] = curve
    runs = SweepRuns(mlflow_uri)

    results = runs.trial_results(experiment, "s")
    assert len(results) == 105
    assert results["s-0007"]["metrics"]["eval_loss"] == curves[results["s-0007"]["run_id"]][-1][1]

    got = runs.intermediate_values(list(curves), "eval_loss")
    assert {run: [(p.step, p.value) for p in points] for run, points in got.items()} == curves
    # ASHA orders the trials that reached a rung by when they logged their value there.
    assert all(p.time > 1.7e9 for points in got.values() for p in points)

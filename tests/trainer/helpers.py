"""Running the trainer as the operator does, and reading what it left in MLflow."""

from __future__ import annotations

import sys
from typing import Any

EXPERIMENT = "trials"


def cli(settings: list[str]) -> list[str]:
    return [sys.executable, "-m", "lora_trainer", *(a for s in settings for a in ("--set", s))]


def runs_of(tracking_uri: str) -> list[Any]:
    """Every run of the test's experiment (see the tracked_env fixture)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])


def steps(tracking_uri: str, run_id: str, metric: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [point.step for point in MlflowClient(tracking_uri).get_metric_history(run_id, metric)]

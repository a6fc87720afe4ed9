"""The trial contract as the e2e trial programs follow it (imported from their own folder,
which Python puts first on their path): a child run under the sweep's parent run, tagged with
the trial, and the final metrics as a TrialResult in the termination message file."""

import os

from mlflow import MlflowClient

from lora_trainer.contract import (
    ENV_MLFLOW_EXPERIMENT_NAME,
    ENV_MLFLOW_PARENT_RUN_ID,
    ENV_SWEEP,
    ENV_TRIAL,
    TAG_PARENT_RUN_ID,
    TAG_SWEEP,
    TAG_TRIAL,
    TrialResult,
    result_path,
)


def start_child_run(mlflow: MlflowClient) -> str:
    """The trial's MLflow run, a child of the sweep's parent run; returns its id."""
    trial = os.environ[ENV_TRIAL]
    experiment = mlflow.get_experiment_by_name(os.environ[ENV_MLFLOW_EXPERIMENT_NAME])
    run = mlflow.create_run(
        experiment.experiment_id,
        run_name=trial,
        tags={
            TAG_PARENT_RUN_ID: os.environ[ENV_MLFLOW_PARENT_RUN_ID],
            TAG_SWEEP: os.environ[ENV_SWEEP],
            TAG_TRIAL: trial,
        },
    )
    return run.info.run_id


def write_result(metrics: dict[str, float], error: str | None = None) -> None:
    result_path(os.environ).write_text(TrialResult(metrics, error).to_json())

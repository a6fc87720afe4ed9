"""The trial contract as the e2e trial programs follow it (imported from their own folder,
which Python puts first on their path): a child run under the sweep's parent run, tagged with
the trial, and the final metrics as JSON in the termination message file."""

import json
import os

from mlflow import MlflowClient


def start_child_run(mlflow: MlflowClient) -> str:
    """The trial's MLflow run, a child of the sweep's parent run; returns its id."""
    trial = os.environ["LORASWEEP_TRIAL"]
    experiment = mlflow.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    run = mlflow.create_run(
        experiment.experiment_id,
        run_name=trial,
        tags={
            "mlflow.parentRunId": os.environ["MLFLOW_PARENT_RUN_ID"],
            "lorasweep.sweep": os.environ["LORASWEEP_SWEEP"],
            "lorasweep.trial": trial,
        },
    )
    return run.info.run_id


def write_result(metrics: dict[str, float]) -> None:
    with open(os.environ["LORASWEEP_RESULT_PATH"], "w") as result:
        json.dump({"metrics": metrics}, result)

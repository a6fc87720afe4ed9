"""The operator's MLflow adapter: the sweep's experiment and parent run, and trial results.

Every call may fail while MLflow is down; callers treat a failure as "not yet" and try again on
the next reconcile, so an outage delays results and loses none. Nothing here is remembered
that MLflow cannot give back: the parent run is found again by the sweep's uid after a restart.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from lora_trainer.contract import (
    ROLE_PARENT,
    TAG_ADAPTER,
    TAG_BEST_TRIAL,
    TAG_NAMESPACE,
    TAG_PARENT_RUN_ID,
    TAG_ROLE,
    TAG_STOPPED,
    TAG_SWEEP,
    TAG_SWEEP_UID,
    TAG_TRIAL,
)
from sweep_operator.trials import Curve, Point

log = logging.getLogger(__name__)

HISTORY_BATCH = 100  # run ids per bulk history request: the tracking server's maximum
RUN_ID_BATCH = 100  # run ids per search by id
HISTORY_MAX_POINTS = 2500  # per run: the server's maximum
HTTP_TIMEOUT_SECONDS = 10


class SweepRuns:
    """A sweep's runs in MLflow: its parent run, which the operator keeps, and its trials'
    runs, which the trials log and the operator reads."""

    def __init__(self, tracking_uri: str) -> None:
        self.uri = tracking_uri.rstrip("/")
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def ensure_parent_run(self, experiment: str, sweep: str, namespace: str, uid: str):
        """(experiment id, parent run id) of the sweep, created on first call."""
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.`{TAG_SWEEP_UID}` = '{uid}' and tags.`{TAG_ROLE}` = '{ROLE_PARENT}'"
            ),
            max_results=1,
        )
        if runs:
            return experiment_id, runs[0].info.run_id
        run = self.client.create_run(
            experiment_id,
            run_name=sweep,
            tags={
                TAG_SWEEP: sweep,
                TAG_NAMESPACE: namespace,
                TAG_SWEEP_UID: uid,
                TAG_ROLE: ROLE_PARENT,
            },
        )
        return experiment_id, run.info.run_id

    def trial_results(
        self,
        experiment_id: str,
        sweep: str,
        started_since: float | None = None,
        parent_run_id: str | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Each trial run's id and metrics, by trial name, in one search: of all the sweep's
        runs, or of those started since `started_since` (seconds since the epoch). With
        `parent_run_id`, runs under another parent run are left out: an earlier sweep of the
        same name logged them (a trial created while MLflow was down has no parent, and
        counts)."""
        query = f"tags.`{TAG_SWEEP}` = '{sweep}'"
        if started_since is not None:
            query += f" and attributes.start_time >= {int(started_since * 1000)}"
        return self._trial_runs(experiment_id, query, parent_run_id)

    def runs_by_id(self, experiment_id: str, run_ids: list[str]) -> dict[str, dict[str, Any]]:
        """These runs' ids and metrics, by trial name: one search per RUN_ID_BATCH runs, not
        one of all the sweep's runs."""
        results: dict[str, dict[str, Any]] = {}
        for start in range(0, len(run_ids), RUN_ID_BATCH):
            ids = ", ".join(f"'{run_id}'" for run_id in run_ids[start : start + RUN_ID_BATCH])
            results |= self._trial_runs(experiment_id, f"attributes.run_id IN ({ids})")
        return results

    def _trial_runs(
        self, experiment_id: str, query: str, parent_run_id: str | None = None
    ) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        page_token = None
        while True:
            # Newest first (MLflow's order): a trial's newest run is the one that counts.
            page = self.client.search_runs(
                [experiment_id], filter_string=query, max_results=1000, page_token=page_token
            )
            for run in page:
                trial = run.data.tags.get(TAG_TRIAL)
                parent = run.data.tags.get(TAG_PARENT_RUN_ID)
                if parent_run_id and parent and parent != parent_run_id:
                    continue
                if trial and trial not in results:
                    results[trial] = {
                        "run_id": run.info.run_id,
                        "metrics": run.data.metrics,
                        "adapter": run.data.tags.get(TAG_ADAPTER),
                    }
            page_token = page.token
            if not page_token:
                return results

    def intermediate_values(self, run_ids: list[str], metric: str) -> dict[str, Curve]:
        """Each run's history of one metric: one request per 100 runs (the server's limit),
        not one per run, however many trials are running."""
        curves: dict[str, Curve] = {run_id: [] for run_id in run_ids}
        for start in range(0, len(run_ids), HISTORY_BATCH):
            response = requests.get(
                f"{self.uri}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
                params={
                    "run_ids": run_ids[start : start + HISTORY_BATCH],
                    "metric_key": metric,
                    "max_results": HISTORY_MAX_POINTS,
                },
                timeout=HTTP_TIMEOUT_SECONDS,
            )
            response.raise_for_status()
            for point in response.json().get("metrics", []):
                curves[point["run_id"]].append(
                    Point(
                        step=int(point.get("step", 0)),
                        value=float(point["value"]),
                        time=int(point.get("timestamp", 0)) / 1000,
                    )
                )
        return {run_id: sorted(points) for run_id, points in curves.items()}

    def mark_stopped(self, run_id: str, reason: str) -> None:
        """End a stopped trial's run KILLED (the trainer does so itself on SIGTERM; a program
        that does not is ended here), then say on it why the operator stopped it. The reason
        comes last because it marks the run as handled: whoever reads it reads a run that has
        ended."""
        run = self.client.get_run(run_id)
        if run.info.status == RunStatus.to_string(RunStatus.RUNNING):
            self.client.set_terminated(run_id, "KILLED")
        self.client.set_tag(run_id, TAG_STOPPED, reason[:5000])

    def log_report(
        self, run_id: str, files: dict[str, str | bytes], importance: dict[str, float]
    ) -> None:
        """The sweep's report files as artifacts of its parent run (overwritten on refresh),
        and parameter importance in percent as metrics (params could not be updated)."""
        # MlflowClient.log_artifact resolves a proxied (mlflow-artifacts:) store against the
        # process-wide tracking URI, not the client's; a sweep may name its own server.
        artifacts = get_artifact_repository(
            self.client.get_run(run_id).info.artifact_uri, tracking_uri=self.uri
        )
        with tempfile.TemporaryDirectory() as folder:
            for name, content in files.items():
                path = Path(folder) / name
                if isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(content)
                artifacts.log_artifact(str(path))
        for name, value in importance.items():
            self.client.log_metric(run_id, f"importance.{name}", value)

    def close_parent_run(self, run_id: str, best: dict[str, Any] | None, phase: str) -> None:
        """Record the best trial on the parent run and end it; a no-op once it has ended."""
        run = self.client.get_run(run_id)
        if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
            return
        if best is not None:
            for name, value in best["parameters"].items():
                self.client.log_param(run_id, f"best.{name}", value)
            self.client.log_metric(run_id, "best_value", best["value"])
            self.client.set_tag(run_id, TAG_BEST_TRIAL, best["name"])
        status = "FINISHED" if phase == "Succeeded" else "FAILED"
        self.client.set_terminated(run_id, status)

    def register_adapter(
        self, model_name: str, run_id: str, artifact_path: str, tags: dict[str, str]
    ) -> str:
        """`models:/NAME/VERSION` of a run's adapter, registered as a new version of the model
        on the first call; later calls (a restarted operator) find that version again."""
        versions = self.client.search_model_versions(
            f"name = '{model_name}' and run_id = '{run_id}'"
        )
        if versions:
            return f"models:/{model_name}/{versions[0].version}"
        try:
            self.client.create_registered_model(model_name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(model_name, source, run_id=run_id, tags=tags)
        return f"models:/{model_name}/{version.version}"

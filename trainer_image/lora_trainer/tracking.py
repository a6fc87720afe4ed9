"""The trial's MLflow run, logged so that it never stops training, and the termination
message for the operator."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_trainer.contract import (
    ENV_MLFLOW_EXPERIMENT_NAME,
    ENV_MLFLOW_PARENT_RUN_ID,
    ENV_MLFLOW_TRACKING_URI,
    ENV_SWEEP,
    ENV_TRIAL,
    TAG_PARENT_RUN_ID,
    TAG_SWEEP,
    TAG_TRIAL,
    TrialResult,
    finite_metrics,
)

log = logging.getLogger("lora_trainer")

# Fail over to "no tracking" after this many failed calls in a row.
MAX_CONSECUTIVE_FAILURES = 3


class TrialRun:
    """The trial's one MLflow run, under the sweep's parent run and tagged with the sweep and
    trial the operator named in the environment. Every call is best effort: a tracking outage
    costs the record, never the training, and the termination message still carries the
    result."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.tracking_uri = environ.get(ENV_MLFLOW_TRACKING_URI, "").strip()
        self.experiment_name = environ.get(ENV_MLFLOW_EXPERIMENT_NAME, "").strip()
        self.parent_run_id = environ.get(ENV_MLFLOW_PARENT_RUN_ID, "").strip()
        self.sweep = environ.get(ENV_SWEEP, "")
        self.trial = environ.get(ENV_TRIAL, "")
        self.run_id: str | None = None
        # What an earlier attempt at the same trial left in the run this one continues.
        self.earlier_tags: dict[str, str] = {}
        self.earlier_params: dict[str, str] = {}
        self.logged_through: dict[str, int] = {}  # metric -> last step logged
        # The last value of each metric and its step, sent or not: a stopped run's result.
        self.latest: dict[str, float] = {}
        self._held = False
        self._held_metrics: list[Any] = []  # logged while held, sent by `end`
        self._client: Any = None
        self._failures = 0

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    def start(self, tags: Mapping[str, str]) -> None:
        """Create the trial's run, or continue the one an earlier attempt at the same trial
        left (a restarted pod): one run per trial, with one curve."""
        if not self.tracking_uri:
            log.info("%s is not set: not logging to MLflow", ENV_MLFLOW_TRACKING_URI)
            return
        # MLflow's defaults retry a dead server for minutes per call; a trial should not wait
        # that long before it starts training without tracking. Users can still override these.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.tracking_uri)
            experiment_id = self._experiment_id(client)
            run_name = self.trial or "lora-trainer"
            all_tags = {
                "mlflow.runName": run_name,
                TAG_SWEEP: self.sweep,
                TAG_TRIAL: self.trial,
                **tags,
            }
            if self.parent_run_id:
                all_tags[TAG_PARENT_RUN_ID] = self.parent_run_id
            run = self._earlier_run(client, experiment_id, all_tags)
            if run is None:
                run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
            else:
                client.update_run(run.info.run_id, status="RUNNING")
                client.log_batch(run.info.run_id, tags=_run_tags(all_tags))
                self.logged_through = _last_logged_steps(client, run)
                self.earlier_tags = dict(run.data.tags)
                self.earlier_params = dict(run.data.params)
        except Exception as exc:
            log.warning(
                "MLflow at %s is unreachable (%s); training continues without tracking",
                self.tracking_uri,
                exc,
            )
            return
        self._client = client
        self.run_id = run.info.run_id
        continued = " (continued)" if self.earlier_tags else ""
        log.info("MLflow run %s%s in experiment %s", self.run_id, continued, experiment_id)

    def _earlier_run(self, client: Any, experiment_id: str, tags: Mapping[str, str]) -> Any:
        keys = [TAG_SWEEP, TAG_TRIAL, TAG_PARENT_RUN_ID]
        values = {key: tags[key] for key in keys if tags.get(key)}
        # Kubernetes names never hold a quote; a name that does cannot go into a filter string.
        if TAG_TRIAL not in values or any("'" in value for value in values.values()):
            return None
        conditions = [f"tags.`{key}` = '{value}'" for key, value in values.items()]
        found = client.search_runs(
            [experiment_id],
            filter_string=" and ".join(conditions),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return found[0] if found else None

    def _experiment_id(self, client: Any) -> str:
        # A child run must live in its parent's experiment to be shown under it.
        if self.parent_run_id:
            return client.get_run(self.parent_run_id).info.experiment_id
        if not self.experiment_name:
            return "0"
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(self.experiment_name)
        except Exception:
            # Parallel trials race to create the sweep's experiment; one of them wins.
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def hold(self) -> None:
        """Send nothing more until `end` (metrics wait for it): the run is stopping, and its
        result must not wait behind a slow or hung tracking server."""
        self._held = True

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> bool:
        """Whether the call succeeded."""
        if not self.active or self._held:
            return False
        try:
            getattr(self._client, method)(self.run_id, *args, **kwargs)
            self._failures = 0
            return True
        except Exception as exc:
            self._failures += 1
            log.warning("MLflow: could not log %s: %s", what, exc)
            if self._failures >= MAX_CONSECUTIVE_FAILURES:
                log.warning("MLflow keeps failing; no more tracking for this run")
                self._client = None
            return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        texts = {key: "" if value is None else str(value) for key, value in params.items()}
        # MLflow params cannot change; a continued run keeps the values it was started with.
        changed = [k for k, v in texts.items() if self.earlier_params.get(k, v) != v]
        if changed:
            log.warning("continuing the MLflow run with changed settings: %s", ", ".join(changed))
        items = [Param(k, v) for k, v in texts.items() if k not in self.earlier_params]
        for start in range(0, len(items), 100):  # MLflow's batch limit for params
            self._call("params", "log_batch", params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call("tags", "log_batch", tags=_run_tags(tags))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.latest |= {**finite_metrics(metrics), "train_steps": float(step)}
        # A resumed run repeats the steps between its checkpoint and where the earlier attempt
        # stopped; the curve already has them.
        items = [
            Metric(k, v, now, step)
            for k, v in finite_metrics(metrics).items()
            if step > self.logged_through.get(k, -1)
        ]
        if items and self._held:
            self._held_metrics += items
        elif items:
            self._call("metrics", "log_batch", metrics=items)

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> bool:
        """Upload a folder's files to the run; whether they all arrived."""
        return self._call("artifacts", "log_artifacts", str(local_dir), artifact_path)

    def end(self, status: str) -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        self._held = False
        if self.run_id is None:
            return
        if self._held_metrics and self.active:
            self._call("metrics", "log_batch", metrics=self._held_metrics)
        if (
            self._client is None
        ):  # tracking gave up mid-run: one last try, so it is not left RUNNING
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self._call("run status", "set_terminated", status=status)


def _run_tags(tags: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(key, str(value)) for key, value in tags.items()]


def _last_logged_steps(client: Any, run: Any) -> dict[str, int]:
    return {
        key: max(
            (point.step for point in client.get_metric_history(run.info.run_id, key)), default=-1
        )
        for key in run.data.metrics
    }


def write_result(
    path: Path, metrics: Mapping[str, Any] | None = None, error: str | None = None
) -> None:
    """Write the TrialResult where the kubelet reads it."""
    text = TrialResult(dict(metrics or {}), error).to_json()
    try:
        path.write_text(text)
    except OSError as exc:
        log.warning("could not write the result to %s: %s", path, exc)

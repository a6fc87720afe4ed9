"""MLflow logging that never stops training, and the termination message for the operator."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("lora_trainer")

RESULT_PATH_ENV = "LORASWEEP_RESULT_PATH"
DEFAULT_RESULT_PATH = "/dev/termination-log"
# Kubernetes keeps at most 4096 bytes of a termination message.
RESULT_LIMIT_BYTES = 4096
# Fail over to "no tracking" after this many failed calls in a row.
MAX_CONSECUTIVE_FAILURES = 3


def _finite_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    result = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            result[key] = float(value)
    return result


class Tracker:
    """One MLflow run per trial. Every call is best effort: a tracking outage costs the record,
    never the training, and the termination message still carries the result."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.tracking_uri = environ.get("MLFLOW_TRACKING_URI", "").strip()
        self.experiment_name = environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
        self.parent_run_id = environ.get("MLFLOW_PARENT_RUN_ID", "").strip()
        self.run_id: str | None = None
        self._client: Any = None
        self._failures = 0

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    def start(self, run_name: str, tags: Mapping[str, str]) -> None:
        if not self.tracking_uri:
            log.info("MLFLOW_TRACKING_URI is not set: not logging to MLflow")
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
            all_tags = {"mlflow.runName": run_name, **tags}
            if self.parent_run_id:
                all_tags["mlflow.parentRunId"] = self.parent_run_id
            run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        except Exception as exc:
            log.warning(
                "MLflow at %s is unreachable (%s); training continues without tracking",
                self.tracking_uri,
                exc,
            )
            return
        self._client = client
        self.run_id = run.info.run_id
        log.info("MLflow run %s in experiment %s", self.run_id, experiment_id)

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

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> None:
        if not self.active:
            return
        try:
            getattr(self._client, method)(self.run_id, *args, **kwargs)
            self._failures = 0
        except Exception as exc:
            self._failures += 1
            log.warning("MLflow: could not log %s: %s", what, exc)
            if self._failures >= MAX_CONSECUTIVE_FAILURES:
                log.warning("MLflow keeps failing; no more tracking for this run")
                self._client = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, "" if value is None else str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit for params
            self._call("params", "log_batch", params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(key, str(value)) for key, value in tags.items()]
        self._call("tags", "log_batch", tags=items)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in _finite_floats(metrics).items()]
        if items:
            self._call("metrics", "log_batch", metrics=items)

    def end(self, status: str) -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        if self.run_id is None:
            return
        if (
            self._client is None
        ):  # tracking gave up mid-run: one last try, so it is not left RUNNING
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self._call("run status", "set_terminated", status=status)


def result_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get(RESULT_PATH_ENV) or DEFAULT_RESULT_PATH)


def write_result(
    path: Path, metrics: Mapping[str, Any] | None = None, error: str | None = None
) -> None:
    """Write `{"metrics": {...}}` (and the error, if any) where the kubelet reads it."""
    payload: dict[str, Any] = {"metrics": _finite_floats(metrics or {})}
    if error:
        payload["error"] = error[:1500]
    text = json.dumps(payload, separators=(",", ":"))
    while len(text.encode()) > RESULT_LIMIT_BYTES and payload["metrics"]:
        payload["metrics"].popitem()
        text = json.dumps(payload, separators=(",", ":"))
    try:
        path.write_text(text)
    except OSError as exc:
        log.warning("could not write the result to %s: %s", path, exc)

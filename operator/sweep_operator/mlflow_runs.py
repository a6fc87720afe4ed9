"""What the reconciler reads from and writes to MLflow for one sweep, with its caches.

A finished trial's run does not change, so its results and curves are read once and kept;
MLflow being down only delays them (each call logs a warning and is tried again on a later
reconcile). The caches are not state: a restarted operator reads the same again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from lora_trainer.contract import TAG_NAMESPACE, TAG_SWEEP, TAG_TRIAL
from sweep_operator.api import MlflowStatus, SweepSpec, SweepStatus
from sweep_operator.naming import experiment_name, experiment_url
from sweep_operator.observation import TrialRun
from sweep_operator.tracking import SweepRuns
from sweep_operator.trials import Curve, ObservedTrial, TrialState

# Observes a sweep's trials given MLflow's results by trial (observe.observe_trial per Job).
Observe = Callable[[dict[str, dict[str, Any]]], list[ObservedTrial]]


class RunsCache:
    """One sweep's MLflow runs as the operator sees them."""

    def __init__(self, uri: str, logger: logging.Logger) -> None:
        self.uri = uri
        self.tracker = SweepRuns(uri)
        self.logger = logger
        self.results: dict[str, dict[str, Any]] = {}  # MLflow results by trial
        self.searched: set[str] = set()  # finished trials MLflow was already asked about
        self.curves: dict[str, dict[str, Curve]] = {}  # final curves of finished trials
        self.registered: dict[str, str] = {}  # trial -> models:/ URI of its registered adapter
        self.tagged: set[str] = set()  # stopped trials whose run says why
        self.parent_closed = False

    def parent_run(
        self, spec: SweepSpec, name: str, namespace: str, uid: str
    ) -> MlflowStatus | None:
        """The sweep's experiment and parent run, created on first call; None while MLflow
        cannot be reached (trials still run, results come later)."""
        experiment = experiment_name(
            namespace, name, spec.mlflow.experiment_name if spec.mlflow else None
        )
        try:
            experiment_id, run_id = self.tracker.ensure_parent_run(experiment, name, namespace, uid)
        except Exception as error:
            self.logger.warning("MLflow unreachable, will retry: %s", error)
            return None
        return MlflowStatus(
            experiment_id=experiment_id,
            parent_run_id=run_id,
            url=experiment_url(self.uri, experiment_id),
        )

    def observe(
        self, spec: SweepSpec, sweep: str, experiment_id: str | None, observe: Observe
    ) -> list[ObservedTrial]:
        """The trials with their MLflow results (and their curves, with early stopping). A
        finished trial's final run data does not change: MLflow is searched (once for the
        whole sweep) when trials finished without a run id or objective since the last time."""
        observed = observe(self.results)
        wanted = {
            t.name
            for t in observed
            if not t.state.active
            and (t.mlflow_run_id is None or (t.state == TrialState.SUCCEEDED and t.value is None))
        }
        if wanted - self.searched and experiment_id and self._search(experiment_id, sweep):
            self.searched |= wanted
            observed = observe(self.results)
        if spec.early_stopping:
            if experiment_id and any(
                t.state.active and t.name not in self.results for t in observed
            ):
                self._search(experiment_id, sweep)
            observed = self.with_curves(spec, observed)
        return observed

    def _search(self, experiment_id: str, sweep: str) -> bool:
        try:
            self.results.update(self.tracker.trial_results(experiment_id, sweep))
        except Exception as error:
            self.logger.warning("cannot read trial results from MLflow yet: %s", error)
            return False
        return True

    def with_curves(self, spec: SweepSpec, observed: list[ObservedTrial]) -> list[ObservedTrial]:
        """Intermediate objective values from MLflow (one bulk read per 100 runs per metric).
        A finished trial's curve is read once more after it ends, then kept."""
        wanted = {
            t.name: self.results[t.name]["run_id"]
            for t in observed
            if t.name in self.results and t.name not in self.curves
        }
        if not wanted:
            return [t.model_copy(update={"curves": self.curves.get(t.name, {})}) for t in observed]
        metrics = {spec.objective.metric, *(m.name for m in spec.objective.metrics or [])}
        fetched: dict[str, dict[str, Curve]] = defaultdict(dict)
        try:
            for metric in sorted(metrics):
                by_run = self.tracker.intermediate_values(list(wanted.values()), metric)
                for trial, run_id in wanted.items():
                    fetched[trial][metric] = by_run.get(run_id, [])
        except Exception as error:
            self.logger.warning("cannot read intermediate values from MLflow yet: %s", error)
        updated = []
        for trial in observed:
            curves = self.curves.get(trial.name) or fetched.get(trial.name, {})
            if trial.name in fetched and not trial.state.active:
                self.curves[trial.name] = curves
            updated.append(trial.model_copy(update={"curves": curves}))
        return updated

    def runs(self) -> dict[str, TrialRun]:
        """The trials' runs as the plan reads them."""
        return {
            trial: TrialRun(run_id=run["run_id"], adapter=run.get("adapter"))
            for trial, run in self.results.items()
        }

    def tag_stopped(self, reasons: dict[str, str]) -> None:
        """Tag each stopped trial's run with why it was stopped."""
        for trial, reason in reasons.items():
            try:
                self.tracker.mark_stopped(self.results[trial]["run_id"], reason)
            except Exception as error:
                self.logger.warning("cannot mark %s stopped in MLflow yet: %s", trial, error)
                return
            self.tagged.add(trial)

    def register_adapter(self, model: str, trial: str, sweep: str, namespace: str) -> None:
        """Register the trial's uploaded adapter as a new version of `model`."""
        run = self.results[trial]
        tags = {TAG_SWEEP: sweep, TAG_NAMESPACE: namespace, TAG_TRIAL: trial}
        try:
            self.registered[trial] = self.tracker.register_adapter(
                model, run["run_id"], run["adapter"], tags
            )
        except Exception as error:
            self.logger.warning("cannot register the best adapter in MLflow yet: %s", error)

    def close_parent_run(self, status: SweepStatus) -> None:
        """End the parent run with the sweep's outcome and best trial."""
        parent = status.mlflow.parent_run_id if status.mlflow else None
        if parent is None:
            return
        best = status.best_trial.model_dump() if status.best_trial else None
        try:
            self.tracker.close_parent_run(parent, best, status.phase)
        except Exception as error:
            self.logger.warning("cannot close the MLflow parent run yet: %s", error)
            return
        self.parent_closed = True

    def log_report(
        self, status: SweepStatus, files: dict[str, str | bytes], importance: dict[str, float]
    ) -> None:
        """The report's files as artifacts of the parent run, importance as its metrics."""
        parent = status.mlflow.parent_run_id if status.mlflow else None
        if parent:
            self.tracker.log_report(parent, files, importance)


def results_of(uri: str, experiment_id: str, sweep: str) -> dict[str, dict[str, Any]]:
    """Every trial run's results of another sweep (a warm start's), read once."""
    return SweepRuns(uri).trial_results(experiment_id, sweep)

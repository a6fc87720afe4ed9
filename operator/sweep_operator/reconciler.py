"""One sweep's reconcile: gather an Observation, `plan.plan` it, carry the Plan out.

Reconcile is level-based: whatever happened while the operator was down, the same cluster and
MLflow give the same plan, and a trial created twice is refused by the apiserver (its name is
deterministic), so none is duplicated. The reconciler's fields are caches and memory of what it
already said or did, never state a restart would lose.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client
from pydantic import ValidationError

from sweep_operator.api import SweepSpec, SweepStatus
from sweep_operator.defaults import trial_defaults
from sweep_operator.kube_writes import (
    Creation,
    Creations,
    EventOutbox,
    SweepWriter,
    post_events,
)
from sweep_operator.kueue import Kueue
from sweep_operator.mlflow_runs import RunsCache, results_of
from sweep_operator.naming import label_value
from sweep_operator.objective import objective_values
from sweep_operator.observation import Memory, Observation
from sweep_operator.observe import TrialMemo, owned_by, trials_observer
from sweep_operator.plan import TERMINAL, Plan, SweepEvent, format_parameters, plan
from sweep_operator.render import RenderError, SweepRef
from sweep_operator.report_publisher import ReportPublisher
from sweep_operator.semantic import SweepInvalid, validate_sweep
from sweep_operator.trial_plan import failed_status
from sweep_operator.trials import FetchState, NewTrial, ObservedFetch, TrialState
from sweep_operator.warm_start import ENDED, Source, WarmStart, warm_start

# Default tracking server for sweeps that name none (set by the Helm chart).
DEFAULT_TRACKING_URI_ENV = "LORASWEEP_MLFLOW_TRACKING_URI"


@dataclass(frozen=True)
class Indexes:
    """The kopf indexes of every sweep, its trial Jobs and their pods, for what a sweep reads
    of other sweeps (its warm start)."""

    sweeps: Any
    jobs: Any
    pods: Any


class Reconciler:
    def __init__(self, api: client.ApiClient, logger: logging.Logger) -> None:
        self.logger = logger
        self.writer = SweepWriter(api)
        self.creations = Creations()
        self.events = EventOutbox()
        self.kueue = Kueue(api, logger)
        self.report = ReportPublisher(logger)
        self.runs: RunsCache | None = None
        self.observed = TrialMemo()  # the last observation of each trial
        self.created: dict[str, NewTrial] = {}  # created here (or being), not yet indexed
        self.said_taken: set[str] = set()  # trial names it warned are another owner's Job's
        self.said_refused: set[tuple[str, str]] = set()  # (trial, apiserver's reason) warned
        self.deadline: datetime | None = None  # when the time budget runs out
        self.again = False  # plan again at once: the last one's outcome changes the status
        self.recheck_after: float | None = None  # plan again this soon, though nothing changes
        # What it already saw and said (Memory), field by field.
        self.states: dict[str, TrialState] | None = None
        self.fetch_state: FetchState | None = None
        self.warm_summary = ""
        self.reported: tuple[int, str] | None = None
        self.reported_at = -float("inf")
        # MLflow results of warm-start sweeps' trials, by sweep: read once (they have ended).
        self.warm_results: dict[str, dict[str, dict[str, Any]]] = {}

    def reconcile(
        self,
        body: kopf.Body,
        jobs: list[dict],
        pods: list[dict],
        fetch: ObservedFetch,
        indexes: Indexes,
    ) -> None:
        now = datetime.now(UTC)
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        self._post(body, [])  # those held, when due
        previous = _stored_status(body)
        sweep = SweepRef(name=name, namespace=namespace, uid=meta["uid"])
        try:
            raw_spec = trial_defaults().apply(_plain(body.get("spec") or {}))
            spec = validate_sweep(raw_spec, sweep)
        except SweepInvalid as error:
            self._refuse(body, error.reason, str(error), now, previous)
            return

        # Created, unless its name is taken by a Job: ours, or an earlier sweep's of the same name
        # not yet deleted (creating it again gets 409 until the garbage collector is done).
        taken = {job["name"] for job in jobs}
        self.created = {n: t for n, t in self.created.items() if n not in taken}
        jobs = owned_by(jobs, meta["uid"])
        taken_elsewhere = taken - {job["name"] for job in jobs}
        answered = self._answered(self.creations.collect(), taken_elsewhere)
        observation = self._observe(spec, body, previous, jobs, pods, fetch, indexes)
        result = plan(spec, observation, previous, now)
        # MLflow is read outside the reconcile (RunsCache), except when this plan would settle
        # the sweep's outcome while trials' results are missing: nothing is left to create.
        runs = self.runs
        concludes = result.status.phase in TERMINAL or result.register_adapter is not None
        if concludes and runs is not None and runs.read_results():
            observation = self._observe(spec, body, previous, jobs, pods, fetch, indexes)
            result = plan(spec, observation, previous, now)
        try:
            self._carry_out(body, sweep, spec, observation, result, jobs, answered)
        except RenderError as error:
            self._refuse(body, "InvalidTemplate", str(error), now, previous)
            return
        self._remember(observation, result)
        self.writer.patch_status(body, result.status, previous)

    # --- observe ---------------------------------------------------------------------------

    def _observe(
        self,
        spec: SweepSpec,
        body: kopf.Body,
        previous: SweepStatus | None,
        jobs: list[dict],
        pods: list[dict],
        fetch: ObservedFetch,
        indexes: Indexes,
    ) -> Observation:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        tracking_uri = spec.mlflow.tracking_uri if spec.mlflow else None
        tracking_uri = tracking_uri or os.environ.get(DEFAULT_TRACKING_URI_ENV)
        runs = self._runs(tracking_uri)
        mlflow = previous.mlflow if previous and previous.mlflow else None
        if runs and not (mlflow and mlflow.parent_run_id):
            mlflow = runs.parent_run(spec, name, namespace, meta["uid"])
        observe = trials_observer(jobs, pods, spec.objective.metric, self.observed)
        trials = runs.observe(spec, name, mlflow, observe) if runs else observe({})
        if self.report.collect_importance() or self.report.failed():
            self.reported = None  # published again: with the new importance, or at all
        return Observation(
            sweep=name,
            generation=meta.get("generation"),
            trials=trials,
            unindexed=list(self.created.values()),
            fetch=fetch if spec.trainer.model_cache is not None else None,
            warm=self._warm_start(spec, namespace, name, indexes),
            mlflow=mlflow,
            tracking_uri=tracking_uri if runs else None,
            runs=runs.runs() if runs else {},
            memory=Memory(
                states=self.states,
                fetch_state=self.fetch_state,
                warm_summary=self.warm_summary,
                reported=self.reported,
                report_age=time.monotonic() - self.reported_at,
                importance=self.report.importance,
                registered=dict(runs.registered) if runs else {},
                tagged=runs.tagged if runs else frozenset(),
                parent_closed=runs.parent_closed if runs else False,
            ),
        )

    def _runs(self, uri: str | None) -> RunsCache | None:
        if not uri:
            self.runs = None
            return None
        if self.runs is None or self.runs.uri != uri:
            self.runs = RunsCache(uri, self.logger)
        return self.runs

    def _warm_start(
        self, spec: SweepSpec, namespace: str, name: str, indexes: Indexes
    ) -> WarmStart | None:
        """The warm-start history of spec.algorithm.warmStart, from the indexes (and MLflow for
        results no pod holds any more); None without a warm start."""
        if spec.algorithm.warm_start is None:
            return None
        sources = [
            self._warm_source(spec, namespace, source, indexes)
            for source in spec.algorithm.warm_start.sweeps
        ]
        others = [n for ns, n in indexes.sweeps if ns == namespace and n != name]
        return warm_start(spec, sources, others)

    def _warm_source(self, spec: SweepSpec, namespace: str, name: str, indexes: Indexes) -> Source:
        """One earlier sweep's trials, observed as the sweep's own are, scored by this sweep's
        objective."""
        summaries = list(indexes.sweeps.get((namespace, name), []))
        if not summaries:
            return Source(name=name, phase=None)
        summary = summaries[0]
        key = (namespace, label_value(name))
        observe = trials_observer(
            list(indexes.jobs.get(key, [])), list(indexes.pods.get(key, [])), spec.objective.metric
        )

        trials = observe(self.warm_results.get(name, {}))
        # A result that is in no pod (deleted pods) may be in MLflow: asked once, after the
        # sweep ended, when its results are final.
        unscored = any(
            t.state == TrialState.SUCCEEDED and objective_values(spec, t) is None for t in trials
        )
        uri = summary["tracking_uri"] or os.environ.get(DEFAULT_TRACKING_URI_ENV)
        experiment = summary["experiment_id"]
        ended = summary["phase"] in ENDED
        if ended and unscored and name not in self.warm_results and uri and experiment:
            try:
                self.warm_results[name] = results_of(uri, experiment, name)
            except Exception as error:
                return Source(
                    name=name,
                    phase=summary["phase"],
                    unreadable=f"cannot read its trials' results from MLflow yet: {error}",
                )
            trials = observe(self.warm_results[name])
        return Source(name=name, phase=summary["phase"], trials=trials)

    # --- act -------------------------------------------------------------------------------

    def _carry_out(
        self,
        body: kopf.Body,
        sweep: SweepRef,
        spec: SweepSpec,
        observation: Observation,
        result: Plan,
        jobs: list[dict],
        answered: list[SweepEvent],
    ) -> None:
        """Carry the plan out; `answered`: the Events of the creations the apiserver answered
        since the last reconcile."""
        events = list(answered)
        if result.fetch_model:
            fetch_job = self.writer.create_fetch_job(sweep, spec)
            if fetch_job:
                claim = spec.trainer.model_cache.claim_name if spec.trainer.model_cache else ""
                detail = (
                    f"downloading model {spec.trainer.model} into PersistentVolumeClaim {claim}"
                )
                events.append(SweepEvent("FetchingModel", fetch_job, detail))
        self._post(body, events)  # before a template that does not render ends it
        mlflow = result.status.mlflow
        parent = mlflow.parent_run_id if mlflow else None
        self.writer.create_trials(
            sweep, spec, result.create, observation.tracking_uri, parent, self.creations
        )
        self.created.update({t.name: t for t in result.create})
        queued = bool(spec.trainer.queue_name)
        # A trial whose creation has not started is not created; the others are stopped.
        for name in self.creations.withdraw(result.stop):
            self.created.pop(name, None)
        self.writer.stop_trials(sweep.namespace, result.stop, queued)
        if queued:
            self.kueue.release(sweep.namespace, jobs, list(result.stop))
            self.kueue.waiting_event(body, spec, sweep.namespace, jobs, list(observation.trials))
        runs = self.runs  # None without a tracking URI (_runs)
        if runs is not None:
            runs.to_tag = result.tag_stopped  # by catch_up, after this reconcile
            if result.register_adapter and spec.mlflow and spec.mlflow.registered_model:
                runs.register_adapter(
                    spec.mlflow.registered_model,
                    result.register_adapter,
                    sweep.name,
                    sweep.namespace,
                )
        self._post(body, result.events, last=result.status.phase in TERMINAL)
        # The last report is published here, before the parent run is closed: whoever waits
        # for the run to end reads the whole report.
        if result.report is not None and self.report.publish(
            self.writer,
            runs,
            sweep,
            spec,
            list(observation.trials),
            result.status,
            at_once=result.close_parent_run,
        ):
            self.reported = result.report
            self.reported_at = time.monotonic()
        # Not while an earlier report is being published (the daemon wakes the sweep then).
        if runs is not None and result.close_parent_run and not self.report.publishing_now:
            runs.close_parent_run(result.status)

    def _post(self, body: kopf.Body, events: list[SweepEvent], last: bool = False) -> None:
        post_events(body, self.events.add(events, time.monotonic(), last))

    def _answered(self, creation: Creation, taken_elsewhere: set[str]) -> list[SweepEvent]:
        """Settle the trials the apiserver answered for: those not created are planned again.
        The Events of what became of each."""
        # One whose name another owner's Job holds is planned again too: that Job may be
        # deleted by the next reconcile. A 409 on the sweep's own Job (not indexed yet) is not,
        # and neither is a creation not answered yet.
        taken = {t.name for t in creation.taken}
        dropped = {*creation.refused, *creation.unanswered, *creation.broken}
        for name in dropped | taken:
            self.created.pop(name, None)
        for name, error in creation.broken.items():
            self.logger.error("creating trial %s failed", name, exc_info=error)
        if creation.unanswered:
            name, error = next(iter(creation.unanswered.items()))
            self.logger.warning(
                "the apiserver did not answer the creation of %d trials (%s: %s); planned again",
                len(creation.unanswered),
                name,
                error,
            )
        # Only what was created now: a 409 is a trial created before a restart.
        events = [
            SweepEvent("TrialCreated", t.name, format_parameters(t.parameters))
            for t in creation.created
        ]
        # Once per reason: a refused trial is tried again at every reconcile.
        refused = set(creation.refused.items()) - self.said_refused
        self.said_refused |= refused
        events += [
            SweepEvent("TrialCreateFailed", name, f"its Job was refused: {why}", "Warning")
            for name, why in sorted(refused)
        ]
        # A Job of the trial's name owned by no sweep or another: usually an earlier sweep of
        # this name deleted with its Jobs orphaned. Creating it gets 409 until it is deleted.
        blocked = (taken & taken_elsewhere) - self.said_taken
        self.said_taken |= blocked
        events += [
            SweepEvent(
                "TrialNameTaken",
                name,
                "a Job of this name exists and is not this sweep's (one of an earlier sweep of "
                "this name, orphaned?); the trial waits until it is deleted",
                "Warning",
            )
            for name in sorted(blocked)
        ]
        return events

    @property
    def mlflow_pending(self) -> bool:
        """Whether the last reconcile left MLflow work (RunsCache.catch_up)."""
        return self.runs is not None and self.runs.pending

    def catch_up_mlflow(self) -> bool:
        """The MLflow work the last reconcile left, done now (outside the reconcile): whether
        anything came of it, and the sweep should plan again with it."""
        return self.runs is not None and self.runs.catch_up()

    def _remember(self, observation: Observation, result: Plan) -> None:
        self.deadline = result.deadline
        self.again = result.register_adapter is not None
        self.recheck_after = result.recheck_after
        self.states = {t.name: t.state for t in observation.trials}
        if observation.fetch is not None:
            self.fetch_state = observation.fetch.state
        if observation.warm is not None and observation.warm.summary:
            self.warm_summary = observation.warm.summary

    def _refuse(
        self,
        body: kopf.Body,
        reason: str,
        message: str,
        now: datetime,
        previous: SweepStatus | None,
    ) -> None:
        status = failed_status(
            reason, message, now, generation=body["metadata"].get("generation"), previous=previous
        )
        if self.writer.patch_status(body, status, previous):
            kopf.warn(body, reason=reason, message=message)


def _stored_status(body: kopf.Body) -> SweepStatus | None:
    stored = body.get("status")
    if not stored:
        return None
    try:
        return SweepStatus.model_validate(dict(stored))
    except ValidationError:
        return None


def _plain(value: Any) -> Any:
    """kopf's live body views as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value

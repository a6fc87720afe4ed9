"""The whole policy of one reconcile: an Observation in, a Plan out. Pure, no I/O.

The adapters gather what the cluster and MLflow hold (`observation.Observation`, with what the
reconciler remembers of its own earlier reconciles); `plan` decides everything from it: the
trials to create and stop (`trial_plan.plan_trials`), the complete status, the Events, whether
the report is due, the MLflow work (closing the parent run, tagging stopped trials' runs,
registering the best adapter). The reconciler carries the Plan out and nothing else.

A restarted operator remembers nothing: it observes the same cluster, plans the same trials
and status, and at worst posts an Event or publishes a report again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sweep_operator.api import SweepSpec, SweepStatus
from sweep_operator.naming import model_fetch_name, run_url
from sweep_operator.observation import Observation
from sweep_operator.trial_plan import conditions, plan_trials, true_reason
from sweep_operator.trials import FetchState, NewTrial, ObservedTrial, TrialState
from sweep_operator.warm_start import NOT_FOUND

# The report (ConfigMap, MLflow artifacts, plots) costs up to a second or two to make.
REPORT_INTERVAL_SECONDS = 60.0
IMPORTANCE_IN_STATUS = 5
# Learning curves reach MLflow without a Kubernetes event to wake the operator: while trials run
# under early stopping it looks again this often, so a trial is judged at its rungs, not after
# it ended.
CURVE_POLL_SECONDS = 2.0
TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class SweepEvent:
    """A Kubernetes Event to post on the sweep: about one of its trials or its model download
    (`subject`, named in the message), or about the sweep itself (subject None)."""

    reason: str
    subject: str | None
    detail: str
    type: str = "Normal"


@dataclass(frozen=True)
class Plan:
    create: list[NewTrial] = field(default_factory=list)  # in index order
    # Trials to stop (Job names, in index order) and why, for their MLflow runs and Events.
    stop: dict[str, str] = field(default_factory=dict)
    status: SweepStatus = field(default_factory=SweepStatus)
    # When the time budget runs out: the operator should reconcile again by then.
    deadline: datetime | None = None
    # Create the Job that downloads the model into spec.trainer.modelCache.
    fetch_model: bool = False
    events: list[SweepEvent] = field(default_factory=list)
    # Publish the report (ConfigMap, parent run artifacts) now: (finished trials, phase), what
    # it reports, for Memory.reported.
    report: tuple[int, str] | None = None
    # Tag the MLflow runs of these stopped trials with why (trial -> reason).
    tag_stopped: dict[str, str] = field(default_factory=dict)
    # Register this trial's adapter as a version of spec.mlflow.registeredModel.
    register_adapter: str | None = None
    close_parent_run: bool = False
    # Reconcile again within this many seconds, though nothing in the cluster changes.
    recheck_after: float | None = None


def plan(
    spec: SweepSpec, observation: Observation, previous: SweepStatus | None, now: datetime
) -> Plan:
    """Every decision of one reconcile. `previous` is the status stored on the sweep."""
    seen = observation.memory
    trials = _with_unindexed(spec, observation)
    decided = plan_trials(
        spec,
        trials,
        now,
        sweep_name=observation.sweep,
        generation=observation.generation,
        previous=previous,
        fetch=observation.fetch,
        warm=observation.warm,
    )
    registered = _registered(observation, previous, decided.status)
    status = _complete_status(observation, decided.status, registered)
    tracked = observation.tracking_uri is not None
    register = _to_register(spec, observation, status, registered)
    if register is not None:
        status = _registering(spec, status, register, now, previous)
    terminal = status.phase in TERMINAL
    parent = status.mlflow.parent_run_id if status.mlflow else None
    return Plan(
        create=decided.create,
        stop=decided.stop,
        status=status,
        deadline=decided.deadline,
        fetch_model=decided.fetch_model,
        events=_events(spec, observation, previous, status),
        report=_report_due(trials, status, observation),
        tag_stopped={
            t.name: t.message or "stopped by the operator"
            for t in trials
            if t.state == TrialState.STOPPED
            and t.name in observation.runs
            and t.name not in seen.tagged
        }
        if tracked
        else {},
        register_adapter=register,
        close_parent_run=terminal and tracked and parent is not None and not seen.parent_closed,
        recheck_after=CURVE_POLL_SECONDS
        if spec.early_stopping and any(t.state == TrialState.RUNNING for t in trials)
        else None,
    )


def _with_unindexed(spec: SweepSpec, observation: Observation) -> list[ObservedTrial]:
    """The observed trials, and those created by this operator that the index has not shown
    yet as waiting: not missing, else they would be planned again, past parallelism."""
    indexed = {t.name for t in observation.trials}
    state = TrialState.QUEUED if spec.trainer.queue_name else TrialState.PENDING
    return [
        *observation.trials,
        *(
            ObservedTrial(name=t.name, index=t.index, parameters=t.parameters, state=state)
            for t in observation.unindexed
            if t.name not in indexed
        ),
    ]


def _registered(
    observation: Observation, previous: SweepStatus | None, status: SweepStatus
) -> str | None:
    """The models:/ URI the best trial's adapter was registered as, by this operator or (from
    the stored status) before a restart."""
    best = status.best_trial
    if best is None:
        return None
    if best.name in observation.memory.registered:
        return observation.memory.registered[best.name]
    stored = previous.best_trial if previous else None
    if stored and stored.name == best.name and (stored.adapter_uri or "").startswith("models:/"):
        return stored.adapter_uri
    return None


def _to_register(
    spec: SweepSpec, observation: Observation, status: SweepStatus, registered: str | None
) -> str | None:
    """The trial whose adapter to register now: the best of a succeeded sweep with
    spec.mlflow.registeredModel, once its run has the adapter, unless it is registered."""
    model = spec.mlflow.registered_model if spec.mlflow else None
    best = status.best_trial
    if not model or observation.tracking_uri is None or best is None or registered:
        return None
    run = observation.runs.get(best.name)
    if status.phase != "Succeeded" or run is None or not run.adapter:
        return None
    return best.name


def _registering(
    spec: SweepSpec, status: SweepStatus, trial: str, now: datetime, previous: SweepStatus | None
) -> SweepStatus:
    """A sweep whose trials are done succeeds once its best adapter is registered (the
    reconciler registers it and plans again at once): its result is then in the registry."""
    model = spec.mlflow.registered_model if spec.mlflow else None
    message = f"{status.message}; registering the adapter of {trial} as a version of {model}"
    generation = status.observed_generation
    return status.model_copy(
        update={
            "phase": "Running",
            "message": message,
            "completion_time": None,
            "conditions": conditions(
                "Running",
                "RegisteringAdapter",
                message,
                now.replace(microsecond=0),
                generation,
                previous,
            ),
        }
    )


def _complete_status(
    observation: Observation, status: SweepStatus, registered: str | None
) -> SweepStatus:
    """The trials' status with what MLflow and the reconciler's background work add: the
    parent run, the best trial's link and adapter, parameter importance."""
    mlflow = observation.mlflow
    update: dict = {"mlflow": mlflow}
    best = status.best_trial
    if best is not None:
        best_update = {}
        uri = observation.tracking_uri
        if uri and mlflow and mlflow.experiment_id and best.mlflow_run_id:
            best_update["url"] = run_url(uri, mlflow.experiment_id, best.mlflow_run_id)
        run = observation.runs.get(best.name)
        if registered:
            best_update["adapter_uri"] = registered
        elif run is not None and run.adapter:
            best_update["adapter_uri"] = f"runs:/{run.run_id}/{run.adapter}"
        update["best_trial"] = best.model_copy(update=best_update)
    importance = observation.memory.importance
    if importance is not None:
        update["parameter_importance"] = importance.model_copy(
            update={"parameters": importance.parameters[:IMPORTANCE_IN_STATUS]}
        )
    return status.model_copy(update=update)


def _report_due(
    trials: list[ObservedTrial], status: SweepStatus, observation: Observation
) -> tuple[int, str] | None:
    """As trials finish, at most every REPORT_INTERVAL_SECONDS, and once more at the end."""
    seen = observation.memory
    key = (sum(not t.state.active for t in trials), status.phase)
    if not key[0] or key == seen.reported:
        return None
    # An ended sweep some of whose Jobs were deleted since keeps the report of all its trials.
    if status.phase in TERMINAL and len(trials) < status.trials.total:
        return None
    due = status.phase in TERMINAL or seen.report_age >= REPORT_INTERVAL_SECONDS
    return key if due else None


def _events(
    spec: SweepSpec,
    observation: Observation,
    previous: SweepStatus | None,
    status: SweepStatus,
) -> list[SweepEvent]:
    """Events for what changed since the last reconcile: trial transitions, a new best trial,
    the model download's end, the warm start. The first reconcile after a start knows no
    earlier trial states and posts no transitions."""
    seen = observation.memory
    events: list[SweepEvent] = []
    if seen.states is not None:
        for trial in observation.trials:
            before = seen.states.get(trial.name)
            if before != trial.state:
                event = _transition(spec, trial, known=before is not None)
                if event is not None:
                    events.append(event)
    best, before_best = status.best_trial, previous.best_trial if previous else None
    if best is not None and (before_best is None or before_best.name != best.name):
        detail = f"{best.value:g} with {format_parameters(best.parameters)}"
        events.append(SweepEvent("NewBestTrial", best.name, detail))
    fetch = observation.fetch
    if fetch is not None and seen.fetch_state not in (None, fetch.state):
        name = model_fetch_name(observation.sweep)
        if fetch.state == FetchState.SUCCEEDED:
            detail = f"model {spec.trainer.model} is on the claim"
            events.append(SweepEvent("ModelFetched", name, detail))
        elif fetch.state == FetchState.FAILED:
            events.append(SweepEvent("ModelFetchFailed", name, fetch.message, "Warning"))
    warm = observation.warm
    if warm is not None:
        reason = true_reason(status)
        if reason == NOT_FOUND and not (previous and previous.phase == "Failed"):
            events.append(SweepEvent(NOT_FOUND, None, status.message, "Warning"))
        if warm.summary and warm.summary != seen.warm_summary:
            events.append(SweepEvent("WarmStart", None, warm.summary))
    return events


def _transition(spec: SweepSpec, trial: ObservedTrial, known: bool) -> SweepEvent | None:
    """The Event of a trial that reached its state since the last reconcile; `known`: it was
    seen before (a trial queued again was preempted)."""
    state = trial.state
    if state == TrialState.RUNNING:
        return SweepEvent("TrialStarted", trial.name, "running")
    if state == TrialState.SUCCEEDED:
        value = (
            "no objective" if trial.value is None else f"{spec.objective.metric}={trial.value:g}"
        )
        return SweepEvent("TrialSucceeded", trial.name, value)
    if state == TrialState.FAILED:
        return SweepEvent("TrialFailed", trial.name, trial.message or "failed", "Warning")
    if state == TrialState.INFEASIBLE:
        detail = "ran out of GPU memory: " + (trial.message or "exit code 4")
        return SweepEvent("TrialInfeasible", trial.name, detail, "Warning")
    if state == TrialState.STOPPED:
        return SweepEvent("TrialStopped", trial.name, trial.message)
    if state == TrialState.QUEUED and known:
        detail = "suspended by Kueue (preempted); it waits for quota to run again"
        return SweepEvent("TrialRequeued", trial.name, detail)
    return None


def format_parameters(parameters: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in parameters.items())

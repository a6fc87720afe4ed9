"""The planner: observed trials in, actions and the desired status out. Pure, no I/O.

Like Katib's experiment controller, the status is derived from the trials on every call rather
than remembered, so the reconcile is level-based: whatever happened while the operator was
down, re-planning from what is in the cluster gives the right answer. Trials are identified
by their index; the plan only creates indices that are not observed, so it never duplicates
a trial after a restart.

The returned status describes the sweep as it will be once the plan is carried out: trials
to create count as pending and trials to delete as pruned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sweep_operator.api import BestTrial, Condition, Phase, SweepSpec, SweepStatus, TrialCounts
from sweep_operator.naming import trial_name
from sweep_operator.space import target_trials, trial_parameters
from sweep_operator.trials import NewTrial, ObservedTrial, TrialState

CONDITION_TYPES = ("Running", "Succeeded", "Failed")


@dataclass(frozen=True)
class Plan:
    create: list[NewTrial] = field(default_factory=list)  # in index order
    delete: list[str] = field(default_factory=list)  # Job names of trials to stop
    status: SweepStatus = field(default_factory=SweepStatus)


def best_trial(spec: SweepSpec, observed: Sequence[ObservedTrial]) -> BestTrial | None:
    """The succeeded trial with the best finite objective value; ties go to the lower index."""
    scored = [
        t
        for t in observed
        if t.state == TrialState.SUCCEEDED and t.value is not None and math.isfinite(t.value)
    ]
    if not scored:
        return None
    sign = 1.0 if spec.objective.goal == "minimize" else -1.0
    best = min(scored, key=lambda t: (sign * t.value, t.index))  # type: ignore[operator]
    assert best.value is not None
    return BestTrial(
        name=best.name,
        index=best.index,
        parameters=best.parameters,
        value=best.value,
        metrics=best.metrics,
        mlflow_run_id=best.mlflow_run_id,
    )


def _space_changed(spec: SweepSpec, observed: Sequence[ObservedTrial]) -> str | None:
    """A message when an existing trial's parameters no longer match its index."""
    for trial in sorted(observed, key=lambda t: t.index):
        try:
            expected = trial_parameters(spec, trial.index)
        except IndexError:
            expected = None
        if expected != trial.parameters:
            return (
                f"trial {trial.name} ran with parameters {trial.parameters}, but the current "
                f"search space gives {expected} for index {trial.index}: spec.parameters or "
                "spec.algorithm changed after the sweep started; create a new sweep instead"
            )
    return None


def _conditions(
    phase: Phase,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
    previous: SweepStatus | None,
) -> list[Condition]:
    """Running/Succeeded/Failed conditions, keeping lastTransitionTime while a status holds."""
    before = {c.type: c for c in previous.conditions} if previous else {}
    conditions = []
    for kind in CONDITION_TYPES:
        status = "True" if kind == phase else "False"
        old = before.get(kind)
        since = old.last_transition_time if old and old.status == status else now
        conditions.append(
            Condition(
                type=kind,
                status=status,
                reason=reason if status == "True" else f"Not{kind}",
                message=message if status == "True" else "",
                last_transition_time=since,
                observed_generation=generation,
            )
        )
    return conditions


def _times(
    observed: Sequence[ObservedTrial], previous: SweepStatus | None, now: datetime
) -> tuple[datetime, datetime]:
    """(start, completion if the sweep ended now): earliest trial start, latest trial finish."""
    starts = [t.start_time for t in observed if t.start_time]
    if previous and previous.start_time:
        starts.append(previous.start_time)
    finishes = [t.finish_time for t in observed if t.finish_time and not t.state.active]
    return (min(starts) if starts else now, max(finishes) if finishes else now)


def plan(
    spec: SweepSpec,
    observed: Sequence[ObservedTrial],
    now: datetime,
    *,
    sweep_name: str,
    generation: int | None = None,
    previous: SweepStatus | None = None,
) -> Plan:
    """Decide which trials to create or stop, and the sweep's status.

    `previous` is the status currently stored on the sweep; it is read only to keep condition
    transition times and the start time stable, so that an unchanged sweep plans to an
    unchanged status (and the operator can skip the patch).
    """
    now = now.replace(microsecond=0)
    target = target_trials(spec)
    by_index = {t.index: t for t in observed}
    trials = sorted(by_index.values(), key=lambda t: t.index)
    active = [t for t in trials if t.state.active]
    failed = [t for t in trials if t.state == TrialState.FAILED]
    succeeded = [t for t in trials if t.state == TrialState.SUCCEEDED]
    unscored = [t for t in succeeded if t.value is None]
    best = best_trial(spec, trials)

    create: list[NewTrial] = []
    delete: list[str] = []
    phase: Phase
    changed = _space_changed(spec, trials)
    budget = spec.max_failed_trials
    if changed:
        phase, reason, message = "Failed", "SearchSpaceChanged", changed
        delete = [t.name for t in active]
    elif budget is not None and len(failed) > budget:
        phase, reason = "Failed", "TooManyFailedTrials"
        names = ", ".join(t.name for t in failed)
        message = (
            f"{len(failed)} trials failed ({names}), more than spec.maxFailedTrials={budget}; "
            f"first failure: {failed[0].message or 'no message'}"
        )
        delete = [t.name for t in active]
    else:
        slots = max(0, spec.parallelism - len(active))
        missing = (i for i in range(target) if i not in by_index)
        for index in missing:
            if len(create) == slots:
                break
            create.append(
                NewTrial(
                    index=index,
                    name=trial_name(sweep_name, index),
                    parameters=trial_parameters(spec, index),
                )
            )
        finished = not active and not create and all(i in by_index for i in range(target))
        metric = spec.objective.metric
        if finished and best is not None:
            phase, reason = "Succeeded", "AllTrialsDone"
            message = (
                f"{len(succeeded)}/{target} trials succeeded; best {metric}={best.value:g} "
                f"({best.name})"
            )
        elif finished:
            phase = "Failed"
            if succeeded:
                reason = "NoScoredTrial"
                message = f"no trial reported the objective metric {metric}"
            else:
                reason = "NoTrialSucceeded"
                message = f"all {len(trials)} trials failed or were stopped"
        else:
            started = any(t.state != TrialState.PENDING for t in trials)
            phase, reason = ("Running", "TrialsRunning") if started else ("Pending", "Waiting")
            running = sum(t.state == TrialState.RUNNING for t in trials)
            pending = len(active) - running + len(create)
            message = (
                f"{len(succeeded)}/{target} trials succeeded, {running} running, "
                f"{pending} pending, {len(failed)} failed"
            )
            if best is not None:
                message += f"; best {metric}={best.value:g} ({best.name})"
    if unscored:
        message += (
            f"; {len(unscored)} succeeded trials did not report {spec.objective.metric}: "
            + ", ".join(t.name for t in unscored)
        )

    deleting = set(delete)

    def count(state: TrialState) -> int:
        return sum(t.state == state and t.name not in deleting for t in trials)

    counts = TrialCounts(
        total=len(trials) + len(create),
        pending=count(TrialState.PENDING) + len(create),
        running=count(TrialState.RUNNING),
        succeeded=len(succeeded),
        failed=len(failed),
        pruned=count(TrialState.PRUNED) + len(delete),
        unscored=len(unscored),
        target=target,
    )
    start, end = _times(trials, previous, now)
    terminal = phase in ("Succeeded", "Failed")
    status = SweepStatus(
        phase=phase,
        observed_generation=generation,
        conditions=_conditions(phase, reason, message, now, generation, previous),
        trials=counts,
        progress=f"{counts.succeeded}/{target}",
        best_trial=best,
        mlflow=previous.mlflow if previous else None,
        start_time=start if trials or create else None,
        completion_time=end if terminal else None,
        message=message,
    )
    return Plan(create=create, delete=delete, status=status)


def failed_status(
    reason: str,
    message: str,
    now: datetime,
    *,
    generation: int | None = None,
    previous: SweepStatus | None = None,
) -> SweepStatus:
    """The status of a sweep refused before any trial ran (invalid spec, bad template)."""
    now = now.replace(microsecond=0)
    completed = previous.completion_time if previous and previous.phase == "Failed" else None
    return SweepStatus(
        phase="Failed",
        observed_generation=generation,
        conditions=_conditions("Failed", reason, message, now, generation, previous),
        trials=previous.trials if previous else TrialCounts(),
        progress=previous.progress if previous else "0/0",
        best_trial=previous.best_trial if previous else None,
        mlflow=previous.mlflow if previous else None,
        start_time=previous.start_time if previous else None,
        completion_time=completed or now,
        message=message,
    )

"""The trials' part of the plan: observed trials in, trials to create or stop and the sweep's
status out. Pure, no I/O; `plan.plan` builds the whole plan on it.

Like Katib's experiment controller, the status is derived from the trials on every call rather
than remembered, so the reconcile is level-based: whatever happened while the operator was
down, re-planning from what is in the cluster gives the right answer. Trials are identified
by their index; the plan only creates indices that are not observed, so it never duplicates
a trial after a restart.

The returned status describes the sweep as it will be once the plan is carried out: trials
to create count as pending (queued, for a sweep with a Kueue queue) and trials to delete as
pruned. Queued trials are active: they hold a parallelism slot but no GPU.

With spec.trainer.modelCache, no trial is created before the sweep's model download has
succeeded: the plan asks for the download Job (`Plan.fetch_model`) while there is none, and a
failed download fails the sweep.

With spec.constraints, configurations over the memory limit never become trials
(`constraints`), and a trial that ran out of GPU memory is infeasible: counted apart, never
against maxFailedTrials.

Stopping a trial (early stopping, the time budget, a failed sweep) puts its name in
`TrialPlan.stop` with the reason. The stopped trial must stay observable as STOPPED afterwards
(its index is then never planned again, and TPE learns from its curve).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sweep_operator.api import (
    BestTrial,
    Condition,
    ParetoTrial,
    Phase,
    SweepSpec,
    SweepStatus,
    TrialCounts,
    parse_duration,
)
from sweep_operator.constraints import ConstraintError
from sweep_operator.early_stopping import Progress, stop_decisions
from sweep_operator.naming import model_fetch_name, trial_name
from sweep_operator.objective import (
    metric_values,
    minimizing,
    normalisation_note,
    objective_values,
    pareto_front,
    scorer,
)
from sweep_operator.search import Suggester, suggester
from sweep_operator.trials import FetchState, NewTrial, ObservedFetch, ObservedTrial, TrialState
from sweep_operator.warm_start import NOT_FOUND, WAITING, WarmStart, refusal

CONDITION_TYPES = ("Running", "Succeeded", "Failed")
# The reasons of failed_status, a sweep refused before planning (its spec, a template that
# would not render): they hold only while the cause does, which the next reconcile checks.
REFUSALS = ("InvalidSpec", "InvalidTemplate")


@dataclass(frozen=True)
class TrialPlan:
    create: list[NewTrial] = field(default_factory=list)  # in index order
    # Trials to stop (Job names, in index order) and why, for their MLflow runs and Events.
    stop: dict[str, str] = field(default_factory=dict)
    status: SweepStatus = field(default_factory=SweepStatus)
    # When the time budget runs out: the operator should reconcile again by then.
    deadline: datetime | None = None
    # Create the Job that downloads the model into spec.trainer.modelCache.
    fetch_model: bool = False


def best_trial(spec: SweepSpec, observed: Sequence[ObservedTrial]) -> BestTrial | None:
    """The succeeded trial with the best finite objective value; ties go to the lower index.

    With a weighted objective the value is the weighted sum of the normalised metrics
    (objective.metrics, normalised over `observed`), and metrics holds every raw one.
    """
    score = scorer(spec, observed)
    scored = [
        (value, t)
        for t in observed
        if t.state == TrialState.SUCCEEDED and (value := score.value(t)) is not None
    ]
    if not scored:
        return None
    sign = 1.0 if minimizing(spec) else -1.0
    value, best = min(scored, key=lambda vt: (sign * vt[0], vt[1].index))
    return BestTrial(
        name=best.name,
        index=best.index,
        parameters=best.parameters,
        value=value,
        metrics=metric_values(spec, best) if score.weighted else best.metrics,
        mlflow_run_id=best.mlflow_run_id,
    )


PARETO_IN_STATUS = 20


def pareto_status(
    spec: SweepSpec, observed: Sequence[ObservedTrial]
) -> tuple[list[ParetoTrial], int]:
    """The Pareto-optimal trials for status and how many there are (none unless
    objective.mode is pareto). The status stays small at any size: past PARETO_IN_STATUS, the
    trials of the front best by the primary metric, in index order."""
    if spec.objective.mode != "pareto" or not spec.objective.metrics:
        return [], 0
    front = pareto_front(spec, observed)
    shown = front
    if len(front) > PARETO_IN_STATUS:
        sign = 1.0 if minimizing(spec) else -1.0
        metric = spec.objective.metric

        def rank(trial: ObservedTrial) -> tuple[float, int]:
            return (sign * (objective_values(spec, trial) or {})[metric], trial.index)

        shown = sorted(sorted(front, key=rank)[:PARETO_IN_STATUS], key=lambda t: t.index)
    entries = [
        ParetoTrial(
            name=t.name,
            index=t.index,
            parameters=t.parameters,
            values=objective_values(spec, t) or {},
        )
        for t in shown
    ]
    return entries, len(front)


def _space_changed(search: Suggester, observed: Sequence[ObservedTrial]) -> str | None:
    """A message when an existing trial's parameters no longer match its index."""
    for trial in sorted(observed, key=lambda t: t.index):
        mismatch = search.mismatch(trial)
        if mismatch:
            return (
                f"trial {trial.name} ran with parameters {trial.parameters}, {mismatch}: "
                "spec.parameters or spec.algorithm changed after the sweep started; create a "
                "new sweep instead"
            )
    return None


def conditions(
    phase: Phase,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
    previous: SweepStatus | None,
) -> list[Condition]:
    """Running/Succeeded/Failed conditions, keeping lastTransitionTime while a status holds."""
    before = {c.type: c for c in previous.conditions} if previous else {}
    result = []
    for kind in CONDITION_TYPES:
        status = "True" if kind == phase else "False"
        old = before.get(kind)
        since = old.last_transition_time if old and old.status == status else now
        result.append(
            Condition(
                type=kind,
                status=status,
                reason=reason if status == "True" else f"Not{kind}",
                message=message if status == "True" else "",
                last_transition_time=since,
                observed_generation=generation,
            )
        )
    return result


def _times(
    observed: Sequence[ObservedTrial], previous: SweepStatus | None, now: datetime
) -> tuple[datetime, datetime]:
    """(start, completion if the sweep ended now): earliest trial start, latest trial finish."""
    starts = [t.start_time for t in observed if t.start_time]
    if previous and previous.start_time:
        starts.append(previous.start_time)
    finishes = [t.finish_time for t in observed if t.finish_time and not t.state.active]
    return (min(starts) if starts else now, max(finishes) if finishes else now)


def _early_stops(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> dict[str, str]:
    """Running trials that early stopping stops -> why."""
    if spec.early_stopping is None:
        return {}
    score = scorer(spec, trials)
    progress = {t.name: Progress(t.index, t.state, score.curve(t)) for t in trials}
    return stop_decisions(spec.early_stopping, progress, minimize=minimizing(spec))


def plan_trials(
    spec: SweepSpec,
    observed: Sequence[ObservedTrial],
    now: datetime,
    *,
    sweep_name: str,
    generation: int | None = None,
    previous: SweepStatus | None = None,
    fetch: ObservedFetch | None = None,
    warm: WarmStart | None = None,
) -> TrialPlan:
    """Decide which trials to create or stop, and the sweep's status.

    `fetch` is the model download of a sweep with spec.trainer.modelCache (none observed when
    omitted); `warm` the warm-start history of spec.algorithm.warmStart (warm_start.py).
    `previous` is the status currently stored on the sweep; it is read to keep condition
    transition times and the start time stable, so that an unchanged sweep plans to an
    unchanged status (and the operator can skip the patch), and the time budget counts from
    the stored start time.
    """
    now = now.replace(microsecond=0)
    warm = warm or WarmStart()
    search = suggester(spec, len(warm.trials))
    # With a memory limit a grid skips the points over it: they are never trials.
    planned = search.indices()
    target = len(planned.indices)
    by_index = {t.index: t for t in observed}
    trials = sorted(by_index.values(), key=lambda t: t.index)
    start, end = _times(trials, previous, now)
    budget_time = parse_duration(spec.time_budget, "timeBudget") if spec.time_budget else None
    deadline = start + budget_time if budget_time else None
    active = [t for t in trials if t.state.active]
    failed = [t for t in trials if t.state == TrialState.FAILED]
    infeasible = sum(t.state == TrialState.INFEASIBLE for t in trials) + planned.skipped
    infeasible_text = f", {infeasible} infeasible" if infeasible else ""
    succeeded = [t for t in trials if t.state == TrialState.SUCCEEDED]
    unscored = [t for t in succeeded if objective_values(spec, t) is None]
    # A sweep that ended creates no trial again while its spec is the one it ended at: a trial
    # Job deleted since (a cleanup, a TTL policy) is gone, not missing. Its status stands too
    # (the best trial, or why it failed; the trials it stopped were stopped then), unless it
    # ended with succeeded trials that had no objective (MLflow may not have answered: the
    # outcome settles as they come). A refusal stands only while it holds. A changed spec
    # plans again.
    ended = (
        previous is not None
        and previous.phase in ("Succeeded", "Failed")
        and generation is not None
        and previous.observed_generation == generation
        and true_reason(previous) not in REFUSALS
    )
    if ended and previous is not None and not previous.trials.unscored:
        return TrialPlan(status=previous)
    best = best_trial(spec, trials)
    metric = spec.objective.metric
    best_text = f"; best {metric}={best.value:g} ({best.name})" if best else ""
    if best and spec.objective.metrics and spec.objective.mode == "weighted":
        best_text = (
            f"; best weighted objective={best.value:g} ({best.name}; "
            f"{normalisation_note(spec, trials)})"
        )

    create: list[NewTrial] = []
    stops: dict[str, str] = {}
    # With a queue a new trial's Job starts suspended, waiting for Kueue to admit it.
    new_state = TrialState.QUEUED if spec.trainer.queue_name else TrialState.PENDING
    phase: Phase
    changed = _space_changed(search, trials)
    budget = spec.max_failed_trials
    cache = spec.trainer.model_cache
    fetch_state = (fetch.state if fetch else FetchState.MISSING) if cache else None
    if changed:
        phase, reason, message = "Failed", "SearchSpaceChanged", changed
        stops = {t.name: "the sweep failed: its search space changed" for t in active}
    elif refused := refusal(warm, trials, previous):
        phase, reason, message = "Failed", NOT_FOUND, refused
        end = previous_completion(previous) or now
    elif fetch and fetch_state == FetchState.FAILED:
        phase, reason = "Failed", "ModelFetchFailed"
        message = (
            f"downloading model {spec.trainer.model} into spec.trainer.modelCache "
            f"(Job {model_fetch_name(sweep_name)}) failed: {fetch.message}"
        )
        stops = {t.name: "the sweep failed: its model download failed" for t in active}
        end = fetch.finish_time or previous_completion(previous) or now
    elif budget is not None and len(failed) > budget:
        phase, reason = "Failed", "TooManyFailedTrials"
        names = ", ".join(t.name for t in failed)
        message = (
            f"{len(failed)} trials failed ({names}), more than spec.maxFailedTrials={budget}; "
            f"first failure: {failed[0].message or 'no message'}"
        )
        stops = {t.name: "the sweep failed: too many failed trials" for t in active}
    elif deadline is not None and now >= deadline:
        # The best so far is the result; without any scored trial there is none.
        phase, reason = ("Succeeded" if best else "Failed"), "BudgetExhausted"
        stops = {t.name: f"timeBudget {spec.time_budget} exhausted" for t in active}
        message = (
            f"timeBudget {spec.time_budget} exhausted: {len(succeeded)}/{target} trials "
            f"succeeded, {len(stops)} stopped at the deadline" + best_text
        )
        end = deadline  # stable across replans, unlike now
    else:
        stops = _early_stops(spec, trials)
        going_on = [t for t in active if t.name not in stops]
        # No trial before the model is on the claim (a trial would download it on its own).
        fetching = cache is not None and fetch_state != FetchState.SUCCEEDED
        slots = 0 if fetching or warm.waiting else max(0, spec.parallelism - len(going_on))
        # TPE learns from the trials stopped just now as pruned ones, and sees the trials
        # created in this plan as running.
        history = [
            t.model_copy(update={"state": TrialState.STOPPED}) if t.name in stops else t
            for t in trials
        ]
        missing = (i for i in planned.indices if i not in by_index and not ended)
        unplannable: ConstraintError | None = None
        for index in missing:
            if len(create) == slots:
                break
            try:
                parameters = search.propose(index, history, warm.trials)
            except ConstraintError as error:
                unplannable = error
                break
            new = NewTrial(index=index, name=trial_name(sweep_name, index), parameters=parameters)
            create.append(new)
            history.append(
                ObservedTrial(
                    name=new.name,
                    index=index,
                    parameters=new.parameters,
                    state=new_state,
                )
            )
        finished = (
            not going_on and not create and (ended or all(i in by_index for i in planned.indices))
        )
        if unplannable is not None:
            phase, reason, message, create = "Failed", unplannable.reason, str(unplannable), []
            stops |= {t.name: f"the sweep failed: {reason}" for t in going_on}
        elif finished and best is not None:
            phase, reason = "Succeeded", "AllTrialsDone"
            message = f"{len(succeeded)}/{target} trials succeeded{infeasible_text}" + best_text
        elif finished:
            phase = "Failed"
            if succeeded:
                reason = "NoScoredTrial"
                message = f"no trial reported the objective metric {metric}"
            else:
                reason = "NoTrialSucceeded"
                message = f"all {len(trials)} trials failed or were stopped{infeasible_text}"
        elif warm.waiting and not trials:
            phase, reason, message = "Pending", WAITING, warm.waiting
        elif fetching and cache is not None and not trials:
            phase, reason = "Pending", "FetchingModel"
            message = (
                f"downloading model {spec.trainer.model} into PersistentVolumeClaim "
                f"{cache.claim_name} (Job {model_fetch_name(sweep_name)}); trials start once "
                "it is there"
            )
        else:
            waiting = (TrialState.QUEUED, TrialState.PENDING)
            started = any(t.state not in waiting for t in trials)
            phase, reason = ("Running", "TrialsRunning") if started else ("Pending", "Waiting")
            running = sum(t.state == TrialState.RUNNING for t in going_on)
            queued = sum(t.state == TrialState.QUEUED for t in going_on)
            queued += len(create) if new_state == TrialState.QUEUED else 0
            pending = len(going_on) - running + len(create) - queued
            pruned = sum(t.state == TrialState.STOPPED for t in trials) + len(stops)
            message = (
                f"{len(succeeded)}/{target} trials succeeded, {running} running, "
                + (f"{queued} queued, " if spec.trainer.queue_name else "")
                + f"{pending} pending, {len(failed)} failed"
                + (f", {pruned} pruned" if pruned else "")
                + infeasible_text
                + best_text
            )
    if unscored:
        message += (
            f"; {len(unscored)} succeeded trials did not report {spec.objective.metric}: "
            + ", ".join(t.name for t in unscored)
        )

    def count(state: TrialState) -> int:
        created = len(create) if state == new_state else 0
        return sum(t.state == state and t.name not in stops for t in trials) + created

    counts = TrialCounts(
        total=len(trials) + len(create),
        queued=count(TrialState.QUEUED),
        pending=count(TrialState.PENDING),
        running=count(TrialState.RUNNING),
        succeeded=len(succeeded),
        failed=len(failed),
        pruned=count(TrialState.STOPPED) + len(stops),
        infeasible=infeasible,
        unscored=len(unscored),
        target=target,
    )
    terminal = phase in ("Succeeded", "Failed")
    shown_front, front_size = pareto_status(spec, trials)
    status = SweepStatus(
        phase=phase,
        observed_generation=generation,
        conditions=conditions(phase, reason, message, now, generation, previous),
        trials=counts,
        progress=f"{counts.succeeded}/{target}",
        best_trial=best,
        pareto_front=shown_front,
        pareto_front_size=front_size,
        parameter_importance=previous.parameter_importance if previous else None,
        mlflow=previous.mlflow if previous else None,
        start_time=start if trials or create else None,
        completion_time=end if terminal else None,
        message=message,
    )
    return TrialPlan(
        create=create,
        stop={t.name: stops[t.name] for t in trials if t.name in stops},
        status=status,
        deadline=None if terminal else deadline,
        fetch_model=fetch_state == FetchState.MISSING and not terminal,
    )


def true_reason(status: SweepStatus) -> str | None:
    """The reason of the status's true condition (its phase's)."""
    return next((c.reason for c in status.conditions if c.status == "True"), None)


def previous_completion(previous: SweepStatus | None) -> datetime | None:
    """The stored completion time of a sweep that had already failed (kept on replans)."""
    return previous.completion_time if previous and previous.phase == "Failed" else None


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
        conditions=conditions("Failed", reason, message, now, generation, previous),
        trials=previous.trials if previous else TrialCounts(),
        progress=previous.progress if previous else "0/0",
        best_trial=previous.best_trial if previous else None,
        mlflow=previous.mlflow if previous else None,
        start_time=previous.start_time if previous else None,
        completion_time=completed or now,
        message=message,
    )

"""Warm start: the finished trials of earlier sweeps as TPE's first history. Pure.

The adapter (handlers.py) observes each sweep named in spec.algorithm.warmStart.sweeps as it
observes the sweep's own trials (their Jobs and pods from the kopf indexes, MLflow for a result
no pod holds any more) and hands them here as `Source`s. `warm_start` keeps the succeeded trials
that lie in this sweep's space and report its objective. The plan gives them to TPE as history
ahead of the sweep's own trials; they never become trials of this sweep (no index, no count, no
best trial), and the sweep draws `startup_trials` random trials instead of startupTrials:
startupTrials less one per warm-start trial, at least 0.

What the plan does with it (plan.py):
- A named sweep that does not exist fails the sweep before its first trial (reason
  WarmStartNotFound), for good. One deleted after the sweep started only takes its trials out
  of the history.
- While a named sweep has not ended, or the results of its trials cannot be read yet, the sweep
  creates no trial: its finished trials, and with them every proposal, would depend on the
  moment the operator looked. Once all have ended the history is fixed, so an operator
  restarted at any point proposes the same trials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sweep_operator.api import SweepSpec, SweepStatus
from sweep_operator.objective import objective_values
from sweep_operator.search.tpe import startup_trials
from sweep_operator.semantic import close_matches
from sweep_operator.space import in_space
from sweep_operator.trials import ObservedTrial, TrialState

NOT_FOUND = "WarmStartNotFound"
WAITING = "WaitingForWarmStart"
ENDED = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Source:
    """One sweep named in warmStart, as observed."""

    name: str
    phase: str | None  # its status.phase; None when no such sweep exists
    trials: Sequence[ObservedTrial] = ()
    # Why some of its trials' results cannot be read yet (MLflow unreachable), if so.
    unreadable: str = ""


@dataclass(frozen=True)
class WarmStart:
    trials: tuple[ObservedTrial, ...] = ()  # TPE's extra history, sweep by sweep, in index order
    missing: str = ""  # why the sweep must fail: a named sweep does not exist
    waiting: str = ""  # why no trial may be created yet
    summary: str = ""  # which trials were used and which left out, for an Event


def warm_start(
    spec: SweepSpec, sources: Sequence[Source], namespace_sweeps: Sequence[str]
) -> WarmStart:
    """The warm-start history from the named sweeps; `namespace_sweeps` are the names of the
    sweeps that do exist there (to suggest one for a misspelt name)."""
    for i, source in enumerate(sources):
        if source.phase is None:
            close = close_matches(source.name, sorted(namespace_sweeps))
            return WarmStart(
                missing=f"spec.algorithm.warmStart.sweeps[{i}]: there is no HyperparameterSweep "
                f"{source.name} in this namespace; warm start reads the finished trials of an "
                "existing sweep" + (f"; did you mean {' or '.join(close)}?" if close else ""),
            )
    waiting = [
        f"sweep {s.name} has not ended (phase {s.phase or 'unknown'})"
        for s in sources
        if s.phase not in ENDED
    ] + [f"sweep {s.name}: {s.unreadable}" for s in sources if s.unreadable]
    if waiting:
        return WarmStart(
            waiting="warm start waits: " + "; ".join(waiting) + " (TPE learns from its "
            "finished trials)",
        )
    used: list[ObservedTrial] = []
    parts = []
    for source in sources:
        succeeded = sorted(
            (t for t in source.trials if t.state == TrialState.SUCCEEDED), key=lambda t: t.index
        )
        kept, outside, unscored = [], 0, 0
        for t in succeeded:
            if in_space(spec.parameters, t.parameters) is not None:
                outside += 1
            elif objective_values(spec, t) is None:
                unscored += 1
            else:
                kept.append(t)
        used += kept
        reasons = [f"{outside} outside this sweep's space"] if outside else []
        if unscored:
            reasons.append(f"{unscored} without {spec.objective.metric}")
        parts.append(
            f"{len(kept)} of the {len(succeeded)} succeeded trials of {source.name}"
            + (f" ({', '.join(reasons)} left out)" if reasons else "")
        )
    summary = (
        f"TPE starts from {'; '.join(parts)}; "
        f"{startup_trials(spec, len(used))} random startup trials"
    )
    return WarmStart(trials=tuple(used), summary=summary)


def refusal(
    warm: WarmStart, trials: Sequence[ObservedTrial], previous: SweepStatus | None
) -> str | None:
    """Why the sweep fails for its warm start, or None. Only before its first trial; a sweep
    failed so stays failed (creating the missing sweep later does not revive it)."""
    if trials:
        return None
    failed = (
        next((c for c in previous.conditions if c.type == "Failed" and c.status == "True"), None)
        if previous
        else None
    )
    if failed is not None and failed.reason == NOT_FOUND:
        return failed.message
    return warm.missing or None

"""Early stopping decisions from learning curves: median stopping, ASHA, Hyperband. Pure.

Every rule is evaluated level-based, from the curves as they are now, never from a log of
earlier decisions, so an operator restart changes nothing. The rules follow Optuna's and Ray
Tune's:

- Any rule stops a running trial at once when its objective turns NaN or infinite: it has
  diverged and will not recover.
- median: a running trial's best value up to its latest step is compared with the median of
  the completed trials' best values up to the same step (like with like), once at least
  `min_trials` completed trials got that far. Running and stopped trials are no yardstick:
  a first cohort would otherwise cut its own members on gaps the size of the eval noise.
- asha: a trial is judged once per rung, when it reaches it: by its value there (not its
  best so far, which hides a diverging curve) against the values of the trials that reached
  the rung before it, by the time each value was logged. Later arrivals never reopen that
  decision (asynchronous successive halving promotes a trial and moves on), and a trial past
  a rung is only ever judged at its highest one.
- hyperband: brackets of ASHA from the most aggressive (first rung min_steps) to one that
  never stops a trial; a trial's bracket follows from its index, with Hyperband's share of
  trials per bracket; each bracket ranks its own trials only. A trial the rules keep simply
  trains on: no trial is paused, so none has to be resumed.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sweep_operator.api import EarlyStopping
from sweep_operator.trials import Curve, Point, TrialState


@dataclass(frozen=True)
class Progress:
    """One trial as early stopping sees it: its objective's curve, in step order."""

    index: int
    state: TrialState
    curve: Curve


def _signed(value: float, minimize: bool) -> float:
    """The value made "smaller is better"; NaN and infinities rank worst."""
    if not math.isfinite(value):
        return math.inf
    return value if minimize else -value


def _fmt(signed: float, minimize: bool) -> str:
    return f"{signed if minimize else -signed:.6g}"


def _best_until(curve: Curve, step: int, minimize: bool) -> float | None:
    values = [_signed(p.value, minimize) for p in curve if p.step <= step]
    return min(values) if values else None


def arrival(curve: Curve, rung: int) -> Point | None:
    """The point logged when the curve reached `rung`: the first at or past it."""
    return next((p for p in curve if p.step >= rung), None)


def diverged(progress: Progress) -> str | None:
    """Why a trial has diverged (its objective is NaN or infinite), if it has."""
    bad = next((p for p in progress.curve if not math.isfinite(p.value)), None)
    if bad is None:
        return None
    return f"the objective is {bad.value} at step {bad.step}: the trial diverged"


def median_decisions(
    trials: Mapping[str, Progress], *, minimize: bool, min_steps: int, min_trials: int
) -> dict[str, str]:
    """Running trials to stop -> why, by the median rule (module docstring)."""
    completed = [t.curve for t in trials.values() if t.state == TrialState.SUCCEEDED and t.curve]
    # The completed trials' median at each step a running trial is at, worked out once per
    # step: running trials mostly share their evaluation steps, and per trial it cost a second
    # at 1,000 running and 1,000 completed trials, in every reconcile.
    medians: dict[int, tuple[int, float | None]] = {}

    def median_at(step: int) -> tuple[int, float | None]:
        if step not in medians:
            peers = [
                best
                for curve in completed
                if curve[-1].step >= step
                if (best := _best_until(curve, step, minimize)) is not None
            ]
            medians[step] = (len(peers), statistics.median(peers) if peers else None)
        return medians[step]

    stop = {}
    for name, trial in sorted(trials.items()):
        if trial.state != TrialState.RUNNING or not trial.curve:
            continue
        step = trial.curve[-1].step
        if step < min_steps:
            continue
        peers, median = median_at(step)
        if peers < min_trials or median is None:
            continue
        best = _best_until(trial.curve, step, minimize)
        if best is not None and best > median:
            stop[name] = (
                f"median stopping at step {step}: best value so far {_fmt(best, minimize)} is "
                f"worse than the median {_fmt(median, minimize)} of {peers} completed "
                "trials at that step"
            )
    return stop


def rung_steps(min_steps: int, factor: int, below: int) -> list[int]:
    """min_steps * factor**k for k = 0, 1, ... while below `below`."""
    rungs = []
    rung = min_steps
    while rung < below:
        rungs.append(rung)
        rung *= factor
    return rungs


def asha_decisions(
    trials: Mapping[str, Progress],
    rungs: Sequence[int],
    *,
    minimize: bool,
    reduction_factor: int,
    min_trials: int,
) -> dict[str, str]:
    """Running trials to stop -> why, by asynchronous successive halving (module docstring).

    A running trial is judged at its highest rung, among the trials that reached that rung
    no later than it (itself included). Each rung's arrivals are walked once in the order
    they were logged, keeping their values sorted: comparing each running trial with every
    other took seconds at 1,000 running and 1,000 ended trials, in every reconcile."""
    judged: dict[int, set[str]] = {}  # rung -> the running trials judged there
    for name, trial in trials.items():
        if trial.state != TrialState.RUNNING:
            continue
        reached = [rung for rung in rungs if arrival(trial.curve, rung) is not None]
        if reached:
            judged.setdefault(reached[-1], set()).add(name)
    stop = {}
    for rung, here in judged.items():
        arrivals = sorted(
            (point.time, _signed(point.value, minimize), name)
            for name, trial in trials.items()
            if (point := arrival(trial.curve, rung)) is not None
        )
        ranked: list[float] = []  # the values of the arrivals so far, best first
        first = 0
        while first < len(arrivals):
            # Trials that arrived at the same time are each judged with the others among them.
            last = first
            while last < len(arrivals) and arrivals[last][0] == arrivals[first][0]:
                bisect.insort(ranked, arrivals[last][1])
                last += 1
            n = len(ranked)
            keep = max(1, n // reduction_factor)
            cutoff = ranked[keep - 1]  # the worst value that still goes on; ties go on together
            for _, value, name in arrivals[first:last]:
                if name in here and n - 1 >= min_trials and value > cutoff:
                    stop[name] = (
                        f"ASHA rung at step {rung}: value {_fmt(value, minimize)} is not in the "
                        f"best {keep} of the {n} trials that reached it so far (cutoff "
                        f"{_fmt(cutoff, minimize)})"
                    )
            first = last
    return dict(sorted(stop.items()))


def brackets(min_steps: int, max_steps: int, factor: int) -> list[tuple[list[int], int]]:
    """Hyperband's brackets: (rungs, share of trials), most aggressive first.

    With s_max + 1 brackets, the one that halves s times gets about (s_max + 1) / (s + 1) *
    factor**s trials, so that every bracket spends about the same budget (Li et al., 2018);
    the last bracket has no rung and trains every trial in full.
    """
    all_rungs = rung_steps(min_steps, factor, max_steps)
    s_max = len(all_rungs)
    return [
        (all_rungs[b:], math.ceil((s_max + 1) * factor ** (s_max - b) / (s_max - b + 1)))
        for b in range(s_max + 1)
    ]


def bracket_of(index: int, shares: Sequence[int]) -> int:
    """The bracket of trial `index`: a hash of the index spread over the brackets' shares, so
    that it is the same after a restart and consecutive trials land in different brackets."""
    digest = hashlib.sha256(f"hyperband:{index}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") % sum(shares)
    for bracket, share in enumerate(shares):
        if draw < share:
            return bracket
        draw -= share
    raise AssertionError("unreachable: draw < sum(shares)")


def hyperband_decisions(
    trials: Mapping[str, Progress],
    *,
    minimize: bool,
    min_steps: int,
    max_steps: int,
    reduction_factor: int,
    min_trials: int,
) -> dict[str, str]:
    """Running trials to stop -> why, by ASHA within each trial's Hyperband bracket."""
    plan = brackets(min_steps, max_steps, reduction_factor)
    shares = [share for _, share in plan]
    groups: dict[int, dict[str, Progress]] = {}
    for name, trial in trials.items():
        groups.setdefault(bracket_of(trial.index, shares), {})[name] = trial
    stop = {}
    for bracket, group in sorted(groups.items()):
        rungs = plan[bracket][0]
        decisions = asha_decisions(
            group,
            rungs,
            minimize=minimize,
            reduction_factor=reduction_factor,
            min_trials=min_trials,
        )
        for name, why in decisions.items():
            stop[name] = f"Hyperband bracket {bracket}: {why}"
    return stop


def rungs_of(settings: EarlyStopping, last: int) -> list[int]:
    """Every rung of the settings at or below step `last`; hyperband's include maxSteps (the
    full budget), so the rungs are the budgets bohb can model."""
    if settings.algorithm == "hyperband":
        assert settings.max_steps is not None  # EarlyStopping validated it
        top = rung_steps(settings.min_steps, settings.reduction_factor, settings.max_steps)
        return [r for r in [*top, settings.max_steps] if r <= last]
    if settings.rungs is not None:
        return [r for r in settings.rungs if r <= last]
    return rung_steps(settings.min_steps, settings.reduction_factor, last + 1)


def stop_decisions(
    settings: EarlyStopping, trials: Mapping[str, Progress], *, minimize: bool
) -> dict[str, str]:
    """Running trials to stop -> why, by the sweep's earlyStopping settings."""
    stop = {
        name: why
        for name, trial in trials.items()
        if trial.state == TrialState.RUNNING and (why := diverged(trial))
    }
    rest = {name: t for name, t in trials.items() if name not in stop}
    if settings.algorithm == "median":
        decided = median_decisions(
            rest, minimize=minimize, min_steps=settings.min_steps, min_trials=settings.min_trials
        )
    elif settings.algorithm == "asha":
        last = max((t.curve[-1].step for t in rest.values() if t.curve), default=0)
        decided = asha_decisions(
            rest,
            rungs_of(settings, last),
            minimize=minimize,
            reduction_factor=settings.reduction_factor,
            min_trials=settings.min_trials,
        )
    else:
        assert settings.max_steps is not None  # EarlyStopping validated it
        decided = hyperband_decisions(
            rest,
            minimize=minimize,
            min_steps=settings.min_steps,
            max_steps=settings.max_steps,
            reduction_factor=settings.reduction_factor,
            min_trials=settings.min_trials,
        )
    return stop | decided

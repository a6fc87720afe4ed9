"""Early stopping decisions from learning curves: median stopping and ASHA. Pure.

Both rules are evaluated level-based, like the planner: from all curves as they are now, not
from a log of earlier decisions. So a restart changes nothing, and with ASHA a trial that
passed a rung while few trials had reached it can still be stopped at that rung once more
trials arrive and beat it (the synchronous successive-halving outcome, reached
asynchronously).

Curves are (step, value) lists sorted by step. `minimize=False` flips every comparison.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Iterator, Mapping, Sequence

from sweep_operator.api import EarlyStopping

Curve = Sequence[tuple[int, float]]


def _signed(curve: Curve, minimize: bool) -> list[tuple[int, float]]:
    sign = 1.0 if minimize else -1.0
    return [(step, sign * value) for step, value in curve if math.isfinite(value)]


def _value_at(curve: Curve, step: int) -> float | None:
    """The last value logged at or before `step` (curves are sorted), if the curve got there."""
    if not curve or curve[-1][0] < step:
        return None
    before = [value for s, value in curve if s <= step]
    return before[-1] if before else None


def _best_until(curve: Curve, step: int) -> float | None:
    values = [value for s, value in curve if s <= step]
    return min(values) if values else None


def _fmt(value: float, minimize: bool) -> str:
    return f"{value if minimize else -value:.6g}"


def median_decisions(
    curves: Mapping[str, Curve],
    running: Collection[str],
    *,
    minimize: bool,
    min_steps: int,
    min_trials: int,
) -> dict[str, str]:
    """Running trials to stop -> why.

    A trial is stopped once its latest step is at least `min_steps` and its best value so far
    is worse than the median of the other trials' values at that step (each other trial's
    last value at or before it, among those whose curve reached it), given at least
    `min_trials` such trials.
    """
    signed = {name: _signed(curve, minimize) for name, curve in curves.items()}
    stop = {}
    for name in sorted(running):
        curve = signed.get(name)
        if not curve:
            continue
        step = curve[-1][0]
        if step < min_steps:
            continue
        others = [
            v
            for other, c in signed.items()
            if other != name and (v := _value_at(c, step)) is not None
        ]
        if len(others) < min_trials:
            continue
        best = min(value for _, value in curve)
        median = statistics.median(others)
        if best > median:
            stop[name] = (
                f"median stopping at step {step}: best value so far {_fmt(best, minimize)} is "
                f"worse than the median {_fmt(median, minimize)} of {len(others)} other trials"
            )
    return stop


def rung_steps(
    rungs: Sequence[int] | None, min_steps: int, factor: int, last: int
) -> Iterator[int]:
    """The rungs up to step `last`: the given list, or min_steps * factor**k."""
    if rungs is not None:
        yield from (r for r in rungs if r <= last)
        return
    rung = min_steps
    while rung <= last:
        yield rung
        rung *= factor


def asha_decisions(
    curves: Mapping[str, Curve],
    running: Collection[str],
    *,
    minimize: bool,
    reduction_factor: int,
    min_steps: int,
    rungs: Sequence[int] | None = None,
    min_trials: int = 1,
) -> dict[str, str]:
    """Running trials to stop -> why, by successive halving.

    At each rung a trial has reached, the trials whose curves reached it are ranked by their
    best value up to the rung; only the best max(1, n // reduction_factor) of those n go on
    (ties go on together). A running trial outside them is stopped, once at least
    `min_trials` other trials reached that rung.
    """
    signed = {name: _signed(curve, minimize) for name, curve in curves.items()}
    last = max((c[-1][0] for c in signed.values() if c), default=0)
    stop = {}
    for rung in rung_steps(rungs, min_steps, reduction_factor, last):
        at_rung = {
            name: value
            for name, curve in signed.items()
            if curve and curve[-1][0] >= rung and (value := _best_until(curve, rung)) is not None
        }
        n = len(at_rung)
        if n - 1 < min_trials:
            continue
        keep = max(1, n // reduction_factor)
        ranked = sorted(at_rung.values())
        cutoff = ranked[keep - 1]  # the worst value that still goes on
        for name in sorted(running):
            if name in stop or name not in at_rung or at_rung[name] <= cutoff:
                continue
            stop[name] = (
                f"ASHA rung at step {rung}: value {_fmt(at_rung[name], minimize)} is not in the "
                f"best {keep} of {n} trials (cutoff {_fmt(cutoff, minimize)})"
            )
    return stop


def stop_decisions(
    settings: EarlyStopping,
    curves: Mapping[str, Curve],
    running: Collection[str],
    *,
    minimize: bool,
) -> dict[str, str]:
    """Running trials to stop -> why, by the sweep's earlyStopping settings."""
    if settings.algorithm == "median":
        return median_decisions(
            curves,
            running,
            minimize=minimize,
            min_steps=settings.min_steps,
            min_trials=settings.min_trials,
        )
    return asha_decisions(
        curves,
        running,
        minimize=minimize,
        reduction_factor=settings.reduction_factor,
        min_steps=settings.min_steps,
        rungs=settings.rungs,
        min_trials=settings.min_trials,
    )

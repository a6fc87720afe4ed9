"""The objective of a trial: one metric, a weighted sum of several, or a Pareto front.

Everything here returns values "in the direction of objective.goal": a weighted sum flips
the sign of a metric whose goal differs, so that one comparison (smaller is better when the
goal is minimize) works for single- and multi-metric sweeps alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sweep_operator.api import SweepSpec
from sweep_operator.trials import Curve, ObservedTrial, Point, TrialState


def minimizing(spec: SweepSpec) -> bool:
    return spec.objective.goal == "minimize"


def metric_values(spec: SweepSpec, trial: ObservedTrial) -> dict[str, float]:
    """Every final metric of a trial, the primary one (ObservedTrial.value) included."""
    values = dict(trial.metrics)
    if trial.value is not None:
        values[spec.objective.metric] = trial.value
    return values


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def objective_values(spec: SweepSpec, trial: ObservedTrial) -> dict[str, float] | None:
    """The value of each objective metric (in metrics order), or None if one is missing."""
    reported = metric_values(spec, trial)
    names = [m.name for m in spec.objective.metrics] or [spec.objective.metric]
    values = {name: reported.get(name) for name in names}
    if not all(_finite(v) for v in values.values()):
        return None
    return {name: float(v) for name, v in values.items() if v is not None}


def _combine(spec: SweepSpec, values: dict[str, float]) -> float:
    """Weighted sum of the metrics, each signed towards objective.goal."""
    if not spec.objective.metrics:
        return values[spec.objective.metric]
    return sum(
        m.weight * values[m.name] * (1.0 if m.goal == spec.objective.goal else -1.0)
        for m in spec.objective.metrics
    )


def objective_value(spec: SweepSpec, trial: ObservedTrial) -> float | None:
    """The trial's scalar objective, None when unscored.

    In pareto mode this is the primary metric: it ranks bestTrial and feeds early stopping.
    """
    values = objective_values(spec, trial)
    if values is None:
        return None
    if spec.objective.mode == "pareto":
        return values[spec.objective.metric]
    return _combine(spec, values)


def objective_curve(spec: SweepSpec, trial: ObservedTrial) -> Curve:
    """The objective's intermediate values, sorted by step, non-finite ones kept (a diverged
    trial's NaN is what early stopping stops it for).

    A weighted objective exists at the steps where every metric was logged (at the time the
    last of them was); pareto mode follows the primary metric.
    """
    if not spec.objective.metrics or spec.objective.mode == "pareto":
        return sorted(trial.curves.get(spec.objective.metric, []))
    by_step: dict[int, dict[str, Point]] = {}
    for m in spec.objective.metrics:
        for point in trial.curves.get(m.name, []):
            by_step.setdefault(point.step, {})[m.name] = point
    full = len(spec.objective.metrics)
    return [
        Point(
            step=step,
            value=_combine(spec, {name: p.value for name, p in points.items()}),
            time=max(p.time for p in points.values()),
        )
        for step, points in sorted(by_step.items())
        if len(points) == full
    ]


def pareto_front(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> list[ObservedTrial]:
    """Succeeded trials that no other succeeded trial dominates, in index order.

    A dominates B when A is at least as good on every metric and better on one. Trials with
    identical values all stay on the front.
    """
    signs = [1.0 if m.goal == "minimize" else -1.0 for m in spec.objective.metrics]
    scored = []
    for trial in trials:
        values = objective_values(spec, trial) if trial.state == TrialState.SUCCEEDED else None
        if values is not None:
            scored.append((trial, [s * v for s, v in zip(signs, values.values(), strict=True)]))

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    front = [t for t, v in scored if not any(dominates(w, v) for _, w in scored)]
    return sorted(front, key=lambda t: t.index)

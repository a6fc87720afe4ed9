"""The objective of a trial: one metric, a weighted sum of several, or a Pareto front.

Everything here returns values "in the direction of objective.goal": a weighted objective turns
round a metric whose goal differs, so that one comparison (smaller is better when the goal is
minimize) works for single- and multi-metric sweeps alike.

A weighted objective normalises each metric before weighting, because raw values are on
unrelated scales (a loss spanning 0.4 and an accuracy spanning 0.05 would make the weights
meaningless). The rule: each metric is scaled to [0, 1] by min-max over the scored trials (the
succeeded trials that report every objective metric), turned round (1 - x) when its goal
differs from objective.goal, then multiplied by its weight; the objective is the sum. A metric
on which every scored trial agrees contributes 0. The scale depends only on the observed
trials, so it is the same after a restart; it widens as trials finish, and a ranking changes
only when a range does. `Scorer` holds the ranges of one set of trials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    # Called for every trial in every reconcile: no copy of the trial's metrics.
    primary = spec.objective.metric
    values: dict[str, float] = {}
    for name in [m.name for m in spec.objective.metrics] or [primary]:
        value = trial.value if name == primary else None
        if value is None:
            value = trial.metrics.get(name)
        if not _finite(value):
            return None
        values[name] = float(value)
    return values


def _scored(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> list[dict[str, float]]:
    values = (objective_values(spec, t) for t in trials if t.state == TrialState.SUCCEEDED)
    return [v for v in values if v is not None]


@dataclass(frozen=True)
class Scorer:
    """The objective of trials, scaled by the ranges of one set of scored trials."""

    spec: SweepSpec
    # Weighted mode: each metric's (lowest, highest) final value over the scored trials.
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def weighted(self) -> bool:
        return bool(self.spec.objective.metrics) and self.spec.objective.mode == "weighted"

    def _combine(self, values: dict[str, float]) -> float:
        """The weighted sum of the normalised metrics (see the module's rule)."""
        diverged = [v for v in values.values() if not math.isfinite(v)]
        if diverged:
            return diverged[0]  # a NaN or infinite metric is no number to scale
        total = 0.0
        for m in self.spec.objective.metrics:
            low, high = self.ranges.get(m.name, (0.0, 0.0))
            if high <= low:
                continue  # no spread yet: the metric cannot tell trials apart
            scaled = (values[m.name] - low) / (high - low)
            total += m.weight * (scaled if m.goal == self.spec.objective.goal else 1.0 - scaled)
        return total

    def value(self, trial: ObservedTrial) -> float | None:
        """The trial's scalar objective, None when unscored.

        In pareto mode this is the primary metric: it ranks bestTrial and feeds early stopping.
        """
        values = objective_values(self.spec, trial)
        if values is None:
            return None
        if not self.weighted:
            return values[self.spec.objective.metric]
        return self._combine(values)

    def curve(self, trial: ObservedTrial) -> Curve:
        """The objective's intermediate values, sorted by step, non-finite ones kept (a diverged
        trial's NaN is what early stopping stops it for).

        A weighted objective exists at the steps where every metric was logged (at the time the
        last of them was), scaled by the ranges of the final values; pareto mode follows the
        primary metric.
        """
        if not self.weighted:
            return sorted(trial.curves.get(self.spec.objective.metric, []))
        by_step: dict[int, dict[str, Point]] = {}
        for m in self.spec.objective.metrics:
            for point in trial.curves.get(m.name, []):
                by_step.setdefault(point.step, {})[m.name] = point
        full = len(self.spec.objective.metrics)
        return [
            Point(
                step=step,
                value=self._combine({name: p.value for name, p in points.items()}),
                time=max(p.time for p in points.values()),
            )
            for step, points in sorted(by_step.items())
            if len(points) == full
        ]


def scorer(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> Scorer:
    """The objective as normalised over `trials` (only a weighted objective depends on them)."""
    unweighted = Scorer(spec)
    if not unweighted.weighted:
        return unweighted
    scored = _scored(spec, trials)
    if not scored:
        return unweighted
    ranges = {
        m.name: (min(v[m.name] for v in scored), max(v[m.name] for v in scored))
        for m in spec.objective.metrics
    }
    return Scorer(spec, ranges)


def normalisation_note(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> str:
    """What a weighted objective's value means, for the sweep's status message."""
    return (
        f"weighted objective of {', '.join(m.name for m in spec.objective.metrics)}, each "
        f"min-max normalised over the {len(_scored(spec, trials))} scored trials"
    )


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

    # In lexicographic order a trial can only be dominated by one before it, and then by one
    # on the front (dominance is transitive): O(trials x front), not trials squared.
    front: list[tuple[ObservedTrial, list[float]]] = []
    for trial, values in sorted(scored, key=lambda tv: (tv[1], tv[0].index)):
        if not any(dominates(kept, values) for _, kept in front):
            front.append((trial, values))
    return sorted((t for t, _ in front), key=lambda t: t.index)

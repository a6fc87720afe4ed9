"""`lorasweep refine`: a narrower sweep around the best region of a finished one. Pure.

Coarse -> refined -> final: a wide first sweep, then a sweep over the region where its best
trials are, warm-started from it (spec.algorithm.warmStart) so that TPE starts informed.

The rule, per searched parameter, from the `top` best scored trials of the earlier sweep:

- a range (uniform, log_uniform, int): from the lowest to the highest value among them, in log
  space for log_uniform, widened on each side by `margin` times the larger of that spread and a
  tenth of the old range (so that a region the top trials share still has room), then clipped
  to the old range. Float bounds keep 6 significant digits; an int range's bounds move outward
  to its step grid, and it keeps at least two points;
- a list of values (categorical or plain values): the values among them, in the old order;
- a derived (expr) parameter: unchanged.

Everything else of the spec stays; the algorithm becomes tpe (seed and startupTrials kept) with
warmStart from the earlier sweep (and the sweeps it was warm-started from).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from sweep_operator.api import MAX_WARM_START_SWEEPS, ParameterSpec, SweepSpec
from sweep_operator.objective import minimizing, scorer
from sweep_operator.search import suggester
from sweep_operator.space import SIGNIFICANT_DIGITS
from sweep_operator.trials import ObservedTrial, TrialState

REFINE_TOP = 5
REFINE_MARGIN = 0.25
# The least widening, as a share of the old range: a region all top trials share keeps room.
MIN_SPREAD = 0.1


class RefineError(ValueError):
    """The sweep cannot be refined (no scored trial)."""


def top_trials(spec: SweepSpec, trials: Sequence[ObservedTrial], top: int) -> list[ObservedTrial]:
    """The `top` best scored trials, best first (ties to the lower index)."""
    score = scorer(spec, trials)
    sign = 1.0 if minimizing(spec) else -1.0
    scored = [
        (value, t)
        for t in trials
        if t.state == TrialState.SUCCEEDED and (value := score.value(t)) is not None
    ]
    scored.sort(key=lambda vt: (sign * vt[0], vt[1].index))
    return [t for _, t in scored[:top]]


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _narrow_range(p: ParameterSpec, values: list[float], margin: float) -> dict[str, Any]:
    assert p.min is not None and p.max is not None  # a range
    log = p.type == "log_uniform"
    scale = math.log if log else float
    old_low, old_high = scale(p.min), scale(p.max)
    low, high = scale(min(values)), scale(max(values))
    pad = margin * max(high - low, MIN_SPREAD * (old_high - old_low))
    low, high = max(old_low, low - pad), min(old_high, high + pad)
    if log:
        low, high = math.exp(low), math.exp(high)
    if p.type == "int":
        step = p.step or 1
        start = int(p.min)
        lo = start + math.floor((low - start) / step) * step
        hi = min(int(p.max), start + math.ceil((high - start) / step) * step)
        if lo == hi:  # every top trial at one point: keep a neighbour
            lo, hi = (lo, hi + step) if hi + step <= p.max else (lo - step, hi)
        return {"type": "int", "min": lo, "max": hi, **({"step": p.step} if p.step else {})}
    return {"type": p.type, "min": max(p.min, _round(low)), "max": min(p.max, _round(high))}


def narrowed_parameters(
    spec: SweepSpec, best: Sequence[ObservedTrial], margin: float = REFINE_MARGIN
) -> dict[str, dict[str, Any]]:
    """The parameters of the refined sweep, as they are written in YAML (see the rule)."""
    parameters: dict[str, dict[str, Any]] = {}
    for name, p in sorted(spec.parameters.items()):
        if p.is_derived:
            parameters[name] = {"expr": p.expr}
        elif p.values is not None:
            seen = [v for v in p.values if any(t.parameters.get(name) == v for t in best)]
            parameters[name] = {**({"type": p.type} if p.type else {}), "values": seen}
        else:
            parameters[name] = _narrow_range(p, [float(t.parameters[name]) for t in best], margin)
    return parameters


def _describe(old: ParameterSpec, new: dict[str, Any]) -> str:
    if old.is_derived:
        return "derived, unchanged"
    if old.values is not None:
        return f"{old.values} -> {new['values']}"
    return f"[{old.min:g}, {old.max:g}] -> [{new['min']:g}, {new['max']:g}]"


def refined_sweep(
    sweep: dict[str, Any],
    spec: SweepSpec,
    trials: Sequence[ObservedTrial],
    *,
    name: str | None = None,
    top: int = REFINE_TOP,
    margin: float = REFINE_MARGIN,
    max_trials: int | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The refined sweep's manifest, and lines saying how it was made (for YAML comments).

    `sweep` is the earlier sweep as stored; `spec` its parsed spec; `trials` its trials. The new
    sweep is named `name` (default <sweep>-refined), runs `max_trials` (default the earlier
    sweep's number of trials) and warm-starts from the earlier sweep.
    """
    old_name = sweep["metadata"]["name"]
    best = top_trials(spec, trials, top)
    if not best:
        raise RefineError(
            f"sweep {old_name} has no scored trial (a succeeded trial that reported "
            f"{spec.objective.metric}) to refine around"
        )
    parameters = narrowed_parameters(spec, best, margin)
    new_spec = copy.deepcopy(sweep["spec"])
    new_spec["parameters"] = parameters
    # A refined sweep's own warm start goes on too: coarse -> refined -> final learns from both.
    earlier = spec.algorithm.warm_start.sweeps if spec.algorithm.warm_start else []
    sources = [old_name, *(s for s in earlier if s != old_name)][:MAX_WARM_START_SWEEPS]
    new_spec["algorithm"] = {
        "name": "tpe",
        "seed": spec.algorithm.seed,
        "startupTrials": spec.algorithm.startup_trials,
        "warmStart": {"sweeps": sources},
    }
    new_spec["maxTrials"] = max_trials or len(suggester(spec).indices().indices)
    metadata = {"name": name or f"{old_name}-refined"}
    if sweep["metadata"].get("namespace"):
        metadata["namespace"] = sweep["metadata"]["namespace"]
    scored = sum(t.state == TrialState.SUCCEEDED for t in trials)
    notes = [
        f"refined from sweep {old_name}: around its {len(best)} best of {scored} succeeded "
        f"trials ({', '.join(t.name for t in best)}), ranges widened by {margin:g} of their "
        "spread; TPE starts from its trials (warmStart)",
        *(f"{n}: {_describe(spec.parameters[n], parameters[n])}" for n in sorted(spec.parameters)),
    ]
    manifest = {
        "apiVersion": sweep["apiVersion"],
        "kind": sweep["kind"],
        "metadata": metadata,
        "spec": new_spec,
    }
    return manifest, notes

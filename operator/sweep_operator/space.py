"""The search space: trial index -> parameters, for grid and random search (and TPE's
random startup trials); the algorithms themselves are in `sweep_operator.search`.

Both algorithms are random-access: the parameters of trial i are computed from i alone (and
the seed), never from a sequence of earlier draws. That makes the operator restart-safe for
free: trials are identified by index, and re-planning recomputes the same parameters.

Grid order: parameters sorted by name (the apiserver does not keep the order of a mapping's
keys, so the YAML order cannot be relied on), the last name varying fastest, each parameter's
values in the order listed. This is `itertools.product` over the sorted names.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from sweep_operator.api import ParameterSpec, Scalar, SweepSpec
from sweep_operator.expr import derive

# Random floats keep 6 significant digits: enough for hyperparameters, and short on a command
# line and in MLflow's params table.
SIGNIFICANT_DIGITS = 6


def searched(parameters: dict[str, ParameterSpec]) -> dict[str, ParameterSpec]:
    """The search dimensions: every parameter but the derived (expr) ones."""
    return {name: p for name, p in parameters.items() if not p.is_derived}


def derived(parameters: dict[str, ParameterSpec]) -> dict[str, str]:
    """Derived parameters: name -> expr."""
    return {name: p.expr for name, p in parameters.items() if p.expr is not None}


def grid_size(parameters: dict[str, ParameterSpec]) -> int:
    """Number of points of the grid (the product of the value list lengths)."""
    size = 1
    for spec in searched(parameters).values():
        assert spec.values is not None  # the API refuses ranges with algorithm grid
        size *= len(spec.values)
    return size


def grid_point(parameters: dict[str, ParameterSpec], index: int) -> dict[str, Scalar]:
    """Parameters of grid point `index` (0-based, in the documented order)."""
    parameters = searched(parameters)
    size = grid_size(parameters)
    if not 0 <= index < size:
        raise IndexError(f"grid index {index} out of range, the grid has {size} points")
    point: dict[str, Scalar] = {}
    # Mixed-radix decoding of the index, least significant digit = last name.
    for name in sorted(parameters, reverse=True):
        values = parameters[name].values
        assert values is not None  # grid_size checked it
        index, digit = divmod(index, len(values))
        point[name] = values[digit]
    return dict(sorted(point.items()))


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def sample_parameter(name: str, spec: ParameterSpec, rng: random.Random) -> Scalar:
    """One random draw of a parameter."""
    if spec.values is not None:
        return rng.choice(spec.values)
    assert spec.min is not None and spec.max is not None  # ParameterSpec validated it
    low, high = spec.min, spec.max
    if spec.type == "int":
        step = spec.step or 1
        count = int((high - low) // step) + 1
        return int(low) + step * rng.randrange(count)
    if spec.type == "log_uniform":
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    # Rounding may step just outside the bounds; the bounds are inclusive, so clamp.
    return min(max(_round(value), low), high)


def random_point(
    parameters: dict[str, ParameterSpec], seed: int, index: int, attempt: int = 0
) -> dict[str, Scalar]:
    """Parameters of random trial `index`.

    Each parameter gets its own generator seeded by (seed, index, name). String seeds are
    hashed with SHA-512 by `random.Random`, so this is stable across processes and Python
    hash randomization, and adding a parameter leaves the others' draws unchanged. A trial
    whose draw is refused (spec.constraints) draws again with (seed, index, attempt, name).
    """
    key = f"{seed}:{index}" if attempt == 0 else f"{seed}:{index}:{attempt}"
    return {
        name: sample_parameter(name, parameters[name], random.Random(f"{key}:{name}"))
        for name in sorted(searched(parameters))
    }


def in_space(parameters: dict[str, ParameterSpec], point: dict[str, Any]) -> str | None:
    """Why `point` is not a point of the space (its searched part), or None when it is."""
    space = searched(parameters)
    if set(point) - set(derived(parameters)) != set(space):
        return f"its parameters are {sorted(point)}, the space has {sorted(space)}"
    for name, spec in sorted(space.items()):
        value = point[name]
        if spec.values is not None:
            if value not in spec.values:
                return f"{name}={value!r} is not one of {spec.values}"
            continue
        assert spec.min is not None and spec.max is not None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{name}={value!r} is not a number"
        if not spec.min <= value <= spec.max:
            return f"{name}={value!r} is outside [{spec.min:g}, {spec.max:g}]"
        if spec.type == "int" and (value - spec.min) % (spec.step or 1) != 0:
            return f"{name}={value!r} is not on the int range's step {spec.step or 1}"
    return None


# Every plan checks each existing trial's parameters against its index, so the same points
# are asked for on every reconcile; they depend on the space and the index only, and are kept
# (up to a bound) for the life of the process.
_POINTS: dict[tuple[str, int], dict[str, Any]] = {}
_POINTS_KEPT = 100_000


def remembered(key: tuple[str, int], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The point `compute` gives for `key` (the spec's JSON as far as it decides the point, and
    the index), computed once per process."""
    if key not in _POINTS:
        if len(_POINTS) >= _POINTS_KEPT:
            _POINTS.clear()
        _POINTS[key] = compute()
    return dict(_POINTS[key])


def grid_trial(spec: SweepSpec, index: int) -> dict[str, Any]:
    """Parameters of grid point `index` of the sweep, derived parameters included."""
    key = (f"grid {_space_key(spec)}", index)
    return remembered(key, lambda: with_derived(spec, grid_point(spec.parameters, index)))


def random_trial(spec: SweepSpec, index: int) -> dict[str, Any]:
    """Parameters of random draw `index` of the sweep, derived parameters included."""
    key = (f"random {_space_key(spec)}", index)
    return remembered(
        key, lambda: with_derived(spec, random_point(spec.parameters, spec.algorithm.seed, index))
    )


# Serialising the space costs more than looking a point up, and a plan asks for the points of
# thousands of trials of one spec. Specs are never changed in place (updates are copies, with
# ids of their own); holding each spec keeps its id from being reused while it is a key.
_SPACE_KEYS: dict[int, tuple[SweepSpec, str]] = {}
_SPACE_KEYS_KEPT = 64


def _space_key(spec: SweepSpec) -> str:
    """The spec's JSON as far as it decides a trial's point."""
    kept = _SPACE_KEYS.get(id(spec))
    if kept is None or kept[0] is not spec:
        if len(_SPACE_KEYS) >= _SPACE_KEYS_KEPT:
            _SPACE_KEYS.clear()
        kept = (spec, spec.model_dump_json(include={"algorithm", "parameters"}))
        _SPACE_KEYS[id(spec)] = kept
    return kept[1]


def with_derived(spec: SweepSpec, point: dict[str, Any]) -> dict[str, Any]:
    """A searched point with the derived (expr) parameters added."""
    expressions = derived(spec.parameters)
    return derive(expressions, point) if expressions else point

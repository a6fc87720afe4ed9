"""spec.constraints: which configurations a sweep may start. Pure; `plan.plan` applies it.

A configuration whose estimated peak GPU memory (`sweep_operator.memory`) exceeds
spec.constraints.maxGpuMemoryGiB never becomes a trial:

- grid: the point is skipped. The sweep runs the points that fit, each under its own grid
  index, the first maxTrials of them when maxTrials is set; the skipped ones count as
  infeasible. Which points those are follows from the spec alone, so a restart finds them again.
- random, and tpe's startup trials: trial i draws again, attempt k with the seed
  (seed, i, k), up to MAX_DRAWS times; attempt 0 is the draw of a sweep without constraints.
- tpe past its startup trials: the model is asked again with the point it proposed marked
  infeasible, up to MAX_DRAWS times (`search.tpe.suggest`).

When nothing fits, or a trial's settings cannot be estimated, the sweep fails with a
ConstraintError's reason and message (semantic.check_spec refuses the common cases at once).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sweep_operator.api import SweepSpec
from sweep_operator.expr import expression_names
from sweep_operator.memory import SETTINGS, Estimate, EstimateError, estimate, trial_settings
from sweep_operator.space import (
    derived,
    grid_point,
    random_point,
    random_trial,
    remembered,
    searched,
    with_derived,
)

# Draws of one random trial, or asks of TPE for one trial, before the sweep gives up on it.
MAX_DRAWS = 100


class ConstraintError(ValueError):
    """A trial the constraints leave no configuration for: `reason` is the condition reason,
    `field` the part of the spec to change."""

    def __init__(self, reason: str, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.reason = reason
        self.field = field
        self.detail = detail


class NoFeasibleConfiguration(ConstraintError):
    """No configuration within the memory limit could be found for a trial."""

    def __init__(self, detail: str) -> None:
        super().__init__("NoFeasibleConfiguration", "spec.constraints.maxGpuMemoryGiB", detail)


def memory_limit(spec: SweepSpec) -> float | None:
    """spec.constraints.maxGpuMemoryGiB, None when the sweep has no memory constraint."""
    return spec.constraints.max_gpu_memory_gib if spec.constraints else None


def estimate_for(spec: SweepSpec, parameters: dict[str, Any]) -> Estimate:
    """The estimate of a trial with these parameters (spec.constraints.model must be set)."""
    assert spec.constraints is not None and spec.constraints.model is not None
    values = {**spec.trainer.config, **parameters}
    try:
        settings = trial_settings(values)
    except EstimateError as error:
        raise ConstraintError("InvalidSpec", _field(spec, error.setting), str(error)) from None
    return estimate(spec.constraints.model, settings)


def _field(spec: SweepSpec, setting: str) -> str:
    """Where a sweep sets a trainer setting, for a message."""
    if setting in spec.parameters:
        return f"spec.parameters.{setting}"
    return f"spec.trainer.config.{setting}"


def _fits(spec: SweepSpec, parameters: dict[str, Any]) -> bool:
    limit = memory_limit(spec)
    return limit is None or estimate_for(spec, parameters).gib <= limit


def too_big(spec: SweepSpec, smallest: tuple[float, dict[str, Any]] | None, what: str) -> str:
    """Why no configuration could be had: `what` found none within the limit."""
    limit = memory_limit(spec)
    message = f"{what} fits maxGpuMemoryGiB={limit:g}"
    if smallest is not None:
        gib, parameters = smallest
        message += f"; the smallest estimate was {gib:.1f} GiB, with {parameters}"
    return (
        message + ": raise maxGpuMemoryGiB, or search smaller values of what the estimate "
        "reads (lora_rank, per_device_train_batch_size, per_device_eval_batch_size, "
        "cutoff_len), turn on gradient_checkpointing or quantization_bit"
    )


def drawn_parameters(spec: SweepSpec, index: int) -> dict[str, Any]:
    """Parameters of random trial `index` (or a tpe startup trial) that fit the limit."""
    limit = memory_limit(spec)
    if limit is None:
        return random_trial(spec, index)
    key = (
        spec.model_dump_json(include={"algorithm", "parameters", "constraints"})
        + spec.trainer.model_dump_json(include={"config"}),
        index,
    )
    # Asked for on every plan, like space.trial_parameters, and kept the same way.
    return remembered(key, lambda: _draw_within(spec, index, limit))


def _draw_within(spec: SweepSpec, index: int, limit: float) -> dict[str, Any]:
    smallest: tuple[float, dict[str, Any]] | None = None
    for attempt in range(MAX_DRAWS):
        parameters = (
            with_derived(spec, random_point(spec.parameters, spec.algorithm.seed, index, attempt))
            if attempt
            else random_trial(spec, index)
        )
        gib = estimate_for(spec, parameters).gib
        if gib <= limit:
            return parameters
        if smallest is None or gib < smallest[0]:
            smallest = (gib, parameters)
    raise NoFeasibleConfiguration(
        too_big(spec, smallest, f"none of {MAX_DRAWS} draws for trial {index}")
    )


def _memory_dimensions(spec: SweepSpec) -> set[str]:
    """The searched parameters a trial's estimate depends on: settings the estimate reads,
    and what the derived ones among them are computed from."""
    expressions = derived(spec.parameters)
    wanted = [name for name in SETTINGS if name in spec.parameters]
    reads: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name in reads:
            continue
        reads.add(name)
        if name in expressions:
            wanted += expression_names(name, expressions[name])
    return reads & set(searched(spec.parameters))


@dataclass(frozen=True)
class TrialIndices:
    """The indices of the trials a sweep runs, in order, and how many grid points it skips
    because their estimate is over the limit."""

    indices: Sequence[int]
    skipped: int


def fitting_grid_indices(spec: SweepSpec) -> Iterator[int]:
    """Grid indices whose point fits, in grid order.

    A point's estimate depends only on its memory dimensions, so each combination of those
    is estimated once, and a branch of the grid whose memory values fit nowhere is never
    walked: the cost is in the points yielded, however many are skipped."""
    space = searched(spec.parameters)
    names = sorted(space)  # grid order: the first name varies slowest
    values = [space[name].values or [] for name in names]
    strides = [1] * len(names)
    for k in range(len(names) - 2, -1, -1):
        strides[k] = strides[k + 1] * len(values[k + 1])
    dimensions = _memory_dimensions(spec)
    memory = [k for k, name in enumerate(names) if name in dimensions]
    fitting: set[tuple[int, ...]] = set()
    for digits in itertools.product(*(range(len(values[k])) for k in memory)):
        point = {name: values[k][0] for k, name in enumerate(names)}
        point |= {names[k]: values[k][d] for k, d in zip(memory, digits, strict=True)}
        if _fits(spec, with_derived(spec, point)):
            fitting.add(digits)
    prefixes = {key[:n] for key in fitting for n in range(len(memory) + 1)}
    chosen = set(memory)

    def walk(k: int, index: int, key: tuple[int, ...]) -> Iterator[int]:
        if k == len(names):
            yield index
            return
        for digit in range(len(values[k])):
            branch = (*key, digit) if k in chosen else key
            if branch in prefixes:
                yield from walk(k + 1, index + digit * strides[k], branch)

    yield from walk(0, 0, ())


def check_estimable(spec: SweepSpec) -> None:
    """Raise ConstraintError when the estimate cannot read a value the sweep searches."""
    if memory_limit(spec) is None:
        return
    for name in sorted(_memory_dimensions(spec)):
        for value in spec.parameters[name].values or []:
            estimate_for(spec, {name: value})


def smallest_grid_estimate(spec: SweepSpec) -> tuple[float, dict[str, Any]]:
    """The grid point with the smallest estimate and that estimate (GiB), for a message."""
    return min(
        ((estimate_for(spec, p).gib, p) for p in _every_memory_point(spec)),
        key=lambda s: s[0],
    )


def _every_memory_point(spec: SweepSpec) -> Iterator[dict[str, Any]]:
    """One grid point per combination of the memory dimensions' values."""
    space = searched(spec.parameters)
    memory = sorted(_memory_dimensions(spec))
    first = grid_point(spec.parameters, 0)
    for combination in itertools.product(*(space[name].values or [] for name in memory)):
        yield with_derived(spec, first | dict(zip(memory, combination, strict=True)))

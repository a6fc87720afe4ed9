"""Checks that need more than the CRD schema: they set the sweep Failed before any Job exists.

The schema and CEL rules catch malformed sweeps at `kubectl apply`. What they cannot know is
checked here: whether parameter names are fields of the bundled trainer (a typo must fail in
seconds, not after an hour on a GPU), whether values fit the trainer's types, whether the grid
is absurdly large, whether spec.constraints leave a configuration to run, whether the trial
Job template renders, and whether a trial pod would get access to its node (host_access.py).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from sweep_operator.api import SweepSpec
from sweep_operator.constraints import ConstraintError
from sweep_operator.host_access import host_access, refusal
from sweep_operator.naming import trial_name
from sweep_operator.render import (
    EVAL_FILE_FIELD,
    MODEL_FIELD,
    RESERVED_ENV_PREFIX,
    TRAIN_FILE_FIELD,
    RenderError,
    SweepRef,
    render_trial_job,
)
from sweep_operator.search import suggester
from sweep_operator.space import grid_size, random_trial
from sweep_operator.trials import NewTrial

# Above this many grid points a sweep must say how many trials it wants: such a grid is more
# often a mistake (a long values list, one parameter too many) than a plan.
MAX_GRID_WITHOUT_MAX_TRIALS = 10_000

# Set by the operator from spec.trainer.model and spec.trainer.data, never by a sweep.
_OPERATOR_FIELDS = {
    MODEL_FIELD: "spec.trainer.model",
    TRAIN_FILE_FIELD: "spec.trainer.data.train",
    EVAL_FILE_FIELD: "spec.trainer.data.eval",
}


@dataclass(frozen=True)
class Problem:
    field: str  # e.g. spec.parameters.lora_rnak
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SweepInvalid(ValueError):
    """A sweep that must not run. `reason` is the CamelCase condition reason."""

    def __init__(self, reason: str, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.reason = reason
        self.problems = problems


def _location(loc: tuple[int | str, ...]) -> str:
    path = "spec"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def parse_spec(raw: Mapping[str, Any]) -> SweepSpec:
    """Validate a sweep's spec (as read from the apiserver) into a SweepSpec.

    Raises SweepInvalid(reason="InvalidSpec") with one problem per pydantic error, each
    naming the field (camelCase, as in the YAML), the message and the bad value.
    """
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as error:
        problems = []
        for e in error.errors(include_url=False):
            # Union members repeat the location with the type name; keep the YAML path.
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("missing", "value_error") and "input" in e:
                message += f" (got {e['input']!r})"
            problems.append(Problem(_location(loc), message))
        raise SweepInvalid("InvalidSpec", problems) from None


@cache
def bundled_trainer_config() -> type[BaseModel]:
    # Imported lazily: the operator only needs it for sweeps of the bundled trainer, and the
    # module is light (pydantic and yaml only).
    from lora_trainer.config import TrainConfig

    return TrainConfig


def close_matches(name: str, known: list[str]) -> list[str]:
    """Likely meant names: names containing `name`, then the best spelling matches."""
    ratios = {k: difflib.SequenceMatcher(None, name, k).ratio() for k in known}
    best = max(ratios.values(), default=0.0)
    spelled = sorted(
        (k for k, r in ratios.items() if r >= 0.6 and r >= best - 0.1),
        key=lambda k: -ratios[k],
    )
    # "epochs" or "batch_size" are fragments of the real names rather than misspellings.
    contained = [k for k in known if len(name) >= 3 and name in k and k not in spelled]
    return (contained + spelled)[:3]


def _suggest(name: str, known: list[str]) -> str:
    close = close_matches(name, known)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _value_problem(config: type[BaseModel], name: str, value: Any, where: str) -> Problem | None:
    info = config.model_fields[name]
    try:
        TypeAdapter(Annotated[info.annotation, info]).validate_python(value)
    except ValidationError as error:
        message = error.errors(include_url=False)[0]["msg"]
        return Problem(where, f"{value!r} is not valid for the trainer's {name}: {message}")
    return None


def _trainer_problems(spec: SweepSpec, config: type[BaseModel]) -> list[Problem]:
    known = sorted(config.model_fields)
    problems = []
    trainer = spec.trainer
    if trainer.model is None:
        problems.append(
            Problem("spec.trainer.model", "required for the bundled trainer (or set command)")
        )
    if trainer.data is None:
        problems.append(
            Problem("spec.trainer.data", "required for the bundled trainer: {train: <path>}")
        )

    def check_name(name: str, where: str) -> bool:
        if name in _OPERATOR_FIELDS:
            problems.append(Problem(where, f"set {_OPERATOR_FIELDS[name]} instead"))
            return False
        if name not in config.model_fields:
            problems.append(
                Problem(
                    where,
                    f"{name!r} is not a setting of the bundled trainer" + _suggest(name, known),
                )
            )
            return False
        return True

    for name, value in sorted(trainer.config.items()):
        where = f"spec.trainer.config.{name}"
        if check_name(name, where) and (p := _value_problem(config, name, value, where)):
            problems.append(p)
    for name, parameter in sorted(spec.parameters.items()):
        where = f"spec.parameters.{name}"
        if not check_name(name, where):
            continue
        if name in trainer.config:
            problems.append(
                Problem(where, f"{name} is also fixed in spec.trainer.config; keep one of them")
            )
        if parameter.is_derived:
            # The value trial 0 gets: enough to catch an expr of the wrong type (a float for
            # an int setting). Evaluation errors show up here too, before any Job exists.
            try:
                candidates = [(f"{where}.expr", random_trial(spec, 0)[name])]
            except ValueError as error:
                problems.append(Problem(f"{where}.expr", str(error)))
                continue
        elif parameter.values is not None:
            candidates = [(f"{where}.values[{i}]", v) for i, v in enumerate(parameter.values)]
        else:
            cast = int if parameter.type == "int" else float
            candidates = [
                (f"{where}.min", cast(parameter.min)),
                (f"{where}.max", cast(parameter.max)),
            ]
        for field, value in candidates:
            if p := _value_problem(config, name, value, field):
                problems.append(p)
    return problems


def check_spec(
    spec: SweepSpec,
    sweep: SweepRef,
    *,
    trainer_config: type[BaseModel] | None = None,
    template: str | None = None,
) -> list[Problem]:
    """Every semantic problem of a parsed spec; empty when the sweep may run.

    `trainer_config` is the bundled trainer's config model (lora_trainer's TrainConfig unless
    given); it is only consulted when the sweep runs the bundled trainer. `template` is the
    operator-wide Job template, if any.
    """
    problems: list[Problem] = []
    if not spec.trainer.custom:
        problems += _trainer_problems(spec, trainer_config or bundled_trainer_config())
    for i, var in enumerate(spec.trainer.env):
        if var["name"].startswith(RESERVED_ENV_PREFIX):
            problems.append(
                Problem(
                    f"spec.trainer.env[{i}].name",
                    f"{var['name']} is reserved: {RESERVED_ENV_PREFIX}* variables are set by "
                    "the operator",
                )
            )
    # The rendered Job is checked too (render_trial_job); here the volume gets its own field.
    for where, what in host_access({"volumes": spec.trainer.volumes}, "spec.trainer"):
        problems.append(Problem(where, refusal(what)))
    warm = spec.algorithm.warm_start
    for i, name in enumerate(warm.sweeps if warm else []):
        if name == sweep.name:
            problems.append(
                Problem(
                    f"spec.algorithm.warmStart.sweeps[{i}]",
                    f"{name} is this sweep; warm start reads the trials of earlier sweeps",
                )
            )
    if spec.algorithm.name == "grid":
        size = grid_size(spec.parameters)
        if spec.max_trials is None and size > MAX_GRID_WITHOUT_MAX_TRIALS:
            dims = " x ".join(
                f"{len(p.values or [])} {name}" for name, p in sorted(spec.parameters.items())
            )
            problems.append(
                Problem(
                    "spec.maxTrials",
                    f"the grid has {size:,} trials ({dims}); above "
                    f"{MAX_GRID_WITHOUT_MAX_TRIALS:,} set maxTrials to run a prefix of it, or "
                    "use algorithm random",
                )
            )
    index, parameters = 0, {}
    if not problems:
        # The first trial, which a memory limit may make another than index 0; when no
        # configuration fits it, or the estimate cannot read a setting, every trial would fail.
        try:
            index, parameters = suggester(spec).first()
        except ConstraintError as error:
            problems.append(Problem(error.field, error.detail))
    if not problems:
        # A dry run of the first trial: a template or args string that fails here would fail
        # for every trial.
        trial = NewTrial(index=index, name=trial_name(sweep.name, index), parameters=parameters)
        try:
            render_trial_job(sweep, spec, trial, template=template)
        except RenderError as error:
            problems.append(Problem(error.field, str(error).removeprefix(f"{error.field}: ")))
    return problems


def validate_sweep(
    raw_spec: Mapping[str, Any],
    sweep: SweepRef,
    *,
    trainer_config: type[BaseModel] | None = None,
    template: str | None = None,
) -> SweepSpec:
    """parse_spec then check_spec; raises SweepInvalid (reason InvalidSpec) on any problem."""
    spec = parse_spec(raw_spec)
    problems = check_spec(spec, sweep, trainer_config=trainer_config, template=template)
    if problems:
        raise SweepInvalid("InvalidSpec", problems)
    return spec

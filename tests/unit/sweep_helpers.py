"""Shared builders for the operator's unit tests (a plain module: conftest.py names clash
across test folders)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sweep_operator.api import SweepSpec
from sweep_operator.naming import trial_name
from sweep_operator.search import suggester
from sweep_operator.space import random_trial
from sweep_operator.trials import ObservedTrial, TrialState

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
EXAMPLE = REPO / "examples" / "sweep.yaml"

BASE_SPEC: dict[str, Any] = {
    "objective": {"metric": "eval_loss", "goal": "minimize"},
    "algorithm": {"name": "grid"},
    "parameters": {
        "lora_rank": {"values": [8, 16, 32]},
        "learning_rate": {"values": [1.0e-4, 2.0e-4]},
    },
    "maxTrials": 6,
    "parallelism": 2,
    "trainer": {
        "image": "trainer:test",
        "model": "/models/tiny",
        "data": {"train": "/data/train.jsonl", "eval": "/data/val.jsonl"},
        "config": {"num_train_epochs": 1},
    },
}


def raw_spec(**changes: Any) -> dict[str, Any]:
    """BASE_SPEC with top-level keys replaced (None deletes a key)."""
    spec = copy.deepcopy(BASE_SPEC)
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def make_spec(**changes: Any) -> SweepSpec:
    return SweepSpec.model_validate(raw_spec(**changes))


def trial_parameters(spec: SweepSpec, index: int) -> dict[str, Any]:
    """Trial `index`'s parameters where the sweep's algorithm fixes them by index (grid,
    random, TPE's startup trials); elsewhere a random draw, as a stand-in for a model's."""
    return suggester(spec).fixed(index) or random_trial(spec, index)


def observed_trial(
    spec: SweepSpec, index: int, state: TrialState, value: float | None = None, **fields: Any
) -> ObservedTrial:
    """Trial `index` of sweep `sw` as the operator would observe it; started at T0 unless
    `fields` say otherwise."""
    fields.setdefault("start_time", T0)
    return ObservedTrial(
        name=trial_name("sw", index),
        index=index,
        parameters=trial_parameters(spec, index),
        state=state,
        value=value,
        **fields,
    )

"""Shared builders for the operator's unit tests (a plain module: conftest.py names clash
across test folders)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from sweep_operator.api import SweepSpec

REPO = Path(__file__).resolve().parents[2]
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

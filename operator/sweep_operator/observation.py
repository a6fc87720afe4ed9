"""What one reconcile saw of a sweep, and what the reconciler remembers of its earlier ones:
the input of `plan.plan`. Plain data, filled by the adapters (handlers.py and its helpers)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sweep_operator.api import MlflowStatus, ParameterImportance
from sweep_operator.trials import FetchState, NewTrial, ObservedFetch, ObservedTrial, TrialState
from sweep_operator.warm_start import WarmStart


@dataclass(frozen=True)
class TrialRun:
    """A trial's MLflow run as far as the plan needs it."""

    run_id: str
    adapter: str | None = None  # the artifact path of its uploaded adapter, once uploaded


@dataclass(frozen=True)
class Memory:
    """What the reconciler has already seen, said or done. A restarted operator starts with
    none of it; the plan then repeats at most an Event, a report or an MLflow tag."""

    states: Mapping[str, TrialState] | None = None  # trial states last time; None: first time
    fetch_state: FetchState | None = None  # the model download's state last time
    warm_summary: str = ""  # the warm-start summary last posted
    reported: tuple[int, str] | None = None  # (finished trials, phase) of the last report
    report_age: float = math.inf  # seconds since that report
    importance: ParameterImportance | None = None  # the last one computed
    registered: Mapping[str, str] = field(default_factory=dict)  # trial -> models:/ URI
    tagged: frozenset[str] = frozenset()  # stopped trials whose MLflow run says why
    parent_closed: bool = False


@dataclass(frozen=True)
class Observation:
    sweep: str  # the sweep's name
    generation: int | None
    trials: Sequence[ObservedTrial]  # from the Jobs, their pods and MLflow
    # Trials this operator created that the Job index has not shown yet.
    unindexed: Sequence[NewTrial] = ()
    fetch: ObservedFetch | None = None  # the model download of spec.trainer.modelCache
    warm: WarmStart | None = None  # the history of spec.algorithm.warmStart
    mlflow: MlflowStatus | None = None  # the experiment and parent run, once known
    tracking_uri: str | None = None  # None: the sweep is not tracked
    runs: Mapping[str, TrialRun] = field(default_factory=dict)  # MLflow runs by trial
    memory: Memory = field(default_factory=Memory)

"""Trials as the planner sees them: what was observed in the cluster, and what to create."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

# Labels and annotations on trial Jobs (and their pods). The operator finds a sweep's trials
# by the sweep label and rebuilds everything else from the annotations.
LABEL_SWEEP = "lorasweep.io/sweep"
LABEL_TRIAL = "lorasweep.io/trial"
ANNOTATION_PARAMETERS = "lorasweep.io/parameters"
ANNOTATION_INDEX = "lorasweep.io/trial-index"
# Set, with the reason, on the Job of a trial the operator stopped (early stopping, time
# budget, failed sweep). The Job is suspended rather than deleted, so that the trial stays
# observable as pruned, and is never planned again, after a restart. It is what tells such a
# Job from one that Kueue keeps suspended (queued, or preempted), which waits to run.
ANNOTATION_STOPPED = "lorasweep.io/stopped"
# Kueue's labels on a trial Job: the LocalQueue it waits in, and its WorkloadPriorityClass.
LABEL_QUEUE_NAME = "kueue.x-k8s.io/queue-name"
LABEL_PRIORITY_CLASS = "kueue.x-k8s.io/priority-class"


class Point(NamedTuple):
    """One logged value of a metric."""

    step: int
    value: float
    # When it was logged (seconds since the epoch; 0 when unknown). ASHA orders the trials
    # that reached a rung by it, so that a trial is judged only against those there before it.
    time: float = 0.0


# A learning curve: one metric's points in step order.
Curve = list[Point]

# The extended resource the operator sets to spec.trainer.gpus in the trainer's limits.
GPU_RESOURCE = "nvidia.com/gpu"
# The pod volume of spec.trainer.checkpoints; a user volume may not take its name.
CHECKPOINT_VOLUME = "lorasweep-checkpoints"
# The pod volume of spec.trainer.modelCache; a user volume may not take its name.
MODEL_CACHE_VOLUME = "lorasweep-model-cache"
# On the Job (and its pod) that downloads a sweep's model into spec.trainer.modelCache; it also
# carries LABEL_SWEEP, so that its changes wake the sweep, but no trial label or index.
LABEL_MODEL_FETCH = "lorasweep.io/model-fetch"


class TrialState(StrEnum):
    QUEUED = "queued"  # Job suspended by Kueue: not admitted yet, or preempted
    PENDING = "pending"  # Job exists (admitted), pod not running yet (e.g. waiting for a GPU)
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed after the Job's retries
    STOPPED = "stopped"  # stopped by the operator (early stopping, the time budget, a failure)
    INFEASIBLE = "infeasible"  # ran out of GPU memory (exit code 4): the configuration is too big

    @property
    def active(self) -> bool:
        return self in (TrialState.QUEUED, TrialState.PENDING, TrialState.RUNNING)


class ObservedTrial(BaseModel):
    """One trial as observed by the operator's adapters (Job, pod, termination message, MLflow)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    index: int = Field(ge=0)
    parameters: dict[str, Any]
    state: TrialState
    value: float | None = None  # the objective metric's final value, when reported
    metrics: dict[str, float] = Field(default_factory=dict)  # everything else reported
    mlflow_run_id: str | None = None
    start_time: datetime | None = None
    finish_time: datetime | None = None
    message: str = ""  # e.g. why it failed
    # Intermediate values per metric name, in step order: what the trial logged at each
    # evaluation. Early stopping and TPE read the objective's curve from it.
    curves: dict[str, Curve] = Field(default_factory=dict)


class NewTrial(BaseModel):
    """A trial the plan wants created."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0)
    name: str
    parameters: dict[str, Any]


class FetchState(StrEnum):
    MISSING = "missing"  # no download Job yet
    RUNNING = "running"  # the Job exists and has not finished
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed after the Job's retries


class ObservedFetch(BaseModel):
    """The download of spec.trainer.model into spec.trainer.modelCache, from its Job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state: FetchState
    message: str = ""  # why it failed: the Job's reason and the pod's termination message
    finish_time: datetime | None = None

"""The trial contract: what the operator gives every trial, and what a trial gives back.

A trial (the bundled trainer or a user's own program) gets its identity, parameters and where
to log from the environment variables below; it logs to an MLflow run tagged with its sweep
and trial, and writes a `TrialResult` as JSON to its termination message. The operator sets
the variables (`sweep_operator.render`), finds the runs by their tags
(`sweep_operator.tracking`) and reads the result (`sweep_operator.observe`); the trainer and
the e2e trial programs keep the other side. These names and the JSON are on the wire: trials
already running and MLflow runs already recorded are read by whichever version comes next,
so they never change.

It lives in `lora_trainer` because both images already install that package and nothing
else of the other side: the trainer image copies `lora_trainer` (its build context is
`trainer_image/`), and the operator image installs `lora_trainer` without the trainer's
dependencies, for `TrainConfig`. A package of its own would need both Dockerfiles, and the
trainer image's build context, changed for no dependency saved. This module imports only the
standard library, so that importing it pulls in none of the trainer's dependencies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --- The trial's environment, set by the operator ------------------------------------------

# The operator's own variables: a user's spec.trainer.env cannot set any of these.
RESERVED_ENV_PREFIX = "LORASWEEP_"
ENV_SWEEP = "LORASWEEP_SWEEP"
ENV_NAMESPACE = "LORASWEEP_NAMESPACE"
ENV_TRIAL = "LORASWEEP_TRIAL"  # the trial's name, its Job's
ENV_TRIAL_INDEX = "LORASWEEP_TRIAL_INDEX"
ENV_PARAMS = "LORASWEEP_PARAMS"  # the trial's parameters, a JSON object
ENV_OBJECTIVE = "LORASWEEP_OBJECTIVE"  # the objective metric's name
ENV_RESULT_PATH = "LORASWEEP_RESULT_PATH"  # where to write the TrialResult
# With gpus or nodes > 1: for a program that starts its own launcher.
ENV_NNODES = "LORASWEEP_NNODES"
ENV_NPROC_PER_NODE = "LORASWEEP_NPROC_PER_NODE"
# With nodes > 1: the rendezvous, on the trial's pod of index 0.
ENV_MASTER_ADDR = "LORASWEEP_MASTER_ADDR"
ENV_MASTER_PORT = "LORASWEEP_MASTER_PORT"
# With spec.trainer.checkpoints: the trial's own checkpoint directory, and how often to save.
ENV_CHECKPOINT_DIR = "LORASWEEP_CHECKPOINT_DIR"
ENV_CHECKPOINT_STEPS = "LORASWEEP_CHECKPOINT_STEPS"
# With spec.trainer.modelCache: the downloaded model's directory.
ENV_MODEL_PATH = "LORASWEEP_MODEL_PATH"
# MLflow's names, which its client reads too: a user's env may override them (a Secret).
ENV_MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_MLFLOW_EXPERIMENT_NAME = "MLFLOW_EXPERIMENT_NAME"
ENV_MLFLOW_PARENT_RUN_ID = "MLFLOW_PARENT_RUN_ID"  # the sweep's parent run

# --- MLflow tags ---------------------------------------------------------------------------

# On every trial's run: how the operator finds a sweep's trials and their results.
TAG_SWEEP = "lorasweep.sweep"
TAG_TRIAL = "lorasweep.trial"
# MLflow's own: shows the trial's run under the sweep's parent run.
TAG_PARENT_RUN_ID = "mlflow.parentRunId"
# Set by the bundled trainer once its adapter is uploaded: the adapter's artifact path.
TAG_ADAPTER = "lorasweep.adapter_artifact"
# Set by the operator on the run of a trial it stopped: why.
TAG_STOPPED = "lorasweep.stopped_reason"
# On the sweep's parent run, with TAG_SWEEP; a restarted operator finds it again by the uid.
TAG_NAMESPACE = "lorasweep.namespace"
TAG_SWEEP_UID = "lorasweep.sweep_uid"
TAG_ROLE = "lorasweep.role"
ROLE_PARENT = "parent"
TAG_BEST_TRIAL = "lorasweep.best_trial"

# --- The result ----------------------------------------------------------------------------

# The trial container's terminationMessagePath, and ENV_RESULT_PATH's value in a trial.
RESULT_PATH = "/dev/termination-log"
# Kubernetes keeps at most 4096 bytes of a termination message.
RESULT_LIMIT_BYTES = 4096
# An error is cut to this many characters, so that the metrics beside it still fit.
ERROR_LIMIT_CHARS = 1500
# The exit code of a trial that ran out of GPU memory: its configuration is infeasible rather
# than failed.
EXIT_OUT_OF_MEMORY = 4


class ResultError(ValueError):
    """A termination message that is not a TrialResult."""


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics that are finite numbers, as floats: NaN, infinities, bools and anything
    else are left out (JSON has no NaN, and a bool is no measurement)."""
    result = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            continue
        if math.isfinite(number):
            result[str(name)] = number
    return result


@dataclass(frozen=True)
class TrialResult:
    """What a trial reports in its termination message: `{"metrics": {...}}`, and `"error"`
    beside them when it failed or was stopped. Its final metrics win over its MLflow run's."""

    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> str:
        """Compact JSON of at most RESULT_LIMIT_BYTES: metrics that are not finite numbers are
        left out, the error is cut to ERROR_LIMIT_CHARS, and the last metrics are dropped
        until it fits."""
        document: dict[str, Any] = {"metrics": finite_metrics(self.metrics)}
        if self.error:
            document["error"] = self.error[:ERROR_LIMIT_CHARS]
        text = json.dumps(document, separators=(",", ":"))
        while len(text.encode()) > RESULT_LIMIT_BYTES and document["metrics"]:
            document["metrics"].popitem()
            text = json.dumps(document, separators=(",", ":"))
        return text

    @classmethod
    def from_json(cls, text: str) -> TrialResult:
        """Read a termination message; ResultError says why one is not a result. A metric
        that is not a finite number is skipped, as a writer leaves it out, and so is an error
        that is not a string: a result written by any version stays readable."""
        try:
            document = json.loads(text)
        except ValueError as error:
            raise ResultError(f"a trial result is JSON; this is not: {error}") from None
        if not isinstance(document, dict):
            raise ResultError(
                f'a trial result is a JSON object {{"metrics": {{...}}}}, not a '
                f"{type(document).__name__}"
            )
        metrics = document.get("metrics")
        if not isinstance(metrics, dict):
            found = "has none" if metrics is None else f"has a {type(metrics).__name__}"
            raise ResultError(
                f'a trial result has "metrics", a JSON object of numbers; this one {found}'
            )
        error = document.get("error")
        return cls(metrics=finite_metrics(metrics), error=error if isinstance(error, str) else None)


def result_path(environ: Mapping[str, str]) -> Path:
    """Where this trial writes its result: ENV_RESULT_PATH, else the termination message."""
    return Path(environ.get(ENV_RESULT_PATH) or RESULT_PATH)

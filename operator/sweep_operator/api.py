"""The HyperparameterSweep API (lorasweep.io/v1alpha1) as pydantic models.

These models are the single source of truth: the operator parses sweeps with them and
`sweep_operator.crd` generates the CRD's openAPIV3Schema from them. Every field carries a
description (it becomes `kubectl explain` text). Cross-field rules are written twice, side by
side: as a pydantic validator (the operator's check, with a precise message) and as a CEL rule
in `x-kubernetes-validations` (so `kubectl apply` refuses the sweep before it is stored).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from sweep_operator.expr import check_expressions
from sweep_operator.trials import CHECKPOINT_VOLUME, GPU_RESOURCE, MODEL_CACHE_VOLUME

GROUP = "lorasweep.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "HyperparameterSweep"
PLURAL = "hyperparametersweeps"
SINGULAR = "hyperparametersweep"

# Parameter names end up in `--set name=value`, in Jinja2 (`params.name`) and in MLflow.
PARAMETER_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]*$"
MAX_PARAMETERS = 64
MAX_VALUES = 1000
# A Kueue LocalQueue or WorkloadPriorityClass name, as the label value it becomes on a Job;
# an empty queueName opts a sweep out of the operator's default queue.
QUEUE_NAME_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"
PRIORITY_CLASS_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
MAX_LABEL_VALUE = 63
# A PersistentVolumeClaim's name is a DNS-1123 subdomain.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
MAX_DNS_SUBDOMAIN = 253
MAX_WARM_START_SWEEPS = 16
# A Hugging Face hub model id, `name` or `org/name`: what spec.trainer.modelCache downloads.
# The hub also forbids "--" and ".." in a name, which makes <org>--<name> a unique directory.
_HUB_NAME = r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?"
HUB_ID_PATTERN = f"^{_HUB_NAME}(/{_HUB_NAME})?$"

# A parameter value: what a YAML scalar can be. Lists and mappings are refused on purpose, a
# trial's parameters must fit on a command line and in an MLflow param.
Scalar = bool | int | float | str

Phase = Literal["Pending", "Running", "Succeeded", "Failed"]


def _cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


class _Model(BaseModel):
    # camelCase on the wire, snake_case in Python; extra="forbid" so that a typo such as
    # `maxTrails` is an error rather than a silently ignored field.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ObjectiveMetric(_Model):
    """One of several objectives."""

    name: str = Field(min_length=1, description="Metric name, as the trial reports it.")
    goal: Literal["minimize", "maximize"] = Field(
        "minimize", description="Whether a smaller or larger value of this metric is better."
    )
    weight: float = Field(
        1.0, gt=0, description="Weight of the metric in the weighted sum (mode weighted)."
    )


class Objective(_Model):
    """What the sweep optimizes: one metric reported by every trial, and its direction."""

    metric: str = Field(
        min_length=1,
        description="Name of the metric to optimize, as the trial reports it "
        "(e.g. eval_loss). The best trial is chosen by this metric's final value.",
    )
    goal: Literal["minimize", "maximize"] = Field(
        "minimize", description="Whether a smaller (minimize) or larger (maximize) value is better."
    )
    additional_metrics: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="Further metrics to show with each trial: a column each in the report's "
        "trials_summary.csv, with the trial's last reported value. They do not influence which "
        "trial is best (status.bestTrial.metrics and MLflow have every metric anyway).",
    )
    metrics: list[ObjectiveMetric] = Field(
        default_factory=list,
        max_length=16,
        description="Several objectives at once. Lists every objective, including metric "
        "(which stays the primary one: the printer column, the curve early stopping reads). "
        "See mode for how they combine.",
    )
    mode: Literal["weighted", "pareto"] = Field(
        "weighted",
        description="How metrics combine. weighted: each metric is min-max normalised to [0, 1] "
        "over the scored trials, turned round (1 - x) when its goal differs from goal, and the "
        "objective is the sum of weight * normalised value. pareto: the Pareto-optimal trials "
        "are listed in status.paretoFront; bestTrial is best by metric.",
    )

    @model_validator(mode="after")
    def _primary_listed(self) -> Objective:
        if not self.metrics:
            return self
        names = [m.name for m in self.metrics]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"metrics lists {name} twice; each metric must appear once")
        primary = next((m for m in self.metrics if m.name == self.metric), None)
        if primary is None:
            raise ValueError(
                f"metrics must include the primary metric {self.metric} (got {', '.join(names)})"
            )
        if primary.goal != self.goal:
            raise ValueError(
                f"metrics entry {self.metric} has goal {primary.goal} but objective.goal is "
                f"{self.goal}; they must agree"
            )
        return self


class WarmStart(_Model):
    """Earlier sweeps whose finished trials seed TPE."""

    # The pattern is written into the schema (kubectl apply refuses a bad name) and checked by
    # the validator below, whose message says what is accepted.
    sweeps: list[
        Annotated[
            str,
            Field(
                max_length=MAX_DNS_SUBDOMAIN, json_schema_extra={"pattern": DNS_SUBDOMAIN_PATTERN}
            ),
        ]
    ] = Field(
        min_length=1,
        max_length=MAX_WARM_START_SWEEPS,
        description="Names of HyperparameterSweeps in this namespace. Their succeeded trials "
        "that lie in this sweep's space and report its objective are TPE's history from the "
        "start, and the random startup trials are fewer by as many. The sweep waits until they "
        "have ended, and fails if one does not exist.",
    )

    @field_validator("sweeps")
    @classmethod
    def _names(cls, sweeps: list[str]) -> list[str]:
        for name in sweeps:
            if not re.fullmatch(DNS_SUBDOMAIN_PATTERN, name):
                raise ValueError(
                    f"{name!r} is not a HyperparameterSweep name: lower-case letters, digits, "
                    "'-' and '.', starting and ending with a letter or digit"
                )
            if sweeps.count(name) > 1:
                raise ValueError(f"sweeps lists {name} twice; each sweep must appear once")
        return sweeps


class Algorithm(_Model):
    """How trial parameters are chosen from the search space."""

    name: Literal["grid", "random", "tpe", "bohb"] = Field(
        "grid",
        description="grid: every combination of the parameters' values (cartesian product, "
        "parameters in alphabetical order, the last one varying fastest). random: independent "
        "seeded samples; trial i depends only on (seed, i). tpe: Bayesian optimization with "
        "optuna's Tree-structured Parzen Estimator, learning from the finished trials; the first "
        "startupTrials trials are random. bohb: tpe that learns from the trials' values at the "
        "highest rung of earlyStopping (asha or hyperband) that enough trials reached, so it is "
        "guided long before trials finish.",
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seed of the random, tpe and bohb algorithms. The same seed (and, for tpe "
        "and bohb, the same results) gives the same trials.",
    )
    startup_trials: int = Field(
        10,
        ge=1,
        description="tpe and bohb: how many trials are drawn at random before the model guides "
        "the search (optuna's n_startup_trials).",
    )
    warm_start: WarmStart | None = Field(
        None,
        description="tpe: start from the finished trials of earlier sweeps, e.g. the coarse "
        "sweep that `lorasweep refine` narrowed this one from.",
    )


class ParameterSpec(_Model):
    """One dimension of the search space: a list of values, or a typed range."""

    # `values` holds mixed scalars, which a structural schema can only leave untyped, and
    # untyped fields are invisible to CEL. So the CEL rules below check type/min/max/step; the
    # rules about values are enforced by the validators here (the sweep goes Failed).
    model_config = ConfigDict(
        json_schema_extra={
            "minProperties": 1,
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.type) || self.type == 'categorical' || (has(self.min) && "
                    "has(self.max) && self.min < self.max)",
                    "a range (uniform, log_uniform, int) needs min < max",
                ),
                _cel(
                    "has(self.type) && self.type != 'categorical' || "
                    "!has(self.min) && !has(self.max)",
                    "min and max need a range type (uniform, log_uniform, int)",
                ),
                _cel(
                    "!has(self.type) || self.type != 'log_uniform' || "
                    "(has(self.min) && self.min > 0.0)",
                    "type log_uniform needs min > 0",
                ),
                _cel(
                    "!has(self.step) || (has(self.type) && self.type == 'int')",
                    "step is only allowed with type int",
                ),
                _cel(
                    "!has(self.expr) || !has(self.type) && !has(self.min) && !has(self.max)",
                    "expr cannot be combined with type, min or max",
                ),
            ],
        }
    )

    type: Literal["uniform", "log_uniform", "int", "categorical"] | None = Field(
        None,
        description="Kind of range for random search: uniform (float in [min, max]), "
        "log_uniform (float, uniform in log space, min > 0), int (integer in [min, max] on a "
        "step grid), categorical (one of values). Omit it to give a plain list of values.",
    )
    values: list[Scalar] | None = Field(
        None,
        min_length=1,
        max_length=MAX_VALUES,
        description="Explicit values (numbers, strings or booleans), tried in this order by grid "
        "search and drawn uniformly by random search.",
    )
    min: float | None = Field(None, description="Lower bound of a range, inclusive.")
    max: float | None = Field(None, description="Upper bound of a range, inclusive.")
    step: int | None = Field(
        None, ge=1, description="Spacing of an int range: min, min+step, ... up to max. Default 1."
    )
    expr: str | None = Field(
        None,
        min_length=1,
        max_length=500,
        description="A derived parameter computed from the others instead of searched, e.g. "
        '"2 * lora_rank". Arithmetic (+ - * / // % **), numbers, other parameter names and '
        "min, max, round, int, float. Nothing else is evaluated.",
    )

    @field_validator("values", mode="before")
    @classmethod
    def _scalars(cls, values: Any) -> Any:
        # One clear message instead of one error per member of the Scalar union.
        if isinstance(values, list):
            for i, value in enumerate(values):
                if not isinstance(value, bool | int | float | str):
                    raise ValueError(
                        f"values[{i}] is {value!r}; a value must be a number, string or boolean"
                    )
        return values

    @field_validator("values")
    @classmethod
    def _no_duplicates(cls, values: list[Scalar] | None) -> list[Scalar] | None:
        if values is None:
            return values
        seen: set[str] = set()
        for value in values:
            key = json.dumps(value)
            if key in seen:
                raise ValueError(f"values contain {key} twice; each value must appear once")
            seen.add(key)
        return values

    @model_validator(mode="after")
    def _consistent(self) -> ParameterSpec:
        kind = self.type
        if self.expr is not None:
            given = [k for k in ("type", "values", "min", "max", "step") if getattr(self, k)]
            if given:
                raise ValueError(f"expr cannot be combined with {', '.join(given)}")
            return self
        if kind is None and self.values is None:
            raise ValueError(
                "a parameter needs either values: [...], a type "
                "(uniform, log_uniform, int, categorical) or an expr"
            )
        if kind == "categorical" and self.values is None:
            raise ValueError("type categorical needs values: [...]")
        if self.values is not None and kind not in (None, "categorical"):
            raise ValueError(
                f"values cannot be combined with type {kind}; a range takes min and max"
            )
        if kind in (None, "categorical"):
            if self.min is not None or self.max is not None:
                raise ValueError("min and max need a range type (uniform, log_uniform, int)")
        else:
            if self.min is None or self.max is None:
                raise ValueError(f"type {kind} needs both min and max")
            if not self.min < self.max:
                raise ValueError(
                    f"min ({self.min:g}) must be less than max ({self.max:g}) for type {kind}"
                )
        if kind == "log_uniform" and self.min is not None and self.min <= 0:
            raise ValueError(f"type log_uniform needs min > 0, got min {self.min:g}")
        if kind == "int":
            for bound in ("min", "max"):
                value = getattr(self, bound)
                if value != int(value):
                    raise ValueError(f"type int needs whole-number bounds, got {bound} {value:g}")
        if self.step is not None and kind != "int":
            raise ValueError("step is only allowed with type int")
        return self

    @property
    def is_finite(self) -> bool:
        """True when the parameter is a list of values, which grid search can enumerate."""
        return self.values is not None

    @property
    def is_derived(self) -> bool:
        """True for an expr parameter: computed from the others, not a search dimension."""
        return self.expr is not None


class DataSpec(_Model):
    """Training data files, as paths inside the trial container."""

    train: str = Field(min_length=1, description="Path of the training set (JSONL).")
    eval: str | None = Field(None, description="Path of the evaluation set (JSONL), optional.")


class _ClaimMount(_Model):
    """A PersistentVolumeClaim mounted at an absolute path: the checks shared by the specs
    below, whose fields say what the claim is for."""

    # The patterns are written into the schema (so `kubectl apply` refuses a bad value) and
    # checked by these validators, whose messages say what is accepted.
    @field_validator("claim_name", check_fields=False)
    @classmethod
    def _claim_name(cls, name: str) -> str:
        if not re.fullmatch(DNS_SUBDOMAIN_PATTERN, name):
            raise ValueError(
                f"claimName {name!r} is not a PersistentVolumeClaim name: lower-case letters, "
                "digits, '-' and '.', starting and ending with a letter or digit"
            )
        return name

    @field_validator("mount_path", check_fields=False)
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"mountPath {path!r} must be an absolute path (start with /)")
        return path


class CheckpointSpec(_ClaimMount):
    """Where trials save checkpoints, and how often."""

    claim_name: str = Field(
        max_length=MAX_DNS_SUBDOMAIN,
        description="PersistentVolumeClaim for the checkpoints, in the sweep's namespace. Each "
        "trial gets its own directory on it, the sub-path <trial name>. With trials on several "
        "nodes at once the claim must be ReadWriteMany.",
        json_schema_extra={"pattern": DNS_SUBDOMAIN_PATTERN},
    )
    interval_steps: int = Field(
        ge=1,
        description="Save a checkpoint every this many optimizer steps. A restarted trial (its "
        "pod evicted, preempted or lost with its node) resumes from its last complete "
        "checkpoint instead of starting over.",
    )
    mount_path: str = Field(
        "/checkpoints",
        description="Where the trainer container sees its checkpoint directory (an absolute "
        "path, also given as LORASWEEP_CHECKPOINT_DIR).",
        json_schema_extra={"pattern": "^/"},
    )


class ModelCacheSpec(_ClaimMount):
    """A PersistentVolumeClaim that holds the base model, downloaded once per sweep."""

    claim_name: str = Field(
        max_length=MAX_DNS_SUBDOMAIN,
        description="PersistentVolumeClaim of the model cache, in the sweep's namespace. Before "
        "any trial starts, the Job <sweep>-model downloads spec.trainer.model (a hub id) into "
        "the directory <org>--<name> on it, unless a complete copy is there already; every "
        "trial then mounts the claim read-only and loads the model from there. With trials on "
        "several nodes the claim must be ReadWriteMany (the download writes it, trials read it).",
        json_schema_extra={"pattern": DNS_SUBDOMAIN_PATTERN},
    )
    mount_path: str = Field(
        "/models-cache",
        description="Where the download Job and the trials see the claim (an absolute path). "
        "Trials get model_name_or_path (and LORASWEEP_MODEL_PATH) <mountPath>/<org>--<name>.",
        json_schema_extra={"pattern": "^/"},
    )


def _free_form(description: str) -> Any:
    """A Kubernetes sub-object kept as-is; the apiserver validates it when the Job is created."""
    return Field(None, description=description)


def is_hub_id(model: str) -> bool:
    """Whether `model` names a model on the hub (rather than a path inside the pod)."""
    return bool(re.fullmatch(HUB_ID_PATTERN, model)) and "--" not in model and ".." not in model


class TrainerSpec(_Model):
    """The trial workload: which image runs, on what data, with what pod settings."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.workloadPriorityClass) || "
                    "(has(self.queueName) && self.queueName != '')",
                    "workloadPriorityClass needs queueName (it is Kueue's priority)",
                    ".workloadPriorityClass",
                ),
                _cel(
                    "!has(self.modelCache) || has(self.model) && self.model.matches('"
                    + HUB_ID_PATTERN
                    + "') && !self.model.contains('--') && !self.model.contains('..')",
                    "modelCache needs model to be a hub id (name or org/name); a local path "
                    "is read where it is, without a cache",
                    ".modelCache",
                ),
            ]
        }
    )

    image: str | None = Field(
        None,
        min_length=1,
        description="Container image of the trainer. When unset, the operator's default "
        "(LORASWEEP_DEFAULT_TRAINER_IMAGE, the Helm chart's trialDefaults.image).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None,
        description="Image pull policy of the trainer container (Kubernetes default if unset).",
    )
    model: str | None = Field(
        None,
        description="Base model path or hub id given to the bundled trainer as "
        "model_name_or_path. Required unless command is set.",
    )
    data: DataSpec | None = Field(
        None, description="Data files for the bundled trainer. Required unless command is set."
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Fixed trainer settings shared by all trials (e.g. num_train_epochs: 3), "
        "passed to the bundled trainer as --set name=value.",
    )
    command: list[str] | None = Field(
        None,
        description="Run this program instead of the bundled trainer (the container's command).",
    )
    args: list[str] | None = Field(
        None,
        description="Arguments of the program. Each string is a Jinja2 template with params, "
        "trial and sweep in scope, e.g. --lr={{ params.learning_rate }}. Setting command or "
        "args replaces the bundled trainer's arguments.",
    )
    job_template: str | None = Field(
        None,
        description="A Jinja2 template of the whole trial Job (YAML), replacing the built-in "
        "one. It is rendered in a sandbox; the variables in scope are listed at the top of "
        "the built-in one (sweep_operator/templates/trial-job.yaml.j2).",
    )
    resources: dict[str, Any] | None = _free_form(
        "Compute resources of the trainer container (requests and limits: cpu, memory). The "
        "operator sets the nvidia.com/gpu limit from gpus; resources may repeat that value, "
        "not contradict it."
    )
    gpus: int = Field(
        1,
        ge=1,
        description="GPUs of one trial on each of its nodes: the trainer container's "
        "nvidia.com/gpu limit. With more than one, the bundled trainer runs under "
        "torchrun (lora_trainer.launch), one process per GPU. A custom command runs as is "
        "and starts its own processes; it gets LORASWEEP_NPROC_PER_NODE.",
    )
    nodes: int = Field(
        1,
        ge=1,
        description="Nodes of one trial, one pod on each. With more than one, the trial Job is "
        "Indexed, a headless Service of the sweep gives each pod the DNS name "
        "<trial>-<index>.<service>, and the pod of index 0 hosts rank 0, which reports the "
        "result. The bundled trainer's node rank is its pod's index; a custom command gets "
        "LORASWEEP_NNODES, LORASWEEP_MASTER_ADDR, LORASWEEP_MASTER_PORT and "
        "JOB_COMPLETION_INDEX (the node rank) for its own launcher.",
    )
    checkpoints: CheckpointSpec | None = Field(
        None,
        description="Periodic checkpoints on a PersistentVolumeClaim, so that a trial that "
        "loses its pod resumes instead of starting over. The bundled trainer saves and "
        "resumes by itself; a custom program gets LORASWEEP_CHECKPOINT_DIR and "
        "LORASWEEP_CHECKPOINT_STEPS.",
    )
    model_cache: ModelCacheSpec | None = Field(
        None,
        description="Download model (a hub id) once per sweep onto this PersistentVolumeClaim, "
        "instead of once per trial. The Job <sweep>-model runs python -m lora_trainer.fetch in "
        "image, with env and envFrom (HF_ENDPOINT, HF_TOKEN), and no trial starts before it "
        "succeeds; if it fails, the sweep fails with its message. Needs model to be a hub id.",
    )
    env: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra environment variables of the trainer container (Kubernetes EnvVar).",
    )
    env_from: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Environment from ConfigMaps or Secrets (Kubernetes EnvFromSource).",
    )
    volumes: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod volumes (Kubernetes Volume)."
    )
    volume_mounts: list[dict[str, Any]] = Field(
        default_factory=list, description="Volume mounts of the trainer container."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels a trial pod must match. When unset, the operator's default "
        "(the Helm chart's trialDefaults.nodeSelector); {} opts out of it.",
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Tolerations of the trial pods (Kubernetes Toleration). When unset, the "
        "operator's default (the Helm chart's trialDefaults.tolerations); [] opts out of it.",
    )
    service_account_name: str | None = Field(
        None, description="Service account the trial pods run as."
    )
    priority_class_name: str | None = Field(None, description="Priority class of the trial pods.")
    queue_name: str | None = Field(
        None,
        max_length=MAX_LABEL_VALUE,
        description="Kueue LocalQueue of the trials, in the sweep's namespace. Each trial Job "
        "is created suspended with the label kueue.x-k8s.io/queue-name, and runs once Kueue "
        "admits it; until then, or after Kueue preempts it, it counts as queued. parallelism "
        "still caps the trials in flight (queued ones included). When unset, the operator's "
        'default (the Helm chart\'s trialDefaults.queueName); "" opts out of it.',
        json_schema_extra={"pattern": QUEUE_NAME_PATTERN},
    )
    workload_priority_class: str | None = Field(
        None,
        max_length=MAX_LABEL_VALUE,
        description="Kueue WorkloadPriorityClass of the trial Jobs (the label "
        "kueue.x-k8s.io/priority-class): Kueue admits higher-priority trials first and may "
        "preempt lower-priority ones for them. Needs queueName. Unlike priorityClassName it "
        "does not change the pods' scheduling priority.",
        json_schema_extra={"pattern": PRIORITY_CLASS_PATTERN},
    )
    backoff_limit: int = Field(
        0,
        ge=0,
        description="Retries of a failed trial pod before the trial counts as failed.",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Wall-clock limit of one trial, in seconds."
    )
    termination_grace_period_seconds: int = Field(
        60,
        ge=1,
        description="Seconds between SIGTERM (a stopped, preempted or evicted trial) and "
        "SIGKILL. The bundled trainer writes its result at once, stops after the current "
        "micro-batch and then closes its MLflow run; 60 s leaves room for a large model's "
        "micro-batch and a slow tracking server, while a preempting workload waits at most "
        "a minute for the GPU.",
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations added to every trial pod."
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels added to every trial pod."
    )

    @field_validator("queue_name")
    @classmethod
    def _queue_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(QUEUE_NAME_PATTERN, name):
            raise ValueError(
                f"queueName {name!r} is not a LocalQueue name: lower-case letters, digits and "
                "'-', starting and ending with a letter or digit"
            )
        return name

    @field_validator("workload_priority_class")
    @classmethod
    def _priority_class(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(PRIORITY_CLASS_PATTERN, name):
            raise ValueError(
                f"workloadPriorityClass {name!r} is not a WorkloadPriorityClass name: lower-case "
                "letters, digits, '-' and '.', starting and ending with a letter or digit"
            )
        return name

    @model_validator(mode="after")
    def _priority_needs_queue(self) -> TrainerSpec:
        if self.workload_priority_class is not None and not self.queue_name:
            raise ValueError(
                "spec.trainer.workloadPriorityClass needs spec.trainer.queueName: it is the "
                "priority Kueue gives the trials in their queue"
            )
        return self

    @field_validator("env")
    @classmethod
    def _env_named(cls, env: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, var in enumerate(env):
            if not isinstance(var.get("name"), str) or not var["name"]:
                raise ValueError(f"env[{i}] needs a name, got {var!r}")
        return env

    @model_validator(mode="after")
    def _gpus_set_once(self) -> TrainerSpec:
        for kind in ("limits", "requests"):
            given = (self.resources or {}).get(kind)
            if given is None:
                continue
            if not isinstance(given, dict):
                raise ValueError(
                    f"spec.trainer.resources.{kind} must map resource names to quantities, "
                    f"got {given!r}"
                )
            if GPU_RESOURCE in given and str(given[GPU_RESOURCE]) != str(self.gpus):
                raise ValueError(
                    f"spec.trainer.resources.{kind} has {GPU_RESOURCE}: {given[GPU_RESOURCE]} "
                    f"but spec.trainer.gpus is {self.gpus}; set the GPUs of a trial with "
                    "spec.trainer.gpus only"
                )
        return self

    @model_validator(mode="after")
    def _checkpoint_mount_is_free(self) -> TrainerSpec:
        if self.checkpoints is None:
            return self
        if any(v.get("name") == CHECKPOINT_VOLUME for v in self.volumes):
            raise ValueError(
                f"spec.trainer.volumes has a volume named {CHECKPOINT_VOLUME}, the name of the "
                "checkpoint volume; rename it"
            )
        path = self.checkpoints.mount_path
        if any(m.get("mountPath") == path for m in self.volume_mounts):
            raise ValueError(
                f"spec.trainer.volumeMounts already mounts a volume at {path}; choose another "
                "spec.trainer.checkpoints.mountPath"
            )
        return self

    @model_validator(mode="after")
    def _model_cache_fits(self) -> TrainerSpec:
        cache = self.model_cache
        if cache is None:
            return self
        if self.model is None:
            raise ValueError(
                "spec.trainer.modelCache needs spec.trainer.model, the hub id to download"
            )
        if not is_hub_id(self.model):
            raise ValueError(
                f"spec.trainer.modelCache needs spec.trainer.model to be a hub id (name or "
                f"org/name), got {self.model!r}; a local path is read where it is: remove "
                "modelCache"
            )
        if any(v.get("name") == MODEL_CACHE_VOLUME for v in self.volumes):
            raise ValueError(
                f"spec.trainer.volumes has a volume named {MODEL_CACHE_VOLUME}, the name of the "
                "model cache volume; rename it"
            )
        taken = {m.get("mountPath") for m in self.volume_mounts}
        if self.checkpoints is not None:
            taken.add(self.checkpoints.mount_path)
        if cache.mount_path in taken:
            raise ValueError(
                f"spec.trainer.volumeMounts or checkpoints already mount a volume at "
                f"{cache.mount_path}; choose another spec.trainer.modelCache.mountPath"
            )
        return self

    @property
    def custom(self) -> bool:
        """True when the user runs their own program instead of the bundled trainer."""
        return self.command is not None or self.args is not None


class MlflowSpec(_Model):
    """Where trials log their runs."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; the operator's default when unset."
    )
    experiment_name: str | None = Field(
        None, description="MLflow experiment of the sweep; <namespace>/<sweep name> when unset."
    )
    registered_model: str | None = Field(
        None,
        min_length=1,
        description="MLflow registered model: when the sweep succeeds, the best trial's adapter "
        "is registered as a new version of it (status.bestTrial.adapterUri). Nothing is "
        "registered when unset.",
    )


DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?[dhms])+$"
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str, field: str = "duration") -> timedelta:
    """A duration such as 6h, 90m, 1h30m or 2.5d; ValueError naming `field` otherwise."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(
            f"{field} {text!r} is not a duration; write a number and a unit (d, h, m, s), "
            "e.g. 6h, 90m or 1h30m"
        )
    seconds = sum(
        float(number) * _DURATION_UNITS[unit]
        for number, _, unit in re.findall(r"([0-9]+(\.[0-9]+)?)([dhms])", text)
    )
    if seconds <= 0:
        raise ValueError(f"{field} {text!r} must be longer than zero")
    return timedelta(seconds=seconds)


class EarlyStopping(_Model):
    """Early stopping of trials from the objective's intermediate values.

    Whatever the algorithm, a running trial whose objective turns NaN or infinite is stopped
    at once.
    """

    algorithm: Literal["median", "asha", "hyperband"] = Field(
        description="median: stop a trial whose best value so far is worse than the median of "
        "the completed trials' best values up to the same step. asha: asynchronous successive "
        "halving; a trial reaching a rung goes on only if it is in the best 1/reductionFactor "
        "of the trials that reached the rung before it. hyperband: several ASHA brackets, "
        "from aggressive (first rung minSteps) to none (first rung maxSteps), each trial "
        "drawn into one of them by its index."
    )
    min_steps: int = Field(
        0,
        ge=0,
        description="median: no decision before this step. asha: the first rung "
        "(the minimum resource), when rungs is not given. hyperband: the most aggressive "
        "bracket's first rung.",
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="hyperband (required there): the steps a trial trains in full (the maximum "
        "resource); it sets how many brackets there are.",
    )
    min_trials: int = Field(
        3,
        ge=1,
        description="median: a trial is only compared once at least this many completed "
        "trials have values at its step. asha and hyperband: a trial reaching a rung goes on "
        "unless at least this many trials reached the rung before it.",
    )
    reduction_factor: int = Field(
        3,
        ge=2,
        description="asha and hyperband: the fraction 1/reductionFactor of trials kept at each "
        "rung, and the growth of the rungs.",
    )
    rungs: list[int] | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="asha: the steps at which trials are compared. Default minSteps * "
        "reductionFactor^k (k = 0, 1, ...).",
    )

    @model_validator(mode="after")
    def _rungs(self) -> EarlyStopping:
        if self.rungs is not None:
            if self.algorithm != "asha":
                raise ValueError("rungs is only used by algorithm asha")
            if any(r <= 0 for r in self.rungs) or self.rungs != sorted(set(self.rungs)):
                raise ValueError(f"rungs must be increasing positive steps, got {self.rungs}")
        elif self.algorithm in ("asha", "hyperband") and self.min_steps < 1:
            raise ValueError(
                f"algorithm {self.algorithm} needs minSteps >= 1 (the first rung)"
                + (" or rungs" if self.algorithm == "asha" else "")
            )
        if self.algorithm == "hyperband":
            if self.max_steps is None:
                raise ValueError(
                    "algorithm hyperband needs maxSteps: the steps a trial trains in full"
                )
            if self.max_steps < self.min_steps:
                raise ValueError(
                    f"maxSteps {self.max_steps} must be at least minSteps {self.min_steps}"
                )
        elif self.max_steps is not None:
            raise ValueError("maxSteps is only used by algorithm hyperband")
        return self


class ModelShape(_Model):
    """The base model's size, as its config.json states it: what the memory estimate reads."""

    hidden_size: int = Field(ge=1, description="config.json hidden_size: the model's width.")
    num_hidden_layers: int = Field(ge=1, description="config.json num_hidden_layers.")
    intermediate_size: int = Field(
        ge=1, description="config.json intermediate_size: the width of each MLP."
    )
    num_attention_heads: int = Field(ge=1, description="config.json num_attention_heads.")
    num_key_value_heads: int | None = Field(
        None,
        ge=1,
        description="config.json num_key_value_heads (grouped-query attention); "
        "numAttentionHeads when unset.",
    )
    head_dim: int | None = Field(
        None, ge=1, description="config.json head_dim; hiddenSize / numAttentionHeads when unset."
    )
    vocab_size: int = Field(ge=1, description="config.json vocab_size.")
    tie_word_embeddings: bool = Field(
        False,
        description="config.json tie_word_embeddings: the output head shares the input "
        "embedding's weights.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="The checkpoint's dtype (config.json dtype, or torch_dtype in older files): "
        "what torch_dtype auto loads.",
    )
    parameters: int | None = Field(
        None,
        ge=1,
        description="The base model's exact parameter count, as the bundled trainer logs it; "
        "when unset, computed for a Llama-style decoder from the fields above.",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelShape:
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hiddenSize {self.hidden_size} is not a multiple of numAttentionHeads "
                f"{self.num_attention_heads}: give headDim (config.json head_dim)"
            )
        return self


class Constraints(_Model):
    """Limits a trial's configuration must respect to be started at all."""

    max_gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        alias="maxGpuMemoryGiB",
        description="GPU memory of one GPU, in GiB. A configuration whose estimated peak memory "
        "per GPU exceeds it is never started: grid search skips it, random and tpe draw "
        "another. Needs model. See the README for the estimate.",
    )
    model: ModelShape | None = Field(
        None,
        description="The base model's shape, from its config.json: every trial of the bundled "
        "trainer logs it, ready to copy (and `lorasweep model-shape config.json` prints it).",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.maxGpuMemoryGiB) || has(self.model)",
                    "maxGpuMemoryGiB needs model: the base model's shape (hiddenSize, "
                    "numHiddenLayers, intermediateSize, numAttentionHeads, vocabSize, ...) from "
                    "its config.json, as a trial's log prints it or `lorasweep model-shape "
                    "config.json` does",
                    ".model",
                )
            ]
        }
    )

    @model_validator(mode="after")
    def _estimable(self) -> Constraints:
        if self.max_gpu_memory_gib is not None and self.model is None:
            raise ValueError(
                f"maxGpuMemoryGiB={self.max_gpu_memory_gib:g} needs spec.constraints.model, the "
                "base model's shape from its config.json, to estimate a trial's memory: add "
                "model: {hiddenSize, numHiddenLayers, intermediateSize, numAttentionHeads, "
                "numKeyValueHeads, vocabSize, dtype, parameters}. Every trial of the bundled "
                'trainer prints it in its log ("model shape for spec.constraints.model"), and '
                "`lorasweep model-shape path/to/config.json` prints it from the file"
            )
        return self


class SweepSpec(_Model):
    """Desired state of a HyperparameterSweep: objective, search space and trial workload."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.parameters.all(k, k.matches('" + PARAMETER_NAME_PATTERN + "'))",
                    "parameter names must be identifiers (letters, digits, _ . -)",
                    ".parameters",
                ),
                _cel(
                    "!has(self.algorithm) || !has(self.algorithm.name) || "
                    "self.algorithm.name == 'grid' || has(self.maxTrials)",
                    "algorithms random, tpe and bohb need maxTrials",
                    ".maxTrials",
                ),
                _cel(
                    "!has(self.algorithm) || !has(self.algorithm.warmStart) || "
                    "has(self.algorithm.name) && self.algorithm.name == 'tpe'",
                    "algorithm.warmStart needs algorithm tpe",
                    ".algorithm.warmStart",
                ),
                _cel(
                    "has(self.algorithm) && has(self.algorithm.name) && "
                    "self.algorithm.name != 'grid' || self.parameters.all(k, "
                    "!has(self.parameters[k].type) || self.parameters[k].type == 'categorical')",
                    "algorithm grid needs values for every parameter (no min/max ranges)",
                    ".parameters",
                ),
                # Trials are identified by index, so the space cannot change under them.
                _cel(
                    "self.parameters == oldSelf.parameters",
                    "parameters cannot change once a sweep exists; create a new sweep",
                    ".parameters",
                ),
                _cel(
                    "self.algorithm == oldSelf.algorithm",
                    "algorithm cannot change once a sweep exists; create a new sweep",
                    ".algorithm",
                ),
                # Which configurations start follows from them, as from the search space.
                _cel(
                    "has(self.constraints) == has(oldSelf.constraints) && "
                    "(!has(self.constraints) || self.constraints == oldSelf.constraints)",
                    "constraints cannot change once a sweep exists; create a new sweep",
                    ".constraints",
                ),
            ]
        }
    )

    objective: Objective = Field(description="The metric to optimize and its goal.")
    algorithm: Algorithm = Field(
        default_factory=Algorithm,
        description="The search algorithm (grid by default).",
        json_schema_extra={"default": {}},  # lets the apiserver apply algorithm.name's default
    )
    parameters: dict[str, ParameterSpec] = Field(
        min_length=1,
        max_length=MAX_PARAMETERS,
        description="The search space: parameter name -> values or range. For the bundled "
        "trainer the names are its config fields (lora_rank, learning_rate, ...).",
    )
    max_trials: int | None = Field(
        None,
        ge=1,
        description="Number of trials to run. Required for random, tpe and bohb; for grid it "
        "defaults to the whole grid and caps it otherwise.",
    )
    parallelism: int = Field(1, ge=1, description="Trials running at the same time.")
    max_failed_trials: int | None = Field(
        None,
        ge=0,
        description="Failure budget: the sweep fails once more trials than this have failed. "
        "Unlimited when unset.",
    )
    early_stopping: EarlyStopping | None = Field(
        None, description="Stop trials whose intermediate objective values look hopeless."
    )
    time_budget: str | None = Field(
        None,
        pattern=DURATION_PATTERN,
        description="Wall-clock budget of the sweep from its start, e.g. 6h, 90m or 1h30m "
        "(units d, h, m, s). Past it no trial starts, running ones are stopped and the sweep "
        "ends with reason BudgetExhausted and the best trial so far.",
    )
    constraints: Constraints | None = Field(
        None,
        description="Configurations that must not start: those whose estimated GPU memory "
        "exceeds maxGpuMemoryGiB.",
    )
    trainer: TrainerSpec = Field(description="The workload every trial runs.")
    mlflow: MlflowSpec = Field(
        default_factory=MlflowSpec, description="MLflow tracking of the sweep and its trials."
    )

    @field_validator("parameters")
    @classmethod
    def _parameter_names(cls, parameters: dict[str, ParameterSpec]) -> dict[str, ParameterSpec]:
        for name in parameters:
            if not re.fullmatch(PARAMETER_NAME_PATTERN, name):
                raise ValueError(
                    f"parameter name {name!r} is not an identifier "
                    "(letters, digits, _ . -, not starting with a digit)"
                )
        return parameters

    @field_validator("time_budget")
    @classmethod
    def _budget(cls, budget: str | None) -> str | None:
        if budget is not None:
            parse_duration(budget, "timeBudget")  # refuses 0s with a clear message
        return budget

    @model_validator(mode="after")
    def _derived_parameters(self) -> SweepSpec:
        check_expressions(
            {name: p.expr for name, p in self.parameters.items() if p.expr is not None},
            searched=[name for name, p in self.parameters.items() if p.expr is None],
        )
        return self

    @model_validator(mode="after")
    def _algorithm_fits_space(self) -> SweepSpec:
        if self.algorithm.warm_start is not None and self.algorithm.name != "tpe":
            raise ValueError(
                f"algorithm.warmStart needs algorithm tpe (got {self.algorithm.name}): only TPE "
                "learns from earlier trials"
            )
        if self.algorithm.name != "grid" and self.max_trials is None:
            raise ValueError(
                f"algorithm {self.algorithm.name} needs maxTrials (how many samples to draw)"
            )
        if self.algorithm.name == "bohb" and (
            self.early_stopping is None or self.early_stopping.algorithm == "median"
        ):
            raise ValueError(
                "algorithm bohb learns at the rungs of earlyStopping: set earlyStopping.algorithm "
                "to hyperband or asha"
            )
        if all(p.is_derived for p in self.parameters.values()):
            raise ValueError("parameters need at least one searched parameter (not only expr)")
        if self.algorithm.name == "grid":
            ranges = sorted(
                name for name, p in self.parameters.items() if not p.is_finite and not p.is_derived
            )
            if ranges:
                raise ValueError(
                    f"algorithm grid needs values for every parameter; {', '.join(ranges)} "
                    "use a range (give values: [...] or use algorithm random)"
                )
        return self


class Condition(_Model):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(description="Condition type: Running, Succeeded or Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason of the last transition.")
    message: str = Field("", description="Human-readable details.")
    last_transition_time: datetime = Field(description="When the status last changed.")
    observed_generation: int | None = Field(
        None, description="The sweep generation this condition was computed from."
    )


class TrialCounts(_Model):
    """How many trials are in each state."""

    total: int = Field(0, description="Trials created so far.")
    queued: int = Field(
        0,
        description="Trials waiting in their Kueue queue for quota: not admitted yet, or "
        "preempted (spec.trainer.queueName).",
    )
    pending: int = Field(
        0, description="Trials whose pod is not running yet (admitted, e.g. no free GPU)."
    )
    running: int = Field(0, description="Trials running now.")
    succeeded: int = Field(0, description="Trials that completed successfully.")
    failed: int = Field(0, description="Trials that failed after their retries.")
    pruned: int = Field(0, description="Trials stopped by the operator.")
    infeasible: int = Field(
        0,
        description="Configurations found infeasible: trials that ran out of GPU memory (exit "
        "code 4), and grid points never started because their estimated memory exceeds "
        "spec.constraints.maxGpuMemoryGiB. Neither counts against maxFailedTrials.",
    )
    unscored: int = Field(
        0, description="Succeeded trials that did not report the objective metric."
    )
    target: int = Field(0, description="Trials the sweep will run in all.")


class BestTrial(_Model):
    """The best trial so far by the objective."""

    name: str = Field(description="Trial (Job) name.")
    index: int = Field(description="Trial index within the sweep.")
    parameters: dict[str, Any] = Field(description="The trial's parameters.")
    value: float = Field(description="The trial's objective value.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Further metrics the trial reported."
    )
    mlflow_run_id: str | None = Field(None, description="The trial's MLflow run id.")
    url: str | None = Field(None, description="Link to the trial's MLflow run.")
    adapter_uri: str | None = Field(
        None,
        description="Where the trial's LoRA adapter is: models:/NAME/VERSION once registered "
        "in spec.mlflow.registeredModel, else runs:/RUN_ID/adapter (an artifact of its run).",
    )


class ParetoTrial(_Model):
    """A Pareto-optimal trial."""

    name: str = Field(description="Trial (Job) name.")
    index: int = Field(description="Trial index within the sweep.")
    parameters: dict[str, Any] = Field(description="The trial's parameters.")
    values: dict[str, float] = Field(description="The trial's value of each objective metric.")


class ImportanceShare(_Model):
    """One parameter's share of the objective's variance, in percent."""

    name: str = Field(description="The parameter.")
    percent: float = Field(description="Mean share over the bootstrap resamples, in percent.")
    min: float = Field(description="Lowest share of one resample, in percent.")
    max: float = Field(description="Highest share of one resample, in percent.")
    signal: bool = Field(
        False,
        description="The lowest share is above the highest of the random reference: the data "
        "show that the parameter matters. False: not told apart from noise.",
    )


class ParameterImportance(_Model):
    """Parameter importance (fANOVA), computed in the background as trials finish."""

    trials: int = Field(0, description="The scored trials it was computed from.")
    parameters: list[ImportanceShare] = Field(
        default_factory=list,
        description="The most important parameters first (the top five; the report has all). "
        "Empty below 15 scored trials.",
    )
    reference: ImportanceShare | None = Field(
        None,
        description="The share a parameter of random numbers gets, fitted alongside: what "
        "noise alone explains.",
    )
    message: str = Field("", description="How it was computed, or why it is not yet.")


class MlflowStatus(_Model):
    """The sweep's MLflow experiment and parent run."""

    experiment_id: str | None = Field(None, description="MLflow experiment id.")
    parent_run_id: str | None = Field(None, description="MLflow parent run of the sweep.")
    url: str | None = Field(None, description="Link to the experiment in the MLflow UI.")


class SweepStatus(_Model):
    """Observed state of a HyperparameterSweep, derived from its trials."""

    phase: Phase = Field("Pending", description="Pending, Running, Succeeded or Failed.")
    observed_generation: int | None = Field(
        None, description="The sweep generation this status was computed from."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Standard conditions: Running, Succeeded, Failed.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    trials: TrialCounts = Field(default_factory=TrialCounts, description="Trial counts by state.")
    progress: str = Field("0/0", description="Succeeded trials / trials to run, e.g. 2/6.")
    best_trial: BestTrial | None = Field(None, description="The best trial so far.")
    pareto_front: list[ParetoTrial] = Field(
        default_factory=list,
        description="objective.mode pareto: the trials no other trial beats on every metric; "
        "past 20, the 20 of them best by the primary metric (paretoFrontSize counts them all).",
    )
    pareto_front_size: int = Field(
        0, description="objective.mode pareto: how many trials the Pareto front holds."
    )
    parameter_importance: ParameterImportance | None = Field(
        None,
        description="How much each parameter explains the objective's variance (fANOVA over "
        "bootstrap resamples, in percent, with the spread).",
    )
    mlflow: MlflowStatus | None = Field(None, description="MLflow experiment and parent run.")
    start_time: datetime | None = Field(None, description="When the first trial started.")
    completion_time: datetime | None = Field(None, description="When the sweep finished.")
    message: str = Field("", description="Human-readable summary of the sweep's state.")


class HyperparameterSweep(_Model):
    """A hyperparameter sweep of LoRA fine-tuning: trials run as Jobs, tracked in MLflow."""

    api_version: Literal["lorasweep.io/v1alpha1"] = Field(
        API_VERSION, description="lorasweep.io/v1alpha1"
    )
    kind: Literal["HyperparameterSweep"] = Field(KIND, description="HyperparameterSweep")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: SweepSpec = Field(description="Desired state: objective, search space, workload.")
    status: SweepStatus | None = Field(None, description="Observed state, written by the operator.")

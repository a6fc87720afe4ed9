"""Rendering a trial's batch/v1 Job from a Jinja2 template (through `templating`'s bounded
sandbox), the headless Service of multi-node trials and the model download Job. Pure and
deterministic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from lora_trainer import contract
from lora_trainer.contract import RESERVED_ENV_PREFIX, RESULT_PATH
from sweep_operator.api import API_VERSION, KIND, SweepSpec, TrainerSpec
from sweep_operator.host_access import host_access, refusal
from sweep_operator.naming import (
    experiment_name,
    label_value,
    model_cache_dir,
    model_fetch_name,
    service_name,
)
from sweep_operator.templating import (
    RenderError,
    load_yaml,
    params_json,
    render_text,
    render_yaml,
    yaml_scalar,
)
from sweep_operator.trials import (
    ANNOTATION_INDEX,
    ANNOTATION_PARAMETERS,
    CHECKPOINT_VOLUME,
    GPU_RESOURCE,
    LABEL_MODEL_FETCH,
    LABEL_PRIORITY_CLASS,
    LABEL_QUEUE_NAME,
    LABEL_SWEEP,
    LABEL_TRIAL,
    MODEL_CACHE_VOLUME,
    NewTrial,
)

BUNDLED_COMMAND = ["python", "-m", "lora_trainer"]
# Starts one bundled trainer process per GPU when a trial has several GPUs or nodes: torchrun
# that exits with the trainer's own exit code, which the podFailurePolicy reads.
LAUNCHER = ["python", "-m", "lora_trainer.launch"]
# The static rendezvous of a multi-node trial, on its pod of index 0 (torch's default port).
RENDEZVOUS_PORT = 29500
# The bundled trainer's exit codes for a bad configuration, bad data and out of GPU memory
# (lora_trainer.__main__): running the same trial again cannot help, so they fail its Job
# at once instead of using up backoffLimit.
FATAL_EXIT_CODES = [2, 3, 4]
# How spec.trainer's model and data reach the bundled trainer (TrainConfig field names).
MODEL_FIELD = "model_name_or_path"
TRAIN_FILE_FIELD = "train_file"
EVAL_FILE_FIELD = "eval_file"
SCRATCH_VOLUME = "lorasweep-tmp"
SCRATCH_PATH = "/tmp"
# The model download Job (lora_trainer.fetch). Its exit code 2 means the model cannot be had
# (no such repository or revision, no access): a retry cannot help. Other failures (the
# network, the hub) are retried, and a retry resumes the partial download.
FETCH_COMMAND = ["python", "-m", "lora_trainer.fetch"]
FETCH_FATAL_EXIT_CODES = [2]
FETCH_BACKOFF_LIMIT = 3
# The restricted Pod Security profile, as in the built-in trial template (10001 is the
# trainer image's user; fsGroup makes the claim writable to it).
_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
_CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class SweepRef:
    """The identity of the sweep a Job belongs to (for names, labels and ownerReference)."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        """Makes what the operator creates for the sweep go when the sweep is deleted."""
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@functools.cache
def builtin_template() -> str:
    return resources.files("sweep_operator").joinpath("templates/trial-job.yaml.j2").read_text()


def _scope(sweep: SweepRef, trial: NewTrial) -> dict[str, Any]:
    return {
        "params": dict(trial.parameters),
        "trial": {"name": trial.name, "index": trial.index},
        "sweep": {"name": sweep.name, "namespace": sweep.namespace, "uid": sweep.uid},
    }


def container_command(
    spec: SweepSpec, sweep: SweepRef, trial: NewTrial
) -> tuple[list[str] | None, list[str]]:
    """(command, args) of the trial container.

    The bundled trainer gets `--set name=value` for model, data, fixed config and the trial's
    parameters, in that order so that a trial's parameters win. A custom program gets its
    command as is and its args rendered as templates.
    """
    trainer = spec.trainer
    if trainer.custom:
        scope = _scope(sweep, trial)
        args = [
            render_text(arg, f"spec.trainer.args[{i}]", scope)
            for i, arg in enumerate(trainer.args or [])
        ]
        return trainer.command, args
    settings = trainer_settings(spec, trial.parameters, cached_model_path(trainer))
    args = []
    for name, value in settings.items():
        args += ["--set", f"{name}={yaml_scalar(value)}"]
    return _bundled_command(trainer, _master_addr(sweep, trial)), args


def trainer_settings(
    spec: SweepSpec, parameters: dict[str, Any], model_path: str | None = None
) -> dict[str, Any]:
    """The bundled trainer's settings for a trial with these parameters: the model (read from
    `model_path` when given), the data files, spec.trainer.config, then the parameters, in
    that order so that a trial's parameters win."""
    trainer = spec.trainer
    settings: dict[str, Any] = {}
    if trainer.model is not None:
        settings[MODEL_FIELD] = model_path or trainer.model
    if trainer.data is not None:
        settings[TRAIN_FILE_FIELD] = trainer.data.train
        if trainer.data.eval is not None:
            settings[EVAL_FILE_FIELD] = trainer.data.eval
    settings.update(sorted(trainer.config.items()))
    settings.update(sorted(parameters.items()))
    return settings


def cached_model_path(trainer: TrainerSpec) -> str | None:
    """Where the trials see the model downloaded into spec.trainer.modelCache, if any."""
    cache = trainer.model_cache
    if cache is None or trainer.model is None:
        return None
    return f"{cache.mount_path.rstrip('/')}/{model_cache_dir(trainer.model)}"


def _bundled_command(trainer: TrainerSpec, master_addr: str) -> list[str]:
    if trainer.nodes > 1:
        launch = [
            f"--nnodes={trainer.nodes}",
            f"--nproc-per-node={trainer.gpus}",
            # The Job controller sets JOB_COMPLETION_INDEX in an Indexed Job's pods, and
            # Kubernetes expands $(VAR) in a command: each pod's index is its node rank.
            "--node-rank=$(JOB_COMPLETION_INDEX)",
            f"--master-addr={master_addr}",
            f"--master-port={RENDEZVOUS_PORT}",
        ]
    elif trainer.gpus > 1:
        launch = ["--standalone", f"--nproc-per-node={trainer.gpus}"]
    else:
        return list(BUNDLED_COMMAND)
    return [*LAUNCHER, *launch, *BUNDLED_COMMAND[1:]]


def _master_addr(sweep: SweepRef, trial: NewTrial) -> str:
    """The DNS name of a multi-node trial's pod of index 0 (its hostname, in the sweep's
    Service), which hosts rank 0 and the rendezvous."""
    return f"{trial.name}-0.{service_name(sweep.name)}"


def trial_env(
    spec: SweepSpec,
    sweep: SweepRef,
    trial: NewTrial,
    *,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> list[dict[str, Any]]:
    """The trial contract's environment, then the user's env.

    A user may override the MLFLOW_* variables (e.g. from a Secret); LORASWEEP_* are the
    operator's and always win.
    """
    trainer = spec.trainer
    distributed = trainer.gpus > 1 or trainer.nodes > 1
    multi_node = trainer.nodes > 1
    checkpoints = trainer.checkpoints
    operators = {
        contract.ENV_SWEEP: sweep.name,
        contract.ENV_NAMESPACE: sweep.namespace,
        contract.ENV_TRIAL: trial.name,
        contract.ENV_TRIAL_INDEX: str(trial.index),
        contract.ENV_PARAMS: params_json(trial.parameters),
        contract.ENV_OBJECTIVE: spec.objective.metric,
        contract.ENV_RESULT_PATH: RESULT_PATH,
        contract.ENV_NNODES: str(trainer.nodes) if distributed else None,
        contract.ENV_NPROC_PER_NODE: str(trainer.gpus) if distributed else None,
        contract.ENV_MASTER_ADDR: _master_addr(sweep, trial) if multi_node else None,
        contract.ENV_MASTER_PORT: str(RENDEZVOUS_PORT) if multi_node else None,
        contract.ENV_CHECKPOINT_DIR: checkpoints.mount_path if checkpoints else None,
        contract.ENV_CHECKPOINT_STEPS: str(checkpoints.interval_steps) if checkpoints else None,
        contract.ENV_MODEL_PATH: cached_model_path(trainer),
        contract.ENV_MLFLOW_TRACKING_URI: spec.mlflow.tracking_uri or tracking_uri,
        contract.ENV_MLFLOW_EXPERIMENT_NAME: experiment_name(
            sweep.namespace, sweep.name, spec.mlflow.experiment_name
        ),
        contract.ENV_MLFLOW_PARENT_RUN_ID: parent_run_id,
    }
    user = [v for v in trainer.env if not v["name"].startswith(RESERVED_ENV_PREFIX)]
    overridden = {v["name"] for v in user}
    env = [
        {"name": name, "value": value}
        for name, value in operators.items()
        if value is not None and name not in overridden
    ]
    return env + user


def _context(
    spec: SweepSpec, sweep: SweepRef, trial: NewTrial, env: list[dict[str, Any]]
) -> dict[str, Any]:
    trainer = spec.trainer
    command, args = container_command(spec, sweep, trial)
    labels = {LABEL_SWEEP: label_value(sweep.name), LABEL_TRIAL: trial.name}
    volumes, mounts = _volumes(trainer, trial)
    multi_node = trainer.nodes > 1
    return {
        **_scope(sweep, trial),
        "spec": spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
        "trainer": trainer.model_dump(by_alias=True, exclude_none=True, mode="json"),
        "metadata": {
            "labels": labels,
            "annotations": {
                ANNOTATION_PARAMETERS: params_json(trial.parameters),
                ANNOTATION_INDEX: str(trial.index),
            },
            "ownerReferences": [sweep.owner_reference()],
        },
        "job": {
            # One pod per node; Indexed gives each its index (the node rank) and hostname.
            "completionMode": "Indexed" if multi_node else None,
            "completions": trainer.nodes,
            "parallelism": trainer.nodes,
            "fatalExitCodes": [] if trainer.custom else FATAL_EXIT_CODES,
        },
        "pod": {
            "labels": {**trainer.pod_labels, **labels},
            "annotations": dict(trainer.pod_annotations),
            "volumes": volumes,
            "nodeSelector": trainer.node_selector,
            "tolerations": trainer.tolerations,
            "serviceAccountName": trainer.service_account_name,
            "priorityClassName": trainer.priority_class_name,
            "subdomain": service_name(sweep.name) if multi_node else None,
        },
        "container": {
            "image": trainer.image,
            "imagePullPolicy": trainer.image_pull_policy,
            "command": command,
            "args": args,
            "env": env,
            "envFrom": trainer.env_from,
            "resources": _resources(trainer),
            "volumeMounts": mounts,
            "terminationMessagePath": RESULT_PATH,
        },
    }


def _resources(trainer: TrainerSpec) -> dict[str, Any]:
    """The user's resources with the GPU limit set to gpus (the API refuses a user's GPU
    request or limit that differs from it, so requests need no change)."""
    resources = dict(trainer.resources or {})
    resources["limits"] = {**(resources.get("limits") or {}), GPU_RESOURCE: trainer.gpus}
    return resources


def _volumes(
    trainer: TrainerSpec, trial: NewTrial
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the trainer's mounts: the user's, the trial's checkpoint
    directory, the model cache (read-only: the trials share it), and an emptyDir at /tmp unless
    something is mounted there already (the trainer image keeps its caches under /tmp so that
    it runs on a read-only root filesystem)."""
    volumes, mounts = list(trainer.volumes), list(trainer.volume_mounts)
    if trainer.model_cache is not None:
        claim = {"claimName": trainer.model_cache.claim_name, "readOnly": True}
        volumes.append({"name": MODEL_CACHE_VOLUME, "persistentVolumeClaim": claim})
        mounts.append(
            {
                "name": MODEL_CACHE_VOLUME,
                "mountPath": trainer.model_cache.mount_path,
                "readOnly": True,
            }
        )
    if trainer.checkpoints is not None:
        claim = {"claimName": trainer.checkpoints.claim_name}
        volumes.append({"name": CHECKPOINT_VOLUME, "persistentVolumeClaim": claim})
        # A directory per trial: a restarted pod finds its own checkpoints and no other's.
        mounts.append(
            {
                "name": CHECKPOINT_VOLUME,
                "mountPath": trainer.checkpoints.mount_path,
                "subPath": trial.name,
            }
        )
    if not any(m.get("mountPath") == SCRATCH_PATH for m in mounts):
        volumes.append({"name": SCRATCH_VOLUME, "emptyDir": {}})
        mounts.append({"name": SCRATCH_VOLUME, "mountPath": SCRATCH_PATH})
    return volumes, mounts


def _check_job(job: Any, field: str) -> dict[str, Any]:
    """Refuse a rendered document that the Job controller could not run as a trial."""

    def fail(problem: str) -> RenderError:
        return RenderError(field, f"the template did not render a valid trial Job: {problem}")

    if not isinstance(job, dict):
        raise fail(f"expected a YAML mapping, got {type(job).__name__}")
    if (job.get("apiVersion"), job.get("kind")) != ("batch/v1", "Job"):
        raise fail(
            f"apiVersion/kind is {job.get('apiVersion')}/{job.get('kind')}, expected batch/v1/Job"
        )
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec")
    if not isinstance(pod, dict):
        raise fail("spec.template.spec is missing")
    containers = pod.get("containers")
    if not isinstance(containers, list) or not containers:
        raise fail("spec.template.spec.containers is missing or empty")
    for i, container in enumerate(containers):
        if (
            not isinstance(container, dict)
            or not container.get("name")
            or not container.get("image")
        ):
            raise fail(f"spec.template.spec.containers[{i}] needs a name and an image")
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        raise fail(
            f"spec.template.spec.restartPolicy is {pod.get('restartPolicy')!r}, "
            "expected Never or OnFailure"
        )
    if job["spec"].get("podFailurePolicy") and pod["restartPolicy"] != "Never":
        raise fail("spec.podFailurePolicy needs spec.template.spec.restartPolicy Never")
    return job


def render_trial_job(
    sweep: SweepRef,
    spec: SweepSpec,
    trial: NewTrial,
    *,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    template: str | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job of one trial, as a dict ready for the API.

    Template precedence: spec.trainer.jobTemplate, then `template` (an operator-wide or
    command-line default), then the built-in template. Whatever the template says, the Job's
    name, namespace, ownerReference and the operator's labels and annotations are set here,
    because the operator relies on them to find its trials and to cascade deletion; so are,
    with spec.trainer.queueName, Kueue's labels and `suspend: true`; ttlSecondsAfterFinished
    is dropped. A Job whose pod would get
    access to its node (host_access) is refused, whichever template asks for it.
    """
    if spec.trainer.job_template is not None:
        source, field = spec.trainer.job_template, "spec.trainer.jobTemplate"
    elif template is not None:
        source, field = template, "template"
    else:
        source, field = builtin_template(), "built-in template"
    env = trial_env(spec, sweep, trial, tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    context = _context(spec, sweep, trial, env)
    try:
        # A user's template may use the text `| yaml` writes (compare it, slice it), which a
        # token in its place would change: only the built-in template takes the faster path.
        if source is builtin_template():
            job = _check_job(render_yaml(source, field, context), field)
        else:
            job = _check_job(load_yaml(render_text(source, field, context)), field)
    except yaml.YAMLError as error:
        raise RenderError(field, f"the template did not render valid YAML: {error}") from error
    found = host_access(job["spec"]["template"]["spec"], "spec.template.spec")
    if found:
        raise RenderError(
            field, "; ".join(refusal(f"the trial Job's {where} {what}") for where, what in found)
        )

    required = context["metadata"]
    metadata = job.setdefault("metadata", {}) or {}
    job["metadata"] = metadata
    metadata["name"] = trial.name
    metadata["namespace"] = sweep.namespace
    metadata["labels"] = {
        **(metadata.get("labels") or {}),
        **required["labels"],
        **_queue_labels(spec.trainer),
    }
    metadata["annotations"] = {**(metadata.get("annotations") or {}), **required["annotations"]}
    metadata["ownerReferences"] = required["ownerReferences"]
    # A trial's Job is its record (index, parameters, outcome) until the sweep goes: a TTL
    # would delete a finished trial, and the sweep would run it again.
    job["spec"].pop("ttlSecondsAfterFinished", None)
    pod_metadata = job["spec"]["template"].setdefault("metadata", {}) or {}
    job["spec"]["template"]["metadata"] = pod_metadata
    pod_metadata["labels"] = {**(pod_metadata.get("labels") or {}), **required["labels"]}
    if spec.trainer.queue_name:
        # Kueue starts it once admitted; created running, it would hold a GPU before that.
        job["spec"]["suspend"] = True
    _quantities_as_strings(job["spec"]["template"]["spec"])
    return job


def _quantities_as_strings(pod: dict[str, Any]) -> None:
    """Write the containers' resource quantities as strings (`cpu: 2` becomes `"2"`).

    The API server reads a quantity from a number or a string, but the kubernetes client (37)
    checks a request against its models before sending it, and there a quantity is a string:
    a number, from gpus or a user's `cpu: 2`, would fail every create."""
    for key in ("initContainers", "containers"):
        for container in pod.get(key) or []:
            resources = container.get("resources") if isinstance(container, dict) else None
            for kind in ("limits", "requests"):
                quantities = (resources or {}).get(kind)
                if isinstance(quantities, dict):
                    resources[kind] = {
                        name: value if isinstance(value, str) else str(value)
                        for name, value in quantities.items()
                    }


def _queue_labels(trainer: TrainerSpec) -> dict[str, str]:
    """The Job labels that hand a trial to Kueue: its LocalQueue and priority."""
    if not trainer.queue_name:
        return {}
    labels = {LABEL_QUEUE_NAME: trainer.queue_name}
    if trainer.workload_priority_class:
        labels[LABEL_PRIORITY_CLASS] = trainer.workload_priority_class
    return labels


def render_trial_service(sweep: SweepRef, spec: SweepSpec) -> dict[str, Any] | None:
    """The headless Service of a sweep whose trials span several nodes, None otherwise.

    One per sweep, selecting every trial pod of it: with each pod's hostname (`<trial>-<index>`,
    set by the Job controller) and subdomain (this Service), DNS resolves
    `<trial>-<index>.<service>`. Addresses are published before the pods are ready, so that
    the other pods reach rank 0 while it starts.
    """
    if spec.trainer.nodes == 1:
        return None
    labels = {LABEL_SWEEP: label_value(sweep.name)}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(sweep.name),
            "namespace": sweep.namespace,
            "labels": labels,
            "ownerReferences": [sweep.owner_reference()],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": dict(labels),
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


def render_model_fetch_job(sweep: SweepRef, spec: SweepSpec) -> dict[str, Any] | None:
    """The Job that downloads spec.trainer.model into spec.trainer.modelCache, None without a
    model cache.

    One per sweep, run before any trial (like Katib's storage initializer): the trainer image's
    `lora_trainer.fetch`, with the trainer's env and envFrom (HF_ENDPOINT, HF_TOKEN) and pod
    placement, but no GPU. It writes the claim; the trials only read it.
    """
    trainer = spec.trainer
    destination = cached_model_path(trainer)
    if trainer.model_cache is None or trainer.model is None or destination is None:
        return None
    labels = {LABEL_SWEEP: label_value(sweep.name), LABEL_MODEL_FETCH: "true"}
    cache = {"name": MODEL_CACHE_VOLUME, "mountPath": trainer.model_cache.mount_path}
    scratch = {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_PATH}
    container: dict[str, Any] = {
        "name": "fetch",
        "image": trainer.image,
        "command": [*FETCH_COMMAND, "--model", trainer.model, "--dest", destination],
        "env": [v for v in trainer.env if not v["name"].startswith(RESERVED_ENV_PREFIX)],
        "envFrom": trainer.env_from,
        "volumeMounts": [cache, scratch],
        "terminationMessagePath": RESULT_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _CONTAINER_SECURITY,
    }
    if trainer.image_pull_policy:
        container["imagePullPolicy"] = trainer.image_pull_policy
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "volumes": [
            {
                "name": MODEL_CACHE_VOLUME,
                "persistentVolumeClaim": {"claimName": trainer.model_cache.claim_name},
            },
            {"name": SCRATCH_VOLUME, "emptyDir": {}},
        ],
        "securityContext": _POD_SECURITY,
        "containers": [container],
    }
    if trainer.service_account_name:
        pod["serviceAccountName"] = trainer.service_account_name
    else:
        pod["automountServiceAccountToken"] = False
    for key, value in (
        ("priorityClassName", trainer.priority_class_name),
        ("nodeSelector", trainer.node_selector),
        ("tolerations", trainer.tolerations),
    ):
        if value:
            pod[key] = value
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": model_fetch_name(sweep.name),
            "namespace": sweep.namespace,
            "labels": labels,
            "ownerReferences": [sweep.owner_reference()],
        },
        "spec": {
            "backoffLimit": FETCH_BACKOFF_LIMIT,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "fetch",
                            "operator": "In",
                            "values": FETCH_FATAL_EXIT_CODES,
                        },
                    },
                ]
            },
            "template": {
                "metadata": {
                    "labels": {**trainer.pod_labels, **labels},
                    "annotations": dict(trainer.pod_annotations),
                },
                "spec": pod,
            },
        },
    }

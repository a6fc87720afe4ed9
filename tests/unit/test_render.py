"""Rendering trial Jobs: the metadata the operator relies on, security, and the trial contract."""

from __future__ import annotations

import json

import pytest
import yaml

from lora_trainer.__main__ import EXIT_CONFIG, EXIT_DATA
from lora_trainer.config import parse_set
from lora_trainer.contract import EXIT_OUT_OF_MEMORY
from sweep_operator.render import (
    FATAL_EXIT_CODES,
    RenderError,
    SweepRef,
    builtin_template,
    render_model_fetch_job,
    render_trial_job,
    render_trial_service,
)
from sweep_operator.templating import load_yaml, render_text, render_yaml, yaml_flow, yaml_scalar
from sweep_operator.trials import NewTrial
from tests.unit.sweep_helpers import make_spec, raw_spec

SWEEP = SweepRef(name="rank-lr", namespace="team-a", uid="1234-uid")
TRIAL = NewTrial(index=3, name="rank-lr-0003", parameters={"learning_rate": 2e-4, "lora_rank": 16})


def render(spec=None, trial=TRIAL, **kwargs):
    return render_trial_job(SWEEP, spec or make_spec(), trial, **kwargs)


def container(job):
    [c] = job["spec"]["template"]["spec"]["containers"]
    return c


def env_of(job) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(job)["env"]}


def trainer_spec(**trainer):
    """BASE_SPEC with spec.trainer fields added or replaced."""
    raw = raw_spec()
    raw["trainer"].update(trainer)
    return make_spec(**raw)


CUSTOM = {"command": ["python", "/app/train.py"], "args": ["--lr={{ params.learning_rate }}"]}


def test_metadata_labels_annotations_and_owner():
    job = render()
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    meta = job["metadata"]
    assert meta["name"] == "rank-lr-0003" and meta["namespace"] == "team-a"
    assert meta["labels"] == {"lorasweep.io/sweep": "rank-lr", "lorasweep.io/trial": "rank-lr-0003"}
    assert json.loads(meta["annotations"]["lorasweep.io/parameters"]) == TRIAL.parameters
    assert meta["annotations"]["lorasweep.io/trial-index"] == "3"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "lorasweep.io/v1alpha1",
            "kind": "HyperparameterSweep",
            "name": "rank-lr",
            "uid": "1234-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["lorasweep.io/trial"] == "rank-lr-0003"


def test_pod_is_restricted_and_never_restarts():
    job = render()
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the trainer image's user
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(job)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container(job)["terminationMessagePath"] == "/dev/termination-log"
    assert container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_env_contract():
    env = env_of(render(tracking_uri="http://mlflow:5000", parent_run_id="parent123"))
    assert env["LORASWEEP_SWEEP"] == "rank-lr"
    assert env["LORASWEEP_TRIAL"] == "rank-lr-0003"
    assert json.loads(env["LORASWEEP_PARAMS"]) == TRIAL.parameters
    assert env["LORASWEEP_RESULT_PATH"] == "/dev/termination-log"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MLFLOW_EXPERIMENT_NAME"] == "team-a/rank-lr"
    assert env["MLFLOW_PARENT_RUN_ID"] == "parent123"
    assert "MLFLOW_PARENT_RUN_ID" not in env_of(render())  # unknown yet: left out, not ""


def test_user_env_may_override_mlflow_but_not_the_contract():
    raw = raw_spec()
    raw["trainer"]["env"] = [
        {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "LORASWEEP_TRIAL", "value": "forged"},
        {"name": "HF_HOME", "value": "/cache"},
    ]
    raw["trainer"]["envFrom"] = [{"secretRef": {"name": "hf-token"}}]
    job = render(make_spec(**raw), tracking_uri="http://default")
    names = [e["name"] for e in container(job)["env"]]
    assert names.count("MLFLOW_TRACKING_URI") == 1 and names.count("LORASWEEP_TRIAL") == 1
    assert env_of(job)["LORASWEEP_TRIAL"] == "rank-lr-0003"
    assert env_of(job)["HF_HOME"] == "/cache"
    assert container(job)["envFrom"] == [{"secretRef": {"name": "hf-token"}}]


def test_bundled_trainer_arguments_round_trip_through_the_trainers_parser():
    raw = raw_spec()
    raw["trainer"]["config"] = {"lora_target": "q_proj,v_proj", "num_train_epochs": 1.5}
    trial = NewTrial(index=0, name="t-0000", parameters={"learning_rate": 1e-5, "lora_rank": 8})
    c = container(render(make_spec(**raw), trial))
    assert c["command"] == ["python", "-m", "lora_trainer"]
    assert c["args"][::2] == ["--set"] * (len(c["args"]) // 2)
    settings = dict(parse_set(item) for item in c["args"][1::2])
    assert settings == {
        "model_name_or_path": "/models/tiny",
        "train_file": "/data/train.jsonl",
        "eval_file": "/data/val.jsonl",
        "lora_target": "q_proj,v_proj",
        "num_train_epochs": 1.5,
        "learning_rate": 1e-5,
        "lora_rank": 8,
    }
    # Trial parameters come last, so they win over fixed settings.
    assert c["args"][-2:] == ["--set", "lora_rank=8"]


@pytest.mark.parametrize(
    "value",
    [
        *(1e-5, 2e-4, 8, True, "all", "yes", "1e-4", "a: b", "x\ny", " pad", "ünï", "", 0.1),
        *("🦙 x", "\\🦙", "a\\ud83d\\ude00"),  # beyond the BMP; a surrogate pair's text
    ],
)
def test_scalars_survive_yaml(value):
    assert yaml.safe_load(yaml_scalar(value)) == value
    assert load_yaml(yaml_flow(value)) == value  # libyaml, as the operator reads a Job
    assert type(yaml.safe_load(yaml_scalar(value))) is type(value)
    assert yaml.safe_load(yaml_flow({"k": [value]})) == {"k": [value]}


def test_custom_command_args_are_sandboxed_templates():
    raw = raw_spec()
    raw["trainer"]["command"] = ["python", "/app/train.py"]
    raw["trainer"]["args"] = [
        "--lr={{ params.learning_rate }}",
        "--rank={{ params['lora_rank'] }}",
        "--run={{ sweep.name }}/{{ trial.name }}/{{ trial.index }}",
    ]
    c = container(render(make_spec(**raw)))
    assert c["command"] == ["python", "/app/train.py"]
    assert c["args"] == ["--lr=0.0002", "--rank=16", "--run=rank-lr/rank-lr-0003/3"]


@pytest.mark.parametrize(
    ("arg", "problem"),
    [
        ("--lr={{ params.learnig_rate }}", "UndefinedError"),
        ("{{ params.__class__.__mro__ }}", "SecurityError"),
        ("{{ params.update({'x': 1}) }}", "SecurityError"),
        ("{{ params.lr", "TemplateSyntaxError"),
    ],
)
def test_bad_args_name_the_field(arg, problem):
    raw = raw_spec()
    raw["trainer"]["command"] = ["train"]
    raw["trainer"]["args"] = ["--ok", arg]
    with pytest.raises(RenderError) as caught:
        render(make_spec(**raw))
    assert caught.value.field == "spec.trainer.args[1]"
    assert str(caught.value).startswith(f"spec.trainer.args[1]: {problem}")


def test_pod_settings_from_the_spec():
    raw = raw_spec()
    raw["trainer"].update(
        {
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            "serviceAccountName": "trainer",
            "priorityClassName": "batch-low",
            "backoffLimit": 2,
            "activeDeadlineSeconds": 3600,
            "podAnnotations": {"sim.example/exit-code": "0"},
            "podLabels": {"team": "nlp", "lorasweep.io/trial": "forged"},
            "imagePullPolicy": "Never",
        }
    )
    job = render(make_spec(**raw))
    pod = job["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"sim.example/exit-code": "0"}
    assert pod["metadata"]["labels"]["team"] == "nlp"
    assert pod["metadata"]["labels"]["lorasweep.io/trial"] == "rank-lr-0003"
    assert pod["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert pod["spec"]["serviceAccountName"] == "trainer"
    assert "automountServiceAccountToken" not in pod["spec"]
    assert pod["spec"]["priorityClassName"] == "batch-low"
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert pod["spec"]["volumes"] == [
        {"name": "data", "emptyDir": {}},
        {"name": "lorasweep-tmp", "emptyDir": {}},
    ]
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["activeDeadlineSeconds"] == 3600
    c = container(job)
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert c["volumeMounts"] == [
        {"name": "data", "mountPath": "/data"},
        {"name": "lorasweep-tmp", "mountPath": "/tmp"},
    ]
    assert c["imagePullPolicy"] == "Never"


def test_rendering_is_deterministic():
    assert yaml.safe_dump(render()) == yaml.safe_dump(render())


def test_a_writable_tmp_is_mounted_unless_the_user_mounts_one():
    """The trainer keeps its caches under /tmp, so it runs on a read-only root filesystem."""
    raw = raw_spec()
    raw["trainer"]["volumes"] = [{"name": "scratch", "emptyDir": {"medium": "Memory"}}]
    raw["trainer"]["volumeMounts"] = [{"name": "scratch", "mountPath": "/tmp"}]
    job = render(make_spec(**raw))
    assert job["spec"]["template"]["spec"]["volumes"] == raw["trainer"]["volumes"]
    assert container(job)["volumeMounts"] == raw["trainer"]["volumeMounts"]


def test_user_template_gets_the_operator_metadata_enforced():
    template = builtin_template().replace("{{ trainer.backoffLimit | yaml }}", "5")
    template = template.replace("  labels: {{ metadata.labels | yaml }}", "  labels: {mine: x}")
    job = render(template=template)
    assert job["spec"]["backoffLimit"] == 5
    assert job["metadata"]["labels"] == {
        "mine": "x",
        "lorasweep.io/sweep": "rank-lr",
        "lorasweep.io/trial": "rank-lr-0003",
    }
    assert job["metadata"]["ownerReferences"][0]["uid"] == "1234-uid"


def test_spec_template_wins_over_the_default_template():
    raw = raw_spec()
    template = builtin_template().replace("runAsUser: 10001", "runAsUser: 2000")
    raw["trainer"]["jobTemplate"] = template
    job = render(make_spec(**raw), template="not used")
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 2000


def test_a_template_cannot_have_finished_trials_deleted():
    """A finished trial's Job is its record until the sweep goes: deleted by a TTL, the sweep
    would run the trial again."""
    template = builtin_template().replace("spec:\n", "spec:\n  ttlSecondsAfterFinished: 60\n", 1)
    assert "ttlSecondsAfterFinished" in template
    assert "ttlSecondsAfterFinished" not in render(template=template)["spec"]


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("apiVersion: v1\nkind: Pod\n", "apiVersion/kind is v1/Pod, expected batch/v1/Job"),
        (
            builtin_template().replace("restartPolicy: Never", "restartPolicy: OnFailure"),
            "spec.podFailurePolicy needs spec.template.spec.restartPolicy Never",
        ),
        ("- a\n- b\n", "expected a YAML mapping, got list"),
        ("apiVersion: batch/v1\nkind: Job\nspec: {}\n", "spec.template.spec is missing"),
        (
            "apiVersion: batch/v1\nkind: Job\nspec: {template: {spec: {containers: []}}}\n",
            "containers is missing or empty",
        ),
        (
            "apiVersion: batch/v1\nkind: Job\nspec: {template: {spec: "
            "{restartPolicy: Always, containers: [{name: a, image: b}]}}}\n",
            "restartPolicy is 'Always', expected Never or OnFailure",
        ),
        ("key: [unclosed\n", "did not render valid YAML"),
        ("{{ nothing_here }}", "UndefinedError"),
    ],
)
def test_a_template_that_is_not_a_job_is_refused_clearly(template, problem):
    with pytest.raises(RenderError) as caught:
        render(template=template)
    assert str(caught.value).startswith("template: ") and problem in str(caught.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "{{ range(10**9) }}",
            "TemplateLimitError: range(1000000000) has 1,000,000,000 items; a template may ask "
            "for at most 10,000 (line 3)",
        ),
        ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero (line 3)"),
        (
            "{{ 'x' * 10**8 }}",
            "TemplateLimitError: a str repeated 100,000,000 times is too big: a template may "
            "build at most 1,000,000 characters (or list items) (line 3)",
        ),
        (
            "{{ [0] * 10**8 }}",
            "TemplateLimitError: a list repeated 100,000,000 times is too big: a template may "
            "build at most 1,000,000 characters (or list items) (line 3)",
        ),
        (
            "{{ 10 ** 1000000 }}",
            "TemplateLimitError: 10 ** 1000000 has about 4,000,000 bits; a template may compute "
            "integers of at most 4,096 bits (line 3)",
        ),
        (
            "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}",
            "TemplateLimitError: the rendered text is too big: a template may build at most "
            "1,000,000 characters (or list items)",
        ),
        ("{{ lipsum(10**9) }}", "UndefinedError: 'lipsum' is undefined (line 3)"),
        ("{{ range(3) | yaml }}", "TypeError: cannot write range as YAML: range(0, 3) (line 3)"),
        ("{{ params.lora_rank.x }}", "UndefinedError: 'int object' has no attribute 'x' (line 3)"),
        ("{{ params", "TemplateSyntaxError: unexpected end of template"),
    ],
)
def test_every_error_of_a_template_names_the_field_and_the_line(body, message):
    """Whatever a user's template does wrong, or asks too much of, ends as a message naming
    spec.trainer.jobTemplate, never as a bare Python exception or a stuck operator."""
    raw = raw_spec()
    raw["trainer"]["jobTemplate"] = f"apiVersion: batch/v1\nkind: Job\n{body}\n"
    with pytest.raises(RenderError) as caught:
        render(make_spec(**raw))
    assert caught.value.field == "spec.trainer.jobTemplate"
    assert str(caught.value).startswith(f"spec.trainer.jobTemplate: {message}")


def test_ranges_powers_and_repeats_within_the_limits_still_work():
    raw = raw_spec()
    raw["trainer"]["command"] = ["train"]
    raw["trainer"]["args"] = ["{{ range(10000) | length }}", "{{ 2 ** 64 }}", "{{ 'ab' * 3 }}"]
    assert container(render(make_spec(**raw)))["args"] == ["10000", str(2**64), "ababab"]


def test_one_gpu_trial_is_one_pod_of_the_bundled_trainer():
    job = render()
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)
    assert "completionMode" not in job["spec"]
    assert "subdomain" not in job["spec"]["template"]["spec"]
    assert container(job)["command"] == ["python", "-m", "lora_trainer"]
    assert container(job)["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert not {"LORASWEEP_NNODES", "LORASWEEP_MASTER_ADDR"} & env_of(job).keys()
    assert render_trial_service(SWEEP, make_spec()) is None


def test_a_stopped_trial_gets_a_grace_period_to_write_its_result():
    pod = render()["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 60
    pod = render(trainer_spec(terminationGracePeriodSeconds=300))["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300


def test_the_gpu_limit_comes_from_gpus_and_keeps_the_users_resources():
    resources = {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "32Gi"}}
    c = container(render(trainer_spec(gpus=4, resources=resources)))
    assert c["resources"] == {
        "requests": {"cpu": "4", "memory": "32Gi"},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": "4"},
    }


def test_rendered_objects_pass_the_kubernetes_clients_checks():
    """The client validates a body against its models before sending it: quantities are
    strings there, though the API server would take numbers."""
    from kubernetes.client import V1Job, V1Service

    resources = {"requests": {"cpu": 2, "memory": "8Gi"}, "limits": {"cpu": 2.5}}
    for spec in (
        make_spec(),
        trainer_spec(gpus=2, nodes=2, resources=resources),
        trainer_spec(**MODEL_CACHE, resources=resources),
    ):
        V1Job.model_validate(render(spec))
    limits = container(render(trainer_spec(gpus=2, resources=resources)))["resources"]["limits"]
    assert limits == {"cpu": "2.5", "nvidia.com/gpu": "2"}
    V1Job.model_validate(render_model_fetch_job(SWEEP, trainer_spec(**MODEL_CACHE)))
    V1Service.model_validate(render_trial_service(SWEEP, trainer_spec(gpus=2, nodes=2)))
    # A user's template writing a number.
    line = "resources: {{ container.resources | yaml }}"
    assert line in builtin_template()
    job = render(template=builtin_template().replace(line, "resources: {limits: {cpu: 3}}"))
    assert container(job)["resources"] == {"limits": {"cpu": "3"}}
    V1Job.model_validate(job)


def test_several_gpus_on_one_node_run_one_trainer_process_per_gpu():
    job = render(trainer_spec(gpus=2))
    c = container(job)
    assert c["command"] == [
        "python",
        "-m",
        "lora_trainer.launch",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "lora_trainer",
    ]
    assert c["args"] == container(render())["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)
    env = env_of(job)
    assert (env["LORASWEEP_NNODES"], env["LORASWEEP_NPROC_PER_NODE"]) == ("1", "2")
    assert "LORASWEEP_MASTER_ADDR" not in env and "LORASWEEP_MASTER_PORT" not in env


def test_a_trial_on_several_nodes_is_an_indexed_job_that_meets_on_its_pod_0():
    job = render(trainer_spec(gpus=2, nodes=2))
    assert job["spec"]["completionMode"] == "Indexed"
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (2, 2)
    assert job["spec"]["template"]["spec"]["subdomain"] == "rank-lr-trials"
    c = container(job)
    assert c["command"] == [
        "python",
        "-m",
        "lora_trainer.launch",
        "--nnodes=2",
        "--nproc-per-node=2",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=rank-lr-0003-0.rank-lr-trials",
        "--master-port=29500",
        "-m",
        "lora_trainer",
    ]
    assert c["args"] == container(render())["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"  # per pod, not per trial
    env = env_of(job)
    assert env["LORASWEEP_NNODES"] == "2" and env["LORASWEEP_NPROC_PER_NODE"] == "2"
    assert env["LORASWEEP_MASTER_ADDR"] == "rank-lr-0003-0.rank-lr-trials"
    assert env["LORASWEEP_MASTER_PORT"] == "29500"


def test_a_custom_program_runs_as_is_and_gets_the_distributed_environment():
    job = render(trainer_spec(gpus=4, nodes=3, **CUSTOM))
    assert container(job)["command"] == ["python", "/app/train.py"]
    assert container(job)["args"] == ["--lr=0.0002"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 3
    env = env_of(job)
    assert (env["LORASWEEP_NNODES"], env["LORASWEEP_NPROC_PER_NODE"]) == ("3", "4")
    assert env["LORASWEEP_MASTER_ADDR"] == "rank-lr-0003-0.rank-lr-trials"
    assert env["LORASWEEP_MASTER_PORT"] == "29500"


def test_the_service_gives_the_pods_of_multi_node_trials_their_dns_names():
    spec = trainer_spec(nodes=2)
    service = render_trial_service(SWEEP, spec)
    assert service == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "rank-lr-trials",
            "namespace": "team-a",
            "labels": {"lorasweep.io/sweep": "rank-lr"},
            "ownerReferences": render()["metadata"]["ownerReferences"],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"lorasweep.io/sweep": "rank-lr"},
            "ports": [{"name": "rendezvous", "port": 29500, "protocol": "TCP"}],
        },
    }
    # It selects every trial's pods, which name it as their subdomain.
    pod = render(spec)["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]


def test_lost_pods_are_retried_and_hopeless_trials_fail_at_once():
    disrupted = {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    fatal = {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3, 4]},
    }
    assert render()["spec"]["podFailurePolicy"] == {"rules": [disrupted, fatal]}
    assert render(trainer_spec(**CUSTOM))["spec"]["podFailurePolicy"] == {"rules": [disrupted]}
    assert container(render())["name"] == "trainer"  # the container the exit codes are read from


def test_fatal_exit_codes_are_the_bundled_trainers():
    assert FATAL_EXIT_CODES == [EXIT_CONFIG, EXIT_DATA, EXIT_OUT_OF_MEMORY]


def test_checkpoints_get_a_directory_per_trial_on_the_claim():
    checkpoints = {"claimName": "lora-checkpoints", "intervalSteps": 50}
    job = render(trainer_spec(checkpoints=checkpoints))
    assert job["spec"]["template"]["spec"]["volumes"] == [
        {
            "name": "lorasweep-checkpoints",
            "persistentVolumeClaim": {"claimName": "lora-checkpoints"},
        },
        {"name": "lorasweep-tmp", "emptyDir": {}},
    ]
    assert container(job)["volumeMounts"] == [
        {"name": "lorasweep-checkpoints", "mountPath": "/checkpoints", "subPath": "rank-lr-0003"},
        {"name": "lorasweep-tmp", "mountPath": "/tmp"},
    ]
    env = env_of(job)
    assert env["LORASWEEP_CHECKPOINT_DIR"] == "/checkpoints"
    assert env["LORASWEEP_CHECKPOINT_STEPS"] == "50"
    assert "LORASWEEP_CHECKPOINT_DIR" not in env_of(render())


def test_a_custom_program_gets_its_checkpoint_directory_too():
    checkpoints = {"claimName": "ckpt", "intervalSteps": 10, "mountPath": "/work/ckpt"}
    job = render(trainer_spec(checkpoints=checkpoints, **CUSTOM))
    assert env_of(job)["LORASWEEP_CHECKPOINT_DIR"] == "/work/ckpt"
    assert env_of(job)["LORASWEEP_CHECKPOINT_STEPS"] == "10"
    [mount] = [m for m in container(job)["volumeMounts"] if m["mountPath"] == "/work/ckpt"]
    assert mount["subPath"] == "rank-lr-0003"


MODEL_CACHE = {"model": "meta-llama/Llama-3.1-8B", "modelCache": {"claimName": "models"}}


def test_trials_read_the_model_from_the_cache_claim_read_only():
    job = render(trainer_spec(**MODEL_CACHE))
    assert "model_name_or_path=/models-cache/meta-llama--Llama-3.1-8B" in container(job)["args"]
    assert env_of(job)["LORASWEEP_MODEL_PATH"] == "/models-cache/meta-llama--Llama-3.1-8B"
    pod = job["spec"]["template"]["spec"]
    assert {
        "name": "lorasweep-model-cache",
        "persistentVolumeClaim": {"claimName": "models", "readOnly": True},
    } in pod["volumes"]
    assert {
        "name": "lorasweep-model-cache",
        "mountPath": "/models-cache",
        "readOnly": True,
    } in container(job)["volumeMounts"]
    assert render_model_fetch_job(SWEEP, make_spec()) is None
    assert "LORASWEEP_MODEL_PATH" not in env_of(render())


def test_the_model_download_job_writes_the_cache_once_without_a_gpu():
    hub = [{"name": "HF_ENDPOINT", "value": "http://hub.local"}]
    secret = [{"secretRef": {"name": "hf-token"}}]
    spec = trainer_spec(
        **MODEL_CACHE,
        env=hub,
        envFrom=secret,
        nodeSelector={"pool": "gpu"},
        resources={"limits": {"nvidia.com/gpu": 1, "memory": "64Gi"}},
    )
    job = render_model_fetch_job(SWEEP, spec)
    meta = job["metadata"]
    assert (meta["name"], meta["namespace"]) == ("rank-lr-model", "team-a")
    assert meta["labels"] == {"lorasweep.io/sweep": "rank-lr", "lorasweep.io/model-fetch": "true"}
    assert meta["ownerReferences"][0]["uid"] == "1234-uid"
    assert "lorasweep.io/trial-index" not in (meta.get("annotations") or {})  # not a trial
    pod = job["spec"]["template"]["spec"]
    [fetch] = pod["containers"]
    assert fetch["command"] == [
        "python",
        "-m",
        "lora_trainer.fetch",
        "--model",
        "meta-llama/Llama-3.1-8B",
        "--dest",
        "/models-cache/meta-llama--Llama-3.1-8B",
    ]
    assert (fetch["image"], fetch["env"], fetch["envFrom"]) == ("trainer:test", hub, secret)
    assert "resources" not in fetch  # the trainer's GPU stays free for trials
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert {"name": "lorasweep-model-cache", "mountPath": "/models-cache"} in fetch["volumeMounts"]
    assert {"name": "lorasweep-model-cache", "persistentVolumeClaim": {"claimName": "models"}} in (
        pod["volumes"]
    )
    assert pod["securityContext"]["runAsNonRoot"] and pod["restartPolicy"] == "Never"
    # An unknown model fails at once; a network failure is retried (and resumes).
    [_, fatal] = job["spec"]["podFailurePolicy"]["rules"]
    assert fatal["onExitCodes"] == {"containerName": "fetch", "operator": "In", "values": [2]}
    assert job["spec"]["backoffLimit"] == 3


SHAPES = {
    "bundled trainer": make_spec(),
    "two nodes": trainer_spec(gpus=2, nodes=2),
    "custom program": trainer_spec(**CUSTOM),
    "queued, with checkpoints": trainer_spec(
        queueName="team-a", checkpoints={"claimName": "ckpt", "intervalSteps": 50}
    ),
    "pod settings": trainer_spec(
        nodeSelector={"gpu": "h100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}],
        env=[{"name": "NOTE", "value": "yes"}, {"name": "EMPTY", "value": ""}],
        podAnnotations={"a": "1e-4"},
        activeDeadlineSeconds=3600,
    ),
}
PARAMETERS = [
    {"learning_rate": 2e-4, "lora_rank": 16},
    {"learning_rate": 1e-5, "lora_rank": 8, "lora_dropout": 0.0},
    {"learning_rate": 1e300, "lora_target": "yes", "lora_rank": 1},
    {"learning_rate": 0.1, "lora_target": 'ünï 🦙: x\ny "q"', "lora_rank": 2**40},
]


@pytest.mark.parametrize("spec", SHAPES.values(), ids=SHAPES.keys())
def test_the_built_in_template_gives_the_job_its_rendered_text_reads_as(spec):
    """The built-in template's shape is read as YAML once and each trial's values are put into
    it (templating.render_yaml): each Job is exactly what its whole rendered text reads as."""
    as_text = builtin_template() + "\n"  # another template: rendered and read as text
    for index, parameters in enumerate(PARAMETERS):
        trial = NewTrial(index=index, name=f"rank-lr-{index:04d}", parameters=parameters)
        assert render(spec, trial) == render(spec, trial, template=as_text)


@pytest.mark.parametrize(
    "source",
    [
        "{{ name | yaml }}: {{ value | yaml }}\nlist: [{{ value | yaml }}, 2]\n",
        "a: prefix {{ name | yaml }}\n",  # a value inside a longer string
        "a: {{ value | yaml }}\n{% if value.k %}b: {{ name | yaml }}\n{% endif %}",
    ],
)
def test_a_template_that_writes_values_anywhere_reads_as_its_text(source):
    context = {"name": "yes", "value": {"k": [1.5, None, "x"], 2: (3,)}}
    assert render_yaml(source, "f", context) == yaml.safe_load(render_text(source, "f", context))

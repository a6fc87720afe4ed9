"""The API models: aliases, defaults, and validation messages that name field, value and fix."""

from __future__ import annotations

import pytest

from sweep_operator.api import BestTrial, MlflowSpec, ParameterSpec, SweepSpec
from sweep_operator.semantic import SweepInvalid, parse_spec
from tests.unit.sweep_helpers import BASE_SPEC, make_spec, raw_spec


def problems(raw: dict) -> list[str]:
    with pytest.raises(SweepInvalid) as caught:
        parse_spec(raw)
    assert caught.value.reason == "InvalidSpec"
    return [str(p) for p in caught.value.problems]


def test_camel_case_and_defaults():
    spec = make_spec(parallelism=None, algorithm=None, maxFailedTrials=3)
    assert spec.max_trials == 6
    assert spec.max_failed_trials == 3
    assert spec.parallelism == 1
    assert spec.algorithm.name == "grid" and spec.algorithm.seed == 0
    assert spec.objective.goal == "minimize"
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    assert dumped["maxTrials"] == 6 and "max_trials" not in dumped


def test_values_keep_their_yaml_types():
    spec = make_spec(
        parameters={
            "lora_target": {"values": ["all", "q_proj,v_proj"]},
            "bf16": {"values": [True]},
            "lora_rank": {"values": [8, 16]},
            "learning_rate": {"values": [1e-4]},
        }
    )
    assert spec.parameters["lora_rank"].values == [8, 16]
    assert type(spec.parameters["lora_rank"].values[0]) is int
    assert spec.parameters["bf16"].values == [True]
    assert spec.parameters["learning_rate"].values == [1e-4]


def test_typo_in_a_field_name_is_an_error_not_ignored():
    raw = raw_spec(maxTrails=6)
    assert problems(raw) == ["spec.maxTrails: Extra inputs are not permitted (got 6)"]
    raw = raw_spec()
    raw["trainer"]["imgae"] = "x"
    assert "spec.trainer.imgae: Extra inputs are not permitted (got 'x')" in problems(raw)


def test_bad_enum_value_names_field_value_and_choices():
    [message] = problems(raw_spec(objective={"metric": "eval_loss", "goal": "minimise"}))
    assert message == (
        "spec.objective.goal: Input should be 'minimize' or 'maximize' (got 'minimise')"
    )


def test_missing_field():
    assert problems(raw_spec(trainer=None)) == ["spec.trainer: Field required"]


@pytest.mark.parametrize(
    ("parameter", "expected"),
    [
        ({"type": "uniform", "min": 0.2, "max": 0.1}, "min (0.2) must be less than max (0.1)"),
        ({"type": "uniform", "min": 0.1}, "type uniform needs both min and max"),
        ({"type": "log_uniform", "min": 0.0, "max": 0.1}, "type log_uniform needs min > 0"),
        ({"type": "int", "min": 1.5, "max": 8}, "type int needs whole-number bounds, got min 1.5"),
        ({"type": "categorical"}, "type categorical needs values"),
        ({"type": "uniform", "min": 0, "max": 1, "values": [1]}, "values cannot be combined"),
        ({"values": [1], "min": 0}, "min and max need a range type"),
        ({"type": "uniform", "min": 0, "max": 1, "step": 2}, "step is only allowed with type int"),
        ({"values": []}, "List should have at least 1 item after validation, not 0"),
        ({"values": [8, 16, 8]}, "values contain 8 twice"),
        ({}, "a parameter needs either values"),
        ({"values": [[1, 2]]}, "values[0] is [1, 2]; a value must be a number, string or boolean"),
        ({"values": [None]}, "values[0] is None; a value must be"),
    ],
)
def test_parameter_rules(parameter, expected):
    raw = raw_spec(algorithm={"name": "random"}, parameters={"lora_dropout": parameter})
    found = problems(raw)
    assert len(found) == 1 and expected in found[0], found
    assert all(m.startswith("spec.parameters.lora_dropout") for m in found), found


def test_valid_ranges():
    ParameterSpec.model_validate({"type": "int", "min": 4, "max": 64, "step": 4})
    ParameterSpec.model_validate({"type": "log_uniform", "min": 1e-5, "max": 1e-3})
    ParameterSpec.model_validate({"type": "categorical", "values": ["a", "b"]})


def test_random_needs_max_trials():
    found = problems(raw_spec(algorithm={"name": "random"}, maxTrials=None))
    assert found == ["spec: algorithm random needs maxTrials (how many samples to draw)"]


def test_grid_refuses_ranges_and_names_them():
    parameters = {
        **BASE_SPEC["parameters"],
        "lora_dropout": {"type": "uniform", "min": 0, "max": 1},
    }
    [message] = problems(raw_spec(parameters=parameters))
    assert "algorithm grid needs values for every parameter; lora_dropout use a range" in message


def test_parameter_names_must_be_identifiers():
    [message] = problems(raw_spec(parameters={"lora rank": {"values": [8]}}))
    assert message == (
        "spec.parameters: parameter name 'lora rank' is not an identifier "
        "(letters, digits, _ . -, not starting with a digit)"
    )


@pytest.mark.parametrize("field", ["parallelism", "maxTrials"])
def test_counts_must_be_positive(field):
    [message] = problems(raw_spec(**{field: 0}))
    assert message == f"spec.{field}: Input should be greater than or equal to 1 (got 0)"


def trainer_problems(**trainer) -> list[str]:
    raw = raw_spec()
    raw["trainer"].update(trainer)
    return problems(raw)


@pytest.mark.parametrize("field", ["gpus", "nodes"])
def test_a_trial_needs_at_least_one_gpu_and_node(field):
    assert trainer_problems(**{field: 0}) == [
        f"spec.trainer.{field}: Input should be greater than or equal to 1 (got 0)"
    ]


def test_gpus_and_nodes_default_to_one():
    trainer = make_spec().trainer
    assert (trainer.gpus, trainer.nodes, trainer.checkpoints) == (1, 1, None)


@pytest.mark.parametrize("kind", ["limits", "requests"])
def test_resources_may_repeat_gpus_but_not_contradict_it(kind):
    assert trainer_problems(gpus=2, resources={kind: {"nvidia.com/gpu": 1}}) == [
        f"spec.trainer: spec.trainer.resources.{kind} has nvidia.com/gpu: 1 but "
        "spec.trainer.gpus is 2; set the GPUs of a trial with spec.trainer.gpus only"
    ]
    for same in (2, "2"):
        raw = raw_spec()
        raw["trainer"].update(gpus=2, resources={kind: {"nvidia.com/gpu": same}})
        assert parse_spec(raw).trainer.gpus == 2


def test_resource_limits_must_be_a_mapping():
    [message] = trainer_problems(resources={"limits": ["nvidia.com/gpu"]})
    assert message == (
        "spec.trainer: spec.trainer.resources.limits must map resource names to quantities, "
        "got ['nvidia.com/gpu']"
    )


def test_checkpoints_defaults_and_aliases():
    raw = raw_spec()
    raw["trainer"]["checkpoints"] = {"claimName": "lora-ckpt.team-a", "intervalSteps": 100}
    checkpoints = parse_spec(raw).trainer.checkpoints
    assert checkpoints.claim_name == "lora-ckpt.team-a"
    assert (checkpoints.interval_steps, checkpoints.mount_path) == (100, "/checkpoints")


@pytest.mark.parametrize(
    ("checkpoints", "expected"),
    [
        (
            {"claimName": "Lora_Ckpt", "intervalSteps": 10},
            "spec.trainer.checkpoints.claimName: claimName 'Lora_Ckpt' is not a "
            "PersistentVolumeClaim name: lower-case letters, digits, '-' and '.', starting and "
            "ending with a letter or digit",
        ),
        (
            {"claimName": "c" * 254, "intervalSteps": 10},
            "spec.trainer.checkpoints.claimName: String should have at most 253 characters",
        ),
        (
            {"claimName": "ckpt", "intervalSteps": 0},
            "spec.trainer.checkpoints.intervalSteps: Input should be greater than or equal to 1 "
            "(got 0)",
        ),
        ({"claimName": "ckpt"}, "spec.trainer.checkpoints.intervalSteps: Field required"),
        (
            {"claimName": "ckpt", "intervalSteps": 10, "mountPath": "checkpoints"},
            "spec.trainer.checkpoints.mountPath: mountPath 'checkpoints' must be an absolute "
            "path (start with /)",
        ),
    ],
)
def test_bad_checkpoints_name_the_field(checkpoints, expected):
    [message] = trainer_problems(checkpoints=checkpoints)
    assert message.startswith(expected), message


def test_the_checkpoint_volume_name_and_mount_path_must_be_free():
    checkpoints = {"claimName": "ckpt", "intervalSteps": 10}
    volume = {"name": "lorasweep-checkpoints", "emptyDir": {}}
    assert trainer_problems(checkpoints=checkpoints, volumes=[volume]) == [
        "spec.trainer: spec.trainer.volumes has a volume named lorasweep-checkpoints, the name "
        "of the checkpoint volume; rename it"
    ]
    mounts = [{"name": "data", "mountPath": "/checkpoints"}]
    assert trainer_problems(checkpoints=checkpoints, volumeMounts=mounts) == [
        "spec.trainer: spec.trainer.volumeMounts already mounts a volume at /checkpoints; "
        "choose another spec.trainer.checkpoints.mountPath"
    ]
    # Without checkpoints the name is the user's to take.
    raw = raw_spec()
    raw["trainer"]["volumes"] = [volume]
    parse_spec(raw)


def test_model_cache_defaults_and_a_hub_id():
    raw = raw_spec()
    raw["trainer"].update(model="Qwen/Qwen2.5-0.5B", modelCache={"claimName": "models"})
    cache = parse_spec(raw).trainer.model_cache
    assert (cache.claim_name, cache.mount_path) == ("models", "/models-cache")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            "/models/llama",
            "spec.trainer: spec.trainer.modelCache needs spec.trainer.model to be a hub id "
            "(name or org/name), got '/models/llama'; a local path is read where it is: "
            "remove modelCache",
        ),
        ("org/../etc", "spec.trainer: spec.trainer.modelCache needs spec.trainer.model to be"),
        ("a/b/c", "spec.trainer: spec.trainer.modelCache needs spec.trainer.model to be"),
        (None, "spec.trainer: spec.trainer.modelCache needs spec.trainer.model, the hub id"),
    ],
)
def test_a_model_cache_needs_a_hub_model(model, expected):
    [message] = trainer_problems(model=model, modelCache={"claimName": "models"})
    assert message.startswith(expected), message


def test_the_model_cache_volume_name_and_mount_path_must_be_free():
    cache = {"claimName": "models", "mountPath": "/checkpoints"}
    checkpoints = {"claimName": "ckpt", "intervalSteps": 10}
    assert trainer_problems(model="org/m", modelCache=cache, checkpoints=checkpoints) == [
        "spec.trainer: spec.trainer.volumeMounts or checkpoints already mount a volume at "
        "/checkpoints; choose another spec.trainer.modelCache.mountPath"
    ]
    volume = {"name": "lorasweep-model-cache", "emptyDir": {}}
    [message] = trainer_problems(model="org/m", modelCache={"claimName": "m"}, volumes=[volume])
    assert "volume named lorasweep-model-cache" in message
    [message] = trainer_problems(model="org/m", modelCache={"claimName": "Models"})
    assert message.startswith("spec.trainer.modelCache.claimName: claimName 'Models' is not")


def test_registered_model_and_adapter_uri_are_camel_case():
    mlflow = MlflowSpec.model_validate({"registeredModel": "llama-lora"})
    assert mlflow.registered_model == "llama-lora"
    best = BestTrial(
        name="s-0001", index=1, parameters={}, value=0.5, adapter_uri="models:/llama-lora/3"
    )
    assert best.model_dump(by_alias=True)["adapterUri"] == "models:/llama-lora/3"


def test_env_entries_need_a_name():
    raw = raw_spec()
    raw["trainer"]["env"] = [{"value": "x"}]
    [message] = problems(raw)
    assert message.startswith("spec.trainer.env: env[0] needs a name")


def test_whole_resource_round_trips():
    spec = SweepSpec.model_validate(BASE_SPEC)
    again = SweepSpec.model_validate(spec.model_dump(by_alias=True, exclude_none=True))
    assert again == spec

"""Semantic checks against the real trainer config: typos fail at once, never on a GPU."""

from __future__ import annotations

import pytest

from sweep_operator.render import SweepRef
from sweep_operator.semantic import SweepInvalid, check_spec, validate_sweep
from tests.unit.sweep_helpers import make_spec, raw_spec

SWEEP = SweepRef(name="sw", namespace="ns", uid="u")


def problems(**changes) -> list[str]:
    return [str(p) for p in check_spec(make_spec(**changes), SWEEP)]


def test_a_valid_sweep_has_no_problems():
    assert problems() == []


def test_unknown_parameter_names_the_field_and_suggests():
    parameters = {"lora_rnak": {"values": [8]}, "learning_rate": {"values": [1e-4]}}
    assert problems(parameters=parameters) == [
        "spec.parameters.lora_rnak: 'lora_rnak' is not a setting of the bundled trainer; "
        "did you mean lora_rank?"
    ]


def test_unknown_config_key_and_operator_owned_fields():
    raw = raw_spec()
    raw["trainer"]["config"] = {"num_epochs": 3, "train_file": "/x"}
    found = [str(p) for p in check_spec(make_spec(**raw), SWEEP)]
    assert found == [
        "spec.trainer.config.num_epochs: 'num_epochs' is not a setting of the bundled trainer; "
        "did you mean num_train_epochs?",
        "spec.trainer.config.train_file: set spec.trainer.data.train instead",
    ]


def test_values_are_checked_against_the_trainers_types():
    parameters = {
        "lora_rank": {"values": [8, "sixteen"]},
        "lora_dropout": {"values": [0.1, 1.5]},
        "learning_rate": {"values": [1e-4]},
    }
    assert problems(parameters=parameters) == [
        "spec.parameters.lora_dropout.values[1]: 1.5 is not valid for the trainer's "
        "lora_dropout: Input should be less than 1",
        "spec.parameters.lora_rank.values[1]: 'sixteen' is not valid for the trainer's "
        "lora_rank: Input should be a valid integer, unable to parse string as an integer",
    ]


def test_a_quantization_the_trainer_lacks_fails_the_sweep_before_any_trial():
    raw = raw_spec()
    raw["trainer"]["config"] = {"quantization_bit": 3}
    found = [str(p) for p in check_spec(make_spec(**raw), SWEEP)]
    assert found == [
        "spec.trainer.config.quantization_bit: 3 is not valid for the trainer's "
        "quantization_bit: Input should be 4 or 8"
    ]


def test_range_bounds_are_checked_too():
    found = problems(
        algorithm={"name": "random"},
        parameters={"lora_dropout": {"type": "uniform", "min": 0.0, "max": 1.0}},
    )
    assert found == [
        "spec.parameters.lora_dropout.max: 1.0 is not valid for the trainer's lora_dropout: "
        "Input should be less than 1"
    ]


def test_a_parameter_cannot_also_be_fixed():
    raw = raw_spec()
    raw["trainer"]["config"] = {"lora_rank": 8}
    [found] = [str(p) for p in check_spec(make_spec(**raw), SWEEP)]
    assert found == (
        "spec.parameters.lora_rank: lora_rank is also fixed in spec.trainer.config; "
        "keep one of them"
    )


def test_the_bundled_trainer_needs_model_and_data():
    raw = raw_spec()
    del raw["trainer"]["model"], raw["trainer"]["data"]
    found = [str(p) for p in check_spec(make_spec(**raw), SWEEP)]
    assert found == [
        "spec.trainer.model: required for the bundled trainer (or set command)",
        "spec.trainer.data: required for the bundled trainer: {train: <path>}",
    ]


def test_a_custom_program_may_use_any_parameter_name():
    raw = raw_spec(parameters={"my_lr": {"values": [0.1, 0.2]}})
    raw["trainer"] = {
        "image": "me/train:1",
        "command": ["python", "t.py"],
        "args": ["--lr={{ params.my_lr }}"],
    }
    assert check_spec(make_spec(**raw), SWEEP) == []


def test_a_huge_grid_needs_max_trials():
    parameters = {
        "lora_rank": {"values": list(range(1, 101))},
        "cutoff_len": {"values": list(range(1, 102))},
    }
    [found] = problems(parameters=parameters, maxTrials=None)
    assert found == (
        "spec.maxTrials: the grid has 10,100 trials (101 cutoff_len x 100 lora_rank); above "
        "10,000 set maxTrials to run a prefix of it, or use algorithm random"
    )
    assert problems(parameters=parameters, maxTrials=50) == []


def test_reserved_env_names():
    raw = raw_spec()
    raw["trainer"]["env"] = [{"name": "LORASWEEP_PARAMS", "value": "{}"}]
    [found] = [str(p) for p in check_spec(make_spec(**raw), SWEEP)]
    assert found.startswith("spec.trainer.env[0].name: LORASWEEP_PARAMS is reserved")


def test_a_template_that_does_not_render_is_a_problem():
    raw = raw_spec()
    raw["trainer"]["jobTemplate"] = "apiVersion: v1\nkind: ConfigMap\n"
    [found] = [str(p) for p in check_spec(make_spec(**raw), SWEEP)]
    assert found == (
        "spec.trainer.jobTemplate: the template did not render a valid trial Job: "
        "apiVersion/kind is v1/ConfigMap, expected batch/v1/Job"
    )


def test_a_template_asking_for_too_much_is_a_problem_naming_the_field():
    raw = raw_spec()
    raw["trainer"]["jobTemplate"] = "{% for i in range(10**9) %}{% endfor %}"
    [found] = [str(p) for p in check_spec(make_spec(**raw), SWEEP)]
    assert found == (
        "spec.trainer.jobTemplate: TemplateLimitError: range(1000000000) has 1,000,000,000 "
        "items; a template may ask for at most 10,000 (line 1)"
    )


def test_validate_sweep_raises_with_every_problem():
    raw = raw_spec(parameters={"lora_rnak": {"values": [8]}, "lerning_rate": {"values": [1e-4]}})
    with pytest.raises(SweepInvalid) as caught:
        validate_sweep(raw, SWEEP)
    assert caught.value.reason == "InvalidSpec"
    assert [p.field for p in caught.value.problems] == [
        "spec.parameters.lerning_rate",
        "spec.parameters.lora_rnak",
    ]
    assert validate_sweep(raw_spec(), SWEEP) == make_spec()


def test_suggestions_for_fragments_and_misspellings():
    from sweep_operator.semantic import bundled_trainer_config, close_matches

    known = list(bundled_trainer_config().model_fields)
    assert close_matches("batch_size", known)[:2] == [
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
    ]
    assert close_matches("lerning_rate", known) == ["learning_rate"]
    assert close_matches("zzz", known) == []

"""Trial defaults of an installation (the chart's trialDefaults): parsed from the environment,
applied only where a sweep is silent."""

from __future__ import annotations

import io

import pytest
import yaml

from sweep_operator import cli
from sweep_operator.defaults import (
    ENV_IMAGE,
    ENV_NODE_SELECTOR,
    ENV_TOLERATIONS,
    DefaultsError,
    TrialDefaults,
    trial_defaults,
)
from sweep_operator.naming import trial_name
from sweep_operator.render import SweepRef, render_trial_job
from sweep_operator.semantic import SweepInvalid, validate_sweep
from sweep_operator.trials import NewTrial
from tests.unit.sweep_helpers import BASE_SPEC, EXAMPLE, raw_spec

GPU_NODES = {"lorasweep.io/node-mode": "local"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
ENV = {
    ENV_IMAGE: "registry.example.com/lorasweep-trainer:0.1.0",
    ENV_NODE_SELECTOR: '{"lorasweep.io/node-mode": "local"}',
    ENV_TOLERATIONS: '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]',
}
SWEEP = SweepRef(name="s", namespace="ns", uid="u")


def trainer_without(*keys: str) -> dict:
    trainer = {k: v for k, v in BASE_SPEC["trainer"].items() if k not in keys}
    return raw_spec(trainer=trainer)


def first_pod(raw: dict) -> dict:
    spec = validate_sweep(raw, SWEEP)
    trial = NewTrial(index=0, name=trial_name("s", 0), parameters={"lora_rank": 8})
    return render_trial_job(SWEEP, spec, trial)["spec"]["template"]["spec"]


def test_from_env_parses_every_variable():
    defaults = TrialDefaults.from_env(ENV)
    assert defaults == TrialDefaults(
        image=ENV[ENV_IMAGE], node_selector=GPU_NODES, tolerations=[GPU_TOLERATION]
    )
    assert TrialDefaults.from_env({}) == TrialDefaults()
    # The chart renders unset values as empty strings.
    assert TrialDefaults.from_env(dict.fromkeys(ENV, "")) == TrialDefaults()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (ENV_NODE_SELECTOR, "{not json", "not valid JSON"),
        (ENV_NODE_SELECTOR, '["a"]', "expected a JSON object"),
        (ENV_NODE_SELECTOR, '{"gpu": true}', "label values must be strings"),
        (ENV_TOLERATIONS, '{"key": "x"}', "expected a JSON list"),
        (ENV_TOLERATIONS, '["x"]', "each toleration must be a JSON object"),
    ],
)
def test_from_env_names_the_bad_variable(name: str, value: str, expected: str):
    with pytest.raises(DefaultsError, match=expected) as error:
        TrialDefaults.from_env({name: value})
    assert str(error.value).startswith(name)


def test_defaults_fill_a_silent_sweep():
    pod = first_pod(TrialDefaults.from_env(ENV).apply(trainer_without("image")))
    assert pod["containers"][0]["image"] == ENV[ENV_IMAGE]
    assert pod["nodeSelector"] == GPU_NODES
    assert pod["tolerations"] == [GPU_TOLERATION]


def test_a_sweep_keeps_what_it_sets_and_may_opt_out():
    trainer = {
        **BASE_SPEC["trainer"],
        "nodeSelector": {},  # explicitly none: the defaults must not apply
        "tolerations": [{"key": "other", "operator": "Exists"}],
    }
    raw = raw_spec(trainer=trainer)
    applied = TrialDefaults.from_env(ENV).apply(raw)
    pod = first_pod(applied)
    assert pod["containers"][0]["image"] == "trainer:test"
    assert "nodeSelector" not in pod
    assert pod["tolerations"] == [{"key": "other", "operator": "Exists"}]
    assert raw == raw_spec(trainer=trainer), "apply must not modify its argument"


def test_no_image_and_no_default_names_the_field():
    with pytest.raises(SweepInvalid) as error:
        TrialDefaults().apply(trainer_without("image"))
    [problem] = error.value.problems
    assert problem.field == "spec.trainer.image"
    assert ENV_IMAGE in problem.message


def test_a_job_template_needs_no_image():
    raw = raw_spec(trainer={**BASE_SPEC["trainer"], "jobTemplate": "kind: Job"})
    del raw["trainer"]["image"]
    assert "image" not in TrialDefaults().apply(raw)["trainer"]


def test_render_cli_applies_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path):
    sweep = yaml.safe_load(EXAMPLE.read_text())
    del sweep["spec"]["trainer"]["image"]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    monkeypatch.setenv(ENV_IMAGE, "defaults:1")
    trial_defaults.cache_clear()
    try:
        out = io.StringIO()
        assert cli.main(["render", str(path), "--limit", "1"], out) == 0
        [job] = yaml.safe_load_all(out.getvalue())
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "defaults:1"
        monkeypatch.setenv(ENV_NODE_SELECTOR, "nope")
        trial_defaults.cache_clear()
        assert cli.main(["render", str(path)], io.StringIO()) == 1
    finally:
        trial_defaults.cache_clear()

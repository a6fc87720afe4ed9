"""`lorasweep refine`: the narrowing rule and the refined sweep's manifest."""

from __future__ import annotations

import copy

import pytest

from sweep_operator.api import HyperparameterSweep
from sweep_operator.cli import main
from sweep_operator.naming import trial_name
from sweep_operator.refine import RefineError, narrowed_parameters, refined_sweep, top_trials
from sweep_operator.trials import ObservedTrial, TrialState
from tests.unit.sweep_helpers import make_spec, raw_spec

S = TrialState
SPACE = {
    "learning_rate": {"type": "log_uniform", "min": 1e-6, "max": 1e-1},
    "lora_rank": {"type": "int", "min": 4, "max": 64, "step": 4},
    "lora_dropout": {"type": "uniform", "min": 0.0, "max": 0.3},
    "lora_target": {"type": "categorical", "values": ["all", "q_proj,v_proj"]},
    "lora_alpha": {"expr": "2 * lora_rank"},
}
SPEC = make_spec(algorithm={"name": "random", "seed": 4}, maxTrials=12, parameters=SPACE)


def trial(index, value, lr, rank, dropout, target="all", state=S.SUCCEEDED) -> ObservedTrial:
    parameters = {
        "learning_rate": lr,
        "lora_rank": rank,
        "lora_dropout": dropout,
        "lora_target": target,
        "lora_alpha": 2 * rank,
    }
    return ObservedTrial(
        name=trial_name("coarse", index),
        index=index,
        parameters=parameters,
        state=state,
        value=value,
    )


TRIALS = [
    trial(0, 0.9, 1e-2, 64, 0.0, "q_proj,v_proj"),
    trial(1, 0.3, 1e-4, 16, 0.1),
    trial(2, 0.2, 1e-3, 16, 0.3),
    trial(3, 0.5, 1e-6, 4, 0.2, "q_proj,v_proj"),
    trial(4, None, 1e-3, 32, 0.1, state=S.FAILED),
]


def test_the_top_trials_are_the_best_scored_ones():
    assert [t.index for t in top_trials(SPEC, TRIALS, 2)] == [2, 1]
    maximize = SPEC.model_copy(
        update={"objective": SPEC.objective.model_copy(update={"goal": "maximize"})}
    )
    assert [t.index for t in top_trials(maximize, TRIALS, 2)] == [0, 3]


def test_ranges_shrink_around_the_top_trials():
    # learning_rate: 1e-4..1e-3 is a decade in log space, widened by a quarter of it each side.
    # lora_rank: both at 16; widened by a quarter of a tenth of 4..64 (1.5), then to the step.
    # lora_dropout: 0.1..0.3, widened by 0.05, clipped to the old 0.3.
    assert narrowed_parameters(SPEC, top_trials(SPEC, TRIALS, 2)) == {
        "learning_rate": {"type": "log_uniform", "min": 5.62341e-05, "max": 0.00177828},
        "lora_alpha": {"expr": "2 * lora_rank"},
        "lora_dropout": {"type": "uniform", "min": 0.05, "max": 0.3},
        "lora_rank": {"type": "int", "min": 12, "max": 20, "step": 4},
        "lora_target": {"type": "categorical", "values": ["all"]},
    }


def test_an_int_range_keeps_two_points_and_the_margin_is_a_parameter():
    spec = make_spec(
        algorithm={"name": "random"},
        maxTrials=4,
        parameters={"lora_rank": {"type": "int", "min": 4, "max": 8, "step": 4}},
    )
    best = [
        ObservedTrial(name="t", index=0, parameters={"lora_rank": 8}, state=S.SUCCEEDED, value=1)
    ]
    assert narrowed_parameters(spec, best)["lora_rank"] == {
        "type": "int",
        "min": 4,
        "max": 8,
        "step": 4,
    }
    wide = narrowed_parameters(SPEC, top_trials(SPEC, TRIALS, 2), margin=1.0)
    assert wide["lora_dropout"] == {"type": "uniform", "min": 0.0, "max": 0.3}


def test_the_refined_sweep_is_a_tpe_sweep_warm_started_from_the_earlier_one():
    stored = HyperparameterSweep(
        metadata={"name": "coarse", "namespace": "ml", "uid": "u1", "resourceVersion": "9"},
        spec=SPEC,
    ).model_dump(mode="json", by_alias=True, exclude_none=True)
    stored["status"] = {"phase": "Succeeded"}
    manifest, notes = refined_sweep(stored, SPEC, TRIALS, top=2)
    assert manifest["metadata"] == {"name": "coarse-refined", "namespace": "ml"}
    assert "status" not in manifest
    refined = HyperparameterSweep.model_validate(manifest).spec  # a valid sweep
    assert refined.algorithm.name == "tpe"
    assert refined.algorithm.warm_start.sweeps == ["coarse"]
    assert (refined.algorithm.seed, refined.max_trials) == (4, 12)
    assert refined.trainer == SPEC.trainer
    assert refined.parameters["lora_target"].values == ["all"]
    assert notes == [
        "refined from sweep coarse: around its 2 best of 4 succeeded trials (coarse-0002, "
        "coarse-0001), ranges widened by 0.25 of their spread; TPE starts from its trials "
        "(warmStart)",
        "learning_rate: [1e-06, 0.1] -> [5.62341e-05, 0.00177828]",
        "lora_alpha: derived, unchanged",
        "lora_dropout: [0, 0.3] -> [0.05, 0.3]",
        "lora_rank: [4, 64] -> [12, 20]",
        "lora_target: ['all', 'q_proj,v_proj'] -> ['all']",
    ]
    # A refined sweep refined again learns from both earlier sweeps.
    again, _ = refined_sweep(manifest, refined, TRIALS, name="final", max_trials=5)
    assert again["metadata"]["name"] == "final" and again["spec"]["maxTrials"] == 5
    assert again["spec"]["algorithm"]["warmStart"] == {"sweeps": ["coarse-refined", "coarse"]}


def test_a_sweep_without_a_scored_trial_cannot_be_refined():
    stored = {"apiVersion": "lorasweep.io/v1alpha1", "kind": "HyperparameterSweep"}
    stored |= {"metadata": {"name": "coarse"}, "spec": copy.deepcopy(raw_spec())}
    with pytest.raises(RefineError, match="sweep coarse has no scored trial"):
        refined_sweep(stored, SPEC, [t for t in TRIALS if t.state == S.FAILED])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["refine", "coarse", "--top", "0"], "argument --top: must be 1 or more, got 0"),
        (["refine", "coarse", "--margin", "-1"], "argument --margin: must be 0 or more, got -1"),
    ],
)
def test_refine_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err

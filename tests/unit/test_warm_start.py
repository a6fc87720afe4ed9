"""Warm start: earlier sweeps' finished trials as TPE's first history, through the planner."""

from __future__ import annotations

import statistics

import pytest
from pydantic import ValidationError

from sweep_operator.naming import trial_name
from sweep_operator.render import SweepRef
from sweep_operator.search.tpe import startup_trials, suggest
from sweep_operator.semantic import check_spec
from sweep_operator.space import in_space
from sweep_operator.trial_plan import plan_trials
from sweep_operator.trials import ObservedTrial, TrialState
from sweep_operator.warm_start import Source, warm_start
from tests.unit.sweep_helpers import T0, make_spec, trial_parameters
from tests.unit.test_tpe import loss

S = TrialState
COARSE = {
    "learning_rate": {"type": "log_uniform", "min": 1e-6, "max": 1e-1},
    "lora_rank": {"type": "int", "min": 4, "max": 64, "step": 4},
    "lora_dropout": {"type": "uniform", "min": 0.0, "max": 0.3},
    "lora_target": {"type": "categorical", "values": ["all", "q_proj,v_proj"]},
}
REFINED = {**COARSE, "learning_rate": {"type": "log_uniform", "min": 1e-5, "max": 1e-2}}


def coarse_trials(count: int = 30) -> list[ObservedTrial]:
    """A finished random sweep `coarse` over the wide space; one trial failed, one unscored."""
    spec = make_spec(algorithm={"name": "random", "seed": 9}, maxTrials=count, parameters=COARSE)
    trials = []
    for i in range(count):
        p = trial_parameters(spec, i)
        state = S.FAILED if i == 3 else S.SUCCEEDED
        value = None if i in (3, 4) else loss(p)
        trials.append(
            ObservedTrial(
                name=trial_name("coarse", i), index=i, parameters=p, state=state, value=value
            )
        )
    return trials


def refined_spec(startup: int = 5, **changes):
    return make_spec(
        algorithm={
            "name": "tpe",
            "seed": 1,
            "startupTrials": startup,
            "warmStart": {"sweeps": ["coarse"]},
        },
        maxTrials=10,
        parallelism=3,
        parameters=REFINED,
        **changes,
    )


def warm(spec, trials=None, phase="Succeeded", **source):
    trials = coarse_trials() if trials is None else trials
    return warm_start(spec, [Source("coarse", phase, trials, **source)], ["coarse", "other"])


def test_the_trials_in_the_space_with_the_objective_are_kept():
    spec = refined_spec()
    trials = coarse_trials()
    history = warm(spec, trials)
    outside = [t for t in trials if in_space(spec.parameters, t.parameters) is not None]
    kept = [t.name for t in trials if t not in outside and t.index not in (3, 4)]
    assert outside and [t.name for t in history.trials] == kept
    assert history.summary == (
        f"TPE starts from {len(kept)} of the 29 succeeded trials of coarse ({len(outside)} "
        "outside this sweep's space, 1 without eval_loss left out); 0 random startup trials"
    )
    assert (history.missing, history.waiting) == ("", "")


def test_startup_trials_are_fewer_by_the_warm_start_trials():
    assert startup_trials(refined_spec(startup=10), 4) == 6
    assert startup_trials(refined_spec(startup=10), 25) == 0


def test_a_warm_started_sweep_proposes_from_the_earlier_trials_at_once():
    spec = refined_spec()
    history = warm(spec)
    first = plan_trials(spec, [], T0, sweep_name="fine", warm=history)
    assert [t.name for t in first.create] == ["fine-0000", "fine-0001", "fine-0002"]
    proposed = [t.parameters for t in first.create]
    assert proposed[0] == suggest(spec, [], 0, prior=history.trials)
    assert proposed[0] != trial_parameters(spec, 0)  # not the random draw of a cold start
    assert all(in_space(spec.parameters, p) is None for p in proposed)
    # Informed: better than random draws of the same space, by the known loss.
    random_draws = [loss(trial_parameters(spec, i)) for i in range(30)]
    assert statistics.median(loss(p) for p in proposed) < statistics.median(random_draws)
    # The same history after a restart proposes the same trials.
    assert plan_trials(spec, [], T0, sweep_name="fine", warm=warm(spec)).create == first.create
    # The earlier trials are history only: no counts, no best trial, no trial of this sweep.
    s = first.status
    assert (s.trials.total, s.trials.succeeded, s.best_trial) == (3, 0, None)


def test_with_few_warm_start_trials_the_first_ones_stay_random():
    spec = refined_spec(startup=8)
    few = [t for t in coarse_trials() if in_space(spec.parameters, t.parameters) is None][:3]
    history = warm(spec, few)
    assert len(history.trials) == 3
    created = plan_trials(spec, [], T0, sweep_name="fine", warm=history).create
    assert [t.parameters for t in created] == [trial_parameters(spec, i) for i in range(3)]
    # Trial 5 (= 8 - 3) is TPE's, learning from the warm-start trials and trials 0-4.
    seen = [
        ObservedTrial(
            name=trial_name("fine", i),
            index=i,
            parameters=(p := trial_parameters(spec, i)),
            state=S.SUCCEEDED,
            value=loss(p),
        )
        for i in range(5)
    ]
    later = plan_trials(
        spec.model_copy(update={"parallelism": 1}), seen, T0, sweep_name="fine", warm=history
    )
    assert later.create[0].parameters == suggest(spec, seen, 5, prior=history.trials)
    assert later.status.phase == "Running"


def test_trials_tpe_proposed_before_startup_trials_are_no_space_change():
    spec = refined_spec(startup=10)
    history = warm(spec)
    created = plan_trials(spec, [], T0, sweep_name="fine", warm=history).create
    running = [
        ObservedTrial(name=t.name, index=t.index, parameters=t.parameters, state=S.RUNNING)
        for t in created
    ]
    # The earlier sweep was deleted since: its trials are gone, the sweep goes on.
    gone = warm_start(spec, [Source("coarse", None)], ["other"])
    again = plan_trials(spec, running, T0, sweep_name="fine", warm=gone)
    assert again.status.phase == "Running" and list(again.stop) == []


def test_a_missing_sweep_fails_the_sweep_before_any_trial_for_good():
    spec = refined_spec()
    history = warm_start(spec, [Source("coarse", None)], ["coarse-1", "other"])
    failed = plan_trials(spec, [], T0, sweep_name="fine", warm=history)
    assert failed.create == [] and failed.status.phase == "Failed"
    condition = next(c for c in failed.status.conditions if c.status == "True")
    assert condition.reason == "WarmStartNotFound"
    assert failed.status.message == (
        "spec.algorithm.warmStart.sweeps[0]: there is no HyperparameterSweep coarse in this "
        "namespace; warm start reads the finished trials of an existing sweep; did you mean "
        "coarse-1?"
    )
    # Creating the sweep afterwards does not revive it.
    later = plan_trials(spec, [], T0, sweep_name="fine", warm=warm(spec), previous=failed.status)
    assert later.create == [] and later.status == failed.status


def test_the_sweep_waits_for_the_earlier_sweeps_to_end():
    spec = refined_spec()
    running = plan_trials(spec, [], T0, sweep_name="fine", warm=warm(spec, phase="Running"))
    assert running.create == []
    assert (running.status.phase, running.status.message) == (
        "Pending",
        "warm start waits: sweep coarse has not ended (phase Running) (TPE learns from its "
        "finished trials)",
    )
    assert next(c for c in running.status.conditions if c.type == "Running").status == "False"
    unread = warm(spec, trials=[], unreadable="cannot read its trials' results from MLflow yet")
    assert plan_trials(spec, [], T0, sweep_name="fine", warm=unread).create == []
    assert "sweep coarse: cannot read its trials' results" in unread.waiting


def test_warm_start_needs_tpe_and_earlier_sweeps():
    with pytest.raises(ValidationError, match=r"algorithm\.warmStart needs algorithm tpe"):
        make_spec(algorithm={"name": "random", "warmStart": {"sweeps": ["a"]}}, maxTrials=4)
    with pytest.raises(ValidationError, match="'Coarse' is not a HyperparameterSweep name"):
        make_spec(algorithm={"name": "tpe", "warmStart": {"sweeps": ["Coarse"]}}, maxTrials=4)
    spec = refined_spec()
    problems = check_spec(spec, SweepRef(name="coarse", namespace="ns", uid="u"))
    assert [str(p) for p in problems] == [
        "spec.algorithm.warmStart.sweeps[0]: coarse is this sweep; warm start reads the trials "
        "of earlier sweeps"
    ]

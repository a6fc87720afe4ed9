"""TPE through optuna: seeded, rebuilt from the history, integrated into the planner."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from sweep_operator.naming import trial_name
from sweep_operator.objective import scorer
from sweep_operator.search.bohb import BohbSearch
from sweep_operator.search.tpe import (
    BEST_KEPT,
    HISTORY_LIMIT,
    TpeSearch,
    build_study,
    learnt_from,
    suggest,
)
from sweep_operator.space import in_space
from sweep_operator.trial_plan import plan_trials
from sweep_operator.trials import ObservedTrial, Point, TrialState
from tests.unit.sweep_helpers import make_spec, trial_parameters

S = TrialState
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
SPACE = {
    "learning_rate": {"type": "log_uniform", "min": 1e-5, "max": 1e-2},
    "lora_rank": {"type": "int", "min": 4, "max": 64, "step": 4},
    "lora_dropout": {"type": "uniform", "min": 0.0, "max": 0.3},
    "lora_target": {"type": "categorical", "values": ["all", "q_proj,v_proj"]},
    "lora_alpha": {"expr": "2 * lora_rank"},
}


def tpe_spec(seed: int = 3, **changes):
    return make_spec(
        algorithm={"name": "tpe", "seed": seed, "startupTrials": 5},
        maxTrials=40,
        parameters=SPACE,
        **changes,
    )


def loss(p: dict) -> float:  # best near lr 3e-4, rank 32, dropout 0.1, all
    return (
        (math.log10(p["learning_rate"]) + 3.5) ** 2
        + (p["lora_rank"] - 32) ** 2 / 1000
        + (p["lora_dropout"] - 0.1) ** 2
        + 0.1 * (p["lora_target"] != "all")
    )


def done(index: int, parameters: dict, value: float | None = None, state=S.SUCCEEDED):
    return ObservedTrial(
        name=trial_name("sw", index),
        index=index,
        parameters=parameters,
        state=state,
        value=loss(parameters) if value is None and state == S.SUCCEEDED else value,
    )


def history(spec, n: int) -> list[ObservedTrial]:
    trials: list[ObservedTrial] = []
    for i in range(n):
        p = trial_parameters(spec, i) if i < 5 else suggest(spec, trials, i)
        trials.append(done(i, p))
    return trials


def test_same_seed_and_history_give_the_same_trial_in_any_observation_order():
    spec = tpe_spec()
    trials = history(spec, 12)
    first = suggest(spec, trials, 12)
    shuffled = trials[:]
    random.Random(1).shuffle(shuffled)
    assert suggest(spec, shuffled, 12) == first
    assert suggest(tpe_spec(), trials, 12) == first  # a fresh spec object, as after a restart
    assert suggest(tpe_spec(seed=4), trials, 12) != first
    assert in_space(spec.parameters, first) is None
    assert first["lora_alpha"] == 2 * first["lora_rank"]
    assert first["learning_rate"] == float(f"{first['learning_rate']:.6g}")


def test_running_trials_keep_parallel_asks_apart():
    spec = tpe_spec()
    trials = history(spec, 12)
    alone = suggest(spec, trials, 12)
    running = done(12, alone, state=S.RUNNING)
    # Same index seed, but now the first ask is known to be running.
    assert suggest(spec, [*trials, running], 12) != alone


def test_tpe_beats_its_random_startup_on_a_smooth_objective():
    spec = tpe_spec()
    trials = history(spec, 30)
    startup = min(t.value for t in trials[:5])
    guided = sorted(t.value for t in trials[5:])
    assert guided[0] < startup / 4  # it found much better points than the random ones
    assert guided[2] < startup


def test_history_keeps_complete_pruned_and_running_and_drops_failed():
    spec = tpe_spec(earlyStopping={"algorithm": "median", "minSteps": 1})
    trials = history(spec, 6)
    trials.append(done(6, trial_parameters(spec, 6), state=S.FAILED))
    pruned = ObservedTrial(
        name="sw-0007",
        index=7,
        parameters=trial_parameters(spec, 7),
        state=S.STOPPED,
        curves={"eval_loss": [(10, 3.0), (20, 2.5)]},
    )
    trials += [pruned, done(8, trial_parameters(spec, 8), state=S.RUNNING)]
    study = build_study(spec, trials)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * 6 + ["PRUNED", "RUNNING"]
    assert study.trials[6].intermediate_values == {10: 3.0, 20: 2.5}


def test_plan_creates_random_startup_then_model_guided_trials():
    spec = tpe_spec(parallelism=3)
    first = plan_trials(spec, [], T0, sweep_name="sw")
    assert [t.parameters for t in first.create] == [trial_parameters(spec, i) for i in range(3)]
    trials = history(spec, 8)
    later = plan_trials(spec, trials, T0, sweep_name="sw")
    assert [t.index for t in later.create] == [8, 9, 10]
    asked = [t.parameters for t in later.create]
    assert asked[0] == suggest(spec, trials, 8)
    assert len({str(p) for p in asked}) == 3  # the three parallel asks differ
    # Replanning the same observations gives the same trials (restart safety).
    assert plan_trials(spec, trials, T0, sweep_name="sw").create == later.create
    # Once created, a trial's parameters are read back, never re-sampled.
    seen = [*trials, done(8, asked[0], state=S.RUNNING)]
    assert [t.index for t in plan_trials(spec, seen, T0, sweep_name="sw").create] == [9, 10]


def test_plan_accepts_tpe_trials_in_the_space_and_refuses_others():
    spec = tpe_spec()
    trials = history(spec, 8)
    assert plan_trials(spec, trials, T0, sweep_name="sw").status.phase == "Running"
    moved = [*trials[:7], done(7, {**trials[7].parameters, "lora_rank": 100, "lora_alpha": 200})]
    p = plan_trials(spec, moved, T0, sweep_name="sw")
    assert p.status.phase == "Failed"
    assert "lora_rank=100 is outside [4, 64]" in p.status.message
    wrong = [*trials[:7], done(7, {**trials[7].parameters, "lora_alpha": 1})]
    assert plan_trials(spec, wrong, T0, sweep_name="sw").status.phase == "Failed"


def test_tpe_maximize_and_pareto_studies():
    maximize = tpe_spec(objective={"metric": "accuracy", "goal": "maximize"})
    assert build_study(maximize, []).direction.name == "MAXIMIZE"
    pareto = tpe_spec(
        objective={
            "metric": "eval_loss",
            "metrics": [{"name": "eval_loss"}, {"name": "tokens_per_s", "goal": "maximize"}],
            "mode": "pareto",
        }
    )
    trials = [
        ObservedTrial(
            name=f"t{i}",
            index=i,
            parameters=trial_parameters(pareto, i),
            state=S.SUCCEEDED,
            value=1.0 + i,
            metrics={"tokens_per_s": 100.0 * i},
        )
        for i in range(6)
    ]
    study = build_study(pareto, trials)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert study.trials[2].values == [3.0, 200.0]
    assert in_space(pareto.parameters, suggest(pareto, trials, 6)) is None


def bohb_spec(**changes):
    return make_spec(
        algorithm={"name": "bohb", "seed": 3, "startupTrials": 5},
        maxTrials=40,
        parameters=SPACE,
        earlyStopping={"algorithm": "hyperband", "minSteps": 10, "maxSteps": 90},
        **changes,
    )


def stopped_at(index: int, parameters: dict, *values: float) -> ObservedTrial:
    """A trial Hyperband stopped after logging `values` every 10 steps."""
    curve = [Point(10 * (i + 1), v, float(i)) for i, v in enumerate(values)]
    return done(index, parameters, state=S.STOPPED).model_copy(
        update={"curves": {"eval_loss": curve}}
    )


def test_bohb_learns_at_the_highest_rung_enough_trials_reached():
    spec = bohb_spec()  # 4 searched dimensions: a rung needs 5 trials; rungs 10, 30, 90
    trials = [stopped_at(i, trial_parameters(spec, i), 2.0, 1.5, 1.2) for i in range(4)]
    trials += [stopped_at(4 + i, trial_parameters(spec, 4 + i), 2.0) for i in range(3)]
    assert BohbSearch(spec).budget(trials) == 10  # 7 trials at step 10, only 4 at step 30
    trials.append(stopped_at(7, trial_parameters(spec, 7), 2.0, 1.4, 1.1))
    assert BohbSearch(spec).budget(trials) == 30
    assert TpeSearch(tpe_spec()).budget(trials) is None  # tpe learns from final values only


def test_bohb_is_guided_by_trials_that_never_finished():
    # Stopped trials only, at step 20: the highest rung they reached is 10, and bohb models
    # them as trials that scored their rung-10 value.
    spec = bohb_spec()
    trials = []
    for i in range(30):
        p = trial_parameters(spec, i)
        trials.append(stopped_at(i, p, loss(p) + 1.0, loss(p) + 0.5))
    study = build_study(spec, trials, BohbSearch(spec).budget(trials))
    values = sorted(t.values[0] for t in study.trials)
    assert len(values) == 30 and values[0] == min(loss(t.parameters) for t in trials) + 1.0
    near_best = [BohbSearch(spec).propose(30 + i, trials) for i in range(5)]
    random_draws = [trial_parameters(spec, 30 + i) for i in range(5)]
    assert sum(map(loss, near_best)) < sum(map(loss, random_draws))


def test_bohb_needs_rungs_to_learn_at():
    with pytest.raises(ValidationError, match=r"set earlyStopping\.algorithm to hyperband or asha"):
        make_spec(algorithm={"name": "bohb"}, maxTrials=4, parameters=SPACE)


def test_past_the_history_limit_tpe_learns_from_the_active_the_best_and_the_recent():
    spec = tpe_spec().model_copy(update={"max_trials": 1500})
    rng = random.Random(5)
    trials = [done(i, trial_parameters(spec, i), value=rng.random()) for i in range(1400)]
    trials += [done(i, trial_parameters(spec, i), state=S.RUNNING) for i in range(1400, 1410)]
    best = sorted(trials[:1400], key=lambda t: t.value)[:BEST_KEPT]

    kept = learnt_from(spec, trials, scorer(spec, trials))

    assert len(kept) == HISTORY_LIMIT
    assert [t.index for t in kept] == sorted(t.index for t in kept)
    indices = {t.index for t in kept}
    assert {t.index for t in best} <= indices
    assert set(range(1400, 1410)) <= indices
    recent = HISTORY_LIMIT - len({t.index for t in best} | set(range(1400, 1410)))
    assert set(range(1400 - recent // 2, 1400)) <= indices  # the most recent finished ones
    # The proposal follows from the history alone: shuffled, it gives the same (a restart).
    shuffled = rng.sample(trials, len(trials))
    assert suggest(spec, trials, 1410) == suggest(spec, shuffled, 1410)


def test_up_to_the_history_limit_tpe_learns_from_every_trial():
    spec = tpe_spec()
    trials = history(spec, 30)
    assert learnt_from(spec, trials, scorer(spec, trials)) == sorted(trials, key=lambda t: t.index)

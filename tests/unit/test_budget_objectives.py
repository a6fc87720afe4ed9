"""The time budget, weighted and Pareto objectives, and derived (expr) parameters."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from sweep_operator.api import parse_duration
from sweep_operator.expr import ExprError, check_expressions, derive, evaluate
from sweep_operator.objective import scorer
from sweep_operator.render import SweepRef
from sweep_operator.semantic import check_spec
from sweep_operator.space import grid_size
from sweep_operator.trial_plan import plan_trials
from sweep_operator.trials import ObservedTrial, TrialState
from tests.unit.sweep_helpers import T0, make_spec, observed_trial, trial_parameters

S = TrialState


def trial(spec, index, state, value=None, **kw) -> ObservedTrial:
    return observed_trial(spec, index, state, value, **kw)


@pytest.mark.parametrize(
    ("text", "seconds"), [("6h", 21600), ("90m", 5400), ("1h30m", 5400), ("2.5d", 216000)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["6 hours", "h", "-1h", "0m", "90"])
def test_bad_durations_name_the_field(text):
    with pytest.raises(ValueError, match=f"timeBudget {text!r}"):
        parse_duration(text, "timeBudget")
    with pytest.raises(ValidationError):
        make_spec(timeBudget=text)


def test_before_the_deadline_the_sweep_runs_and_tells_when_to_wake():
    spec = make_spec(timeBudget="2h")
    p = plan_trials(spec, [trial(spec, 0, S.RUNNING)], T0 + timedelta(minutes=119), sweep_name="sw")
    assert p.status.phase == "Running" and [t.index for t in p.create] == [1]
    assert p.deadline == T0 + timedelta(hours=2)


def test_at_the_deadline_running_trials_stop_and_the_best_so_far_wins():
    spec = make_spec(timeBudget="2h", parallelism=3)
    seen = [trial(spec, 0, S.SUCCEEDED, 0.5), trial(spec, 1, S.SUCCEEDED, 0.4)]
    seen += [trial(spec, 2, S.RUNNING), trial(spec, 3, S.PENDING)]
    late = T0 + timedelta(hours=2, minutes=5)
    p = plan_trials(spec, seen, late, sweep_name="sw")
    assert p.create == []
    assert list(p.stop) == ["sw-0002", "sw-0003"]
    assert set(p.stop.values()) == {"timeBudget 2h exhausted"}
    s = p.status
    assert (s.phase, s.best_trial.name, s.trials.pruned) == ("Succeeded", "sw-0001", 2)
    succeeded = next(c for c in s.conditions if c.type == "Succeeded")
    assert (succeeded.status, succeeded.reason) == ("True", "BudgetExhausted")
    assert s.message == (
        "timeBudget 2h exhausted: 2/6 trials succeeded, 2 stopped at the deadline; "
        "best eval_loss=0.4 (sw-0001)"
    )
    assert s.completion_time == T0 + timedelta(hours=2) and p.deadline is None
    # Once the stopped trials are observed as pruned, nothing is created again.
    after = [*seen[:2], trial(spec, 2, S.STOPPED), trial(spec, 3, S.STOPPED)]
    again = plan_trials(spec, after, late + timedelta(minutes=1), sweep_name="sw", previous=s)
    assert again.create == [] and list(again.stop) == [] and again.status.phase == "Succeeded"
    assert again.status.completion_time == s.completion_time


def test_the_budget_counts_from_the_stored_start_time():
    spec = make_spec(timeBudget="1h")
    first = plan_trials(spec, [], T0, sweep_name="sw")
    # The first trial is still pending (no start time), an hour later.
    pending = [trial(spec, 0, S.PENDING).model_copy(update={"start_time": None})]
    p = plan_trials(spec, pending, T0 + timedelta(hours=1), sweep_name="sw", previous=first.status)
    assert p.status.phase == "Failed" and list(p.stop) == ["sw-0000"]
    assert next(c for c in p.status.conditions if c.type == "Failed").reason == "BudgetExhausted"


WEIGHTED = {
    "metric": "eval_loss",
    "goal": "minimize",
    "metrics": [
        {"name": "eval_loss", "weight": 0.5},
        {"name": "tokens_per_s", "goal": "maximize", "weight": 0.5},
    ],
}


def test_weighted_objective_normalises_each_metric_before_weighting():
    # The loss spans 0.4, the accuracy 0.05: on raw values the loss would decide whatever the
    # weights say. Normalised, accuracy's weight of 0.7 makes the most accurate trial best.
    objective = {
        "metric": "eval_loss",
        "goal": "minimize",
        "metrics": [
            {"name": "eval_loss", "weight": 0.3},
            {"name": "accuracy", "goal": "maximize", "weight": 0.7},
        ],
    }
    spec = make_spec(objective=objective, maxTrials=4)
    seen = [
        trial(spec, 0, S.SUCCEEDED, 0.8, metrics={"accuracy": 0.90}),  # 0.3 * 1 + 0.7 * 0
        trial(spec, 1, S.SUCCEEDED, 0.4, metrics={"accuracy": 0.85}),  # 0.3 * 0 + 0.7 * 1
        trial(spec, 2, S.SUCCEEDED, 0.6, metrics={"accuracy": 0.88}),  # 0.15 + 0.7 * 0.4
        trial(spec, 3, S.SUCCEEDED, 0.1),  # no accuracy: unscored
    ]
    s = plan_trials(spec, seen, T0, sweep_name="sw").status
    assert (s.best_trial.name, s.best_trial.value) == ("sw-0000", pytest.approx(0.3))
    assert s.best_trial.metrics == {"eval_loss": 0.8, "accuracy": 0.90}  # the raw values
    assert s.trials.unscored == 1
    assert (
        "best weighted objective=0.3 (sw-0000; weighted objective of eval_loss, accuracy, each "
        "min-max normalised over the 3 scored trials)" in s.message
    )
    # Deterministic from the observed trials: their order does not matter.
    again = plan_trials(spec, list(reversed(seen)), T0, sweep_name="sw").status
    assert again.best_trial == s.best_trial
    scores = scorer(spec, seen)
    assert [scores.value(t) for t in seen] == pytest.approx([0.3, 0.7, 0.43, None])


def test_a_weighted_metric_without_spread_counts_nothing():
    spec = make_spec(objective=WEIGHTED, maxTrials=2)
    one = [trial(spec, 0, S.SUCCEEDED, 0.5, metrics={"tokens_per_s": 100.0})]
    assert plan_trials(spec, one, T0, sweep_name="sw").status.best_trial.value == 0.0


def test_weighted_curves_feed_early_stopping():
    spec = make_spec(
        objective=WEIGHTED,
        maxTrials=4,
        earlyStopping={"algorithm": "median", "minTrials": 2},
    )

    def curves(loss, speed):
        return {"eval_loss": [(10, loss)], "tokens_per_s": [(10, speed)]}

    # Curves are scaled by the final values' ranges: loss [0.5, 0.6], speed [100, 200].
    seen = [
        trial(spec, 0, S.SUCCEEDED, 0.5, metrics={"tokens_per_s": 100}, curves=curves(0.5, 100)),
        trial(spec, 1, S.SUCCEEDED, 0.6, metrics={"tokens_per_s": 200}, curves=curves(0.6, 200)),
        trial(spec, 2, S.RUNNING, curves=curves(0.6, 100)),  # 1.0 > median 0.5: stopped
        trial(spec, 3, S.RUNNING, curves=curves(0.5, 200)),  # 0.0
    ]
    assert list(plan_trials(spec, seen, T0, sweep_name="sw").stop) == ["sw-0002"]


def test_pareto_front_in_status_and_best_by_the_primary_metric():
    spec = make_spec(objective={**WEIGHTED, "mode": "pareto"}, maxTrials=5)
    seen = [
        trial(spec, 0, S.SUCCEEDED, 0.5, metrics={"tokens_per_s": 100.0}),  # front
        trial(spec, 1, S.SUCCEEDED, 0.4, metrics={"tokens_per_s": 50.0}),  # front: lower loss
        trial(spec, 2, S.SUCCEEDED, 0.6, metrics={"tokens_per_s": 90.0}),  # dominated by 0
        trial(spec, 3, S.SUCCEEDED, 0.5, metrics={"tokens_per_s": 100.0}),  # ties with 0
        trial(spec, 4, S.RUNNING),
    ]
    s = plan_trials(spec, seen, T0, sweep_name="sw").status
    assert [t.name for t in s.pareto_front] == ["sw-0000", "sw-0001", "sw-0003"]
    assert s.pareto_front[1].values == {"eval_loss": 0.4, "tokens_per_s": 50.0}
    assert s.best_trial.name == "sw-0001"
    single = make_spec(maxTrials=5)
    assert plan_trials(single, seen, T0, sweep_name="sw").status.pareto_front == []


def test_a_large_pareto_front_keeps_the_status_small():
    """On a line of trade-offs every trial is on the front: status lists the 20 best by the
    primary metric and says how many there are; a dominated trial never counts."""
    spec = make_spec(
        objective={**WEIGHTED, "mode": "pareto"},
        algorithm={"name": "random", "seed": 1},
        parameters={"learning_rate": {"type": "log_uniform", "min": 1e-5, "max": 1e-3}},
        maxTrials=200,
    )
    seen = [
        trial(spec, i, S.SUCCEEDED, 1.0 + i / 100, metrics={"tokens_per_s": 100.0 + i})
        for i in range(150)
    ]
    seen.append(trial(spec, 150, S.SUCCEEDED, 2.0, metrics={"tokens_per_s": 10.0}))
    s = plan_trials(spec, seen, T0, sweep_name="sw").status
    assert s.pareto_front_size == 150
    assert [t.index for t in s.pareto_front] == list(range(20))


def test_objective_metrics_must_list_the_primary_metric_with_its_goal():
    with pytest.raises(ValidationError, match="metrics must include the primary metric eval_loss"):
        make_spec(objective={"metric": "eval_loss", "metrics": [{"name": "accuracy"}]})
    with pytest.raises(ValidationError, match=r"has goal maximize but objective\.goal is minimize"):
        make_spec(
            objective={
                "metric": "eval_loss",
                "metrics": [{"name": "eval_loss", "goal": "maximize"}],
            }
        )


DERIVED = {
    "lora_rank": {"values": [8, 16]},
    "learning_rate": {"values": [1e-4, 2e-4]},
    "lora_alpha": {"expr": "2 * lora_rank"},
    "warmup_ratio": {"expr": "min(0.1, learning_rate * 500) + lora_alpha // 32 / 100"},
}


def test_derived_parameters_follow_the_searched_ones():
    spec = make_spec(parameters=DERIVED, maxTrials=None)
    assert grid_size(spec.parameters) == 4  # derived parameters are no dimension
    assert trial_parameters(spec, 3) == {
        "learning_rate": 2e-4,
        "lora_alpha": 32,
        "lora_rank": 16,
        "warmup_ratio": 0.1 + 0.01,
    }
    assert check_expressions({"b": "a + 1", "c": "b * 2"}, ["a"]) == ["b", "c"]
    assert derive({"c": "b * 2", "b": "a + 1"}, {"a": 1}) == {"a": 1, "b": 2, "c": 4}
    assert evaluate("x", "round(7 / 2) + int(2.9) + float(1) - -1 % 3 ** 2", {}) == 4 + 2 + 1.0 - 8


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("__import__('os').system('true')", "calling __import__('os').system is not allowed"),
        ("lora_rank.__class__", "(Attribute) is not allowed"),
        ("[lora_rank][0]", "is not allowed"),
        ("'a' * 3", "the constant 'a' is not allowed"),
        ("lora_rank if True else 1", "(IfExp) is not allowed"),
        ("(lambda: 1)()", "calling"),
        ("max(lora_rank, key=abs)", "the call max(lora_rank, key=abs) is not allowed"),
        ("lora_rnak * 2", "reads lora_rnak, which is not a parameter (known: learning_rate"),
        ("2 *", "is not a valid expression"),
    ],
)
def test_unsafe_or_wrong_expressions_are_refused_at_parse_time(expr, message):
    parameters = {**DERIVED, "lora_alpha": {"expr": expr}}
    with pytest.raises(ValidationError) as error:
        make_spec(parameters=parameters, maxTrials=None)
    assert "parameters.lora_alpha.expr" in str(error.value)
    assert message in str(error.value)


def test_cycles_and_runaway_powers_are_refused():
    with pytest.raises(ExprError, match="cycle: a -> b -> a"):
        check_expressions({"a": "b + 1", "b": "a + 1"}, ["x"])
    with pytest.raises(ExprError, match="exponent 1000 is larger than 64"):
        evaluate("x", "2 ** 1000", {})
    with pytest.raises(ExprError, match=r"parameters.x.expr '1 / y' failed: division by zero"):
        evaluate("x", "1 / y", {"y": 0})
    with pytest.raises(ValidationError, match="expr cannot be combined with values"):
        make_spec(parameters={"lora_rank": {"values": [8], "expr": "1"}})


def test_derived_parameters_are_checked_against_the_trainer():
    sweep = SweepRef(name="sw", namespace="ns", uid="u")
    good = make_spec(parameters=DERIVED, maxTrials=None)
    assert check_spec(good, sweep) == []
    wrong_type = {**DERIVED, "lora_alpha": {"expr": "lora_rank / 3"}}  # a float, not an int
    [problem] = check_spec(make_spec(parameters=wrong_type, maxTrials=None), sweep)
    assert problem.field == "spec.parameters.lora_alpha.expr"
    assert "is not valid for the trainer's lora_alpha" in problem.message

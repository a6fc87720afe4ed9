"""Median stopping, ASHA and Hyperband on hand-made curves, and how the planner applies them.

Each scenario is one the rules got wrong before (see early_stopping's docstring).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from sweep_operator.api import EarlyStopping
from sweep_operator.early_stopping import (
    Progress,
    asha_decisions,
    bracket_of,
    brackets,
    hyperband_decisions,
    median_decisions,
    rung_steps,
    stop_decisions,
)
from sweep_operator.trial_plan import plan_trials
from sweep_operator.trials import ObservedTrial, Point, TrialState
from tests.unit.sweep_helpers import make_spec, observed_trial

S = TrialState
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def curve(*values: float, every: int = 10, start: float = 0.0) -> list[Point]:
    """Values logged every `every` steps, one time unit apart, from time `start`."""
    return [Point(every * (i + 1), v, start + i) for i, v in enumerate(values)]


def progress(state: TrialState, *values: float, index: int = 0, **kw) -> Progress:
    return Progress(index=index, state=state, curve=curve(*values, **kw))


def flipped(trials: dict[str, Progress]) -> dict[str, Progress]:
    return {
        name: Progress(t.index, t.state, [p._replace(value=-p.value) for p in t.curve])
        for name, t in trials.items()
    }


MEDIAN = dict(min_steps=0, min_trials=3)
COMPLETED = {
    "a": progress(S.SUCCEEDED, 1.0, 0.8, 0.6),
    "b": progress(S.SUCCEEDED, 1.0, 0.9, 0.7),
    "c": progress(S.SUCCEEDED, 1.1, 1.0, 0.9),
}


def test_median_stops_a_trial_worse_than_the_completed_trials_median_at_its_step():
    trials = {
        **COMPLETED,
        "slow": progress(S.RUNNING, 1.2, 1.1, 1.0),  # at step 30: 1.0 > median(0.6, 0.7, 0.9)
        "fine": progress(S.RUNNING, 1.0, 0.8, 0.65),
    }
    stop = median_decisions(trials, minimize=True, **MEDIAN)
    assert stop == {
        "slow": "median stopping at step 30: best value so far 1 is worse than the median 0.7 "
        "of 3 completed trials at that step"
    }


def test_median_spares_a_first_cohort_that_has_no_completed_trial_to_compare_with():
    # Four trials started together differ by eval noise at step 200: no completed trial yet,
    # so no verdict (the old rule compared them with each other and stopped two).
    cohort = {
        f"t{i}": progress(S.RUNNING, 2.0, 1.5 + noise, every=100, index=i)
        for i, noise in enumerate([0.00, 0.01, 0.02, 0.03])
    }
    assert median_decisions(cohort, minimize=True, min_steps=200, min_trials=3) == {}
    # Running and stopped peers are no yardstick either.
    pruned = {f"p{i}": progress(S.STOPPED, 1.0, 1.0, every=100) for i in range(3)}
    assert median_decisions(cohort | pruned, minimize=True, min_steps=200, min_trials=3) == {}


def test_median_waits_for_min_steps_and_min_trials():
    trials = {**COMPLETED, "slow": progress(S.RUNNING, 1.2, 1.1)}  # step 20, worse than all
    assert median_decisions(trials, minimize=True, min_steps=30, min_trials=3) == {}
    assert median_decisions(trials, minimize=True, min_steps=0, min_trials=4) == {}
    assert list(median_decisions(trials, minimize=True, min_steps=20, min_trials=3)) == ["slow"]


def test_median_compares_best_so_far_with_best_so_far():
    # Completed trials whose evals bounced back up: their best up to step 20 counts (0.5),
    # not the 1.2 logged at 20, so a running trial at 1.0 is worse than them.
    bouncy = {f"c{i}": progress(S.SUCCEEDED, 0.5, 1.2, 0.4) for i in range(3)}
    trials = bouncy | {"r": progress(S.RUNNING, 1.1, 1.0)}
    assert "median 0.5 of 3" in median_decisions(trials, minimize=True, **MEDIAN)["r"]


def test_median_only_counts_completed_trials_that_got_as_far():
    short = {f"c{i}": progress(S.SUCCEEDED, 0.1, index=i) for i in range(3)}  # ended at 10
    trials = short | {"r": progress(S.RUNNING, 1.0, 1.0)}
    assert median_decisions(trials, minimize=True, **MEDIAN) == {}


def test_maximize_mirrors_minimize():
    trials = {**COMPLETED, "slow": progress(S.RUNNING, 1.2, 1.1, 1.0)}
    assert median_decisions(flipped(trials), minimize=False, **MEDIAN).keys() == {"slow"}
    assert "so far -1 is" in median_decisions(flipped(trials), minimize=False, **MEDIAN)["slow"]
    at_rung = {f"t{i}": progress(S.RUNNING, 1.0 + i / 10, index=i) for i in range(6)}
    asha = dict(reduction_factor=3, min_trials=1)
    assert (
        asha_decisions(flipped(at_rung), [10], minimize=False, **asha).keys()
        == asha_decisions(at_rung, [10], minimize=True, **asha).keys()
        == {"t2", "t3", "t4", "t5"}
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("algorithm", ["median", "asha", "hyperband"])
def test_a_diverged_trial_is_stopped_at_once_by_any_rule(algorithm, bad):
    settings = EarlyStopping(
        algorithm=algorithm, minSteps=1000, maxSteps=2000 if algorithm == "hyperband" else None
    )
    trials = {"ok": progress(S.RUNNING, 1.0, 0.9), "nan": progress(S.RUNNING, 1.0, bad)}
    assert stop_decisions(settings, trials, minimize=True) == {
        "nan": f"the objective is {bad} at step 20: the trial diverged"
    }


def test_rungs_grow_by_the_reduction_factor_below_a_bound():
    assert rung_steps(10, 3, 100) == [10, 30, 90]
    assert rung_steps(10, 3, 90) == [10, 30]


def test_asha_keeps_the_best_third_of_those_at_the_rung():
    trials = {f"t{i}": progress(S.RUNNING, 1.0 + i / 10, index=i) for i in range(6)}
    stop = asha_decisions(trials, [10], minimize=True, reduction_factor=3, min_trials=1)
    assert sorted(stop) == ["t2", "t3", "t4", "t5"]  # 6 // 3 = 2 go on
    assert stop["t2"] == (
        "ASHA rung at step 10: value 1.2 is not in the best 2 of the 6 trials that reached it "
        "so far (cutoff 1.1)"
    )


def test_asha_ranks_the_value_at_the_rung_not_the_best_so_far():
    # d diverges: its best so far (0.5) would hide that it is at 3.0 when it reaches rung 20.
    trials = {
        "a": progress(S.SUCCEEDED, 1.0, 1.0),
        "b": progress(S.SUCCEEDED, 1.1, 1.1),
        "d": progress(S.RUNNING, 0.5, 3.0),
    }
    stop = asha_decisions(trials, [10, 20], minimize=True, reduction_factor=3, min_trials=2)
    assert "rung at step 20: value 3 " in stop["d"]


def test_asha_never_revisits_a_lower_rung():
    # veteran was the best at rung 10 and at rung 100 and is now at step 800. Trials that
    # started later and beat its rung-10 value do not stop it for its rung-10 rank.
    veteran = Progress(0, S.RUNNING, [Point(10, 1.0, 0), Point(100, 0.6, 1), Point(800, 0.4, 2)])
    later = {f"l{i}": progress(S.RUNNING, 0.5, index=i + 1, start=5) for i in range(8)}
    others = {
        f"o{i}": Progress(9 + i, S.STOPPED, [Point(10, 1.2, 0), Point(100, 0.9, 1)])
        for i in range(2)
    }
    trials = {"veteran": veteran, **later, **others}
    stop = asha_decisions(trials, [10, 100], minimize=True, reduction_factor=3, min_trials=2)
    assert "veteran" not in stop


def test_asha_decides_once_when_a_trial_reaches_the_rung():
    # early reaches rung 10 second best of four: the best 4 // 2 = 2 go on, so it does, and
    # trials arriving later with better values do not take that back.
    first = {
        "x": progress(S.SUCCEEDED, 1.0, index=0, start=0),
        "y": progress(S.SUCCEEDED, 1.5, index=1, start=0),
        "w": progress(S.STOPPED, 1.6, index=2, start=0),
        "early": progress(S.RUNNING, 1.2, index=3, start=1),
    }
    asha = dict(minimize=True, reduction_factor=2, min_trials=2)
    assert asha_decisions(first, [10], **asha) == {}
    later = {f"z{i}": progress(S.RUNNING, 0.1, index=4 + i, start=5) for i in range(6)}
    assert "early" not in asha_decisions(first | later, [10], **asha)
    # A trial arriving after all of them is judged against all of them.
    late = {"late": progress(S.RUNNING, 1.2, index=10, start=6)}
    stop = asha_decisions(first | later | late, [10], **asha)
    assert "best 5 of the 11 trials" in stop["late"]


def test_asha_lets_a_trial_on_until_min_trials_reached_the_rung_before_it():
    trials = {"a": progress(S.SUCCEEDED, 1.0), "b": progress(S.RUNNING, 2.0, start=1)}
    assert asha_decisions(trials, [10], minimize=True, reduction_factor=2, min_trials=2) == {}
    assert list(asha_decisions(trials, [10], minimize=True, reduction_factor=2, min_trials=1)) == [
        "b"
    ]


def test_hyperband_brackets_spend_about_the_same_budget_each():
    plan_ = brackets(min_steps=10, max_steps=810, factor=3)
    assert [rungs for rungs, _ in plan_] == [[10, 30, 90, 270], [30, 90, 270], [90, 270], [270], []]
    assert [share for _, share in plan_] == [81, 34, 15, 8, 5]


def test_hyperband_draws_trials_into_brackets_by_their_share():
    shares = [81, 34, 15, 8, 5]
    counts = Counter(bracket_of(i, shares) for i in range(14300))
    for bracket, share in enumerate(shares):
        assert counts[bracket] / 14300 == pytest.approx(share / 143, abs=0.01)
    assert [bracket_of(i, shares) for i in range(20)] == [bracket_of(i, shares) for i in range(20)]


def test_hyperband_ranks_a_trial_only_within_its_bracket():
    shares = [share for _, share in brackets(10, 90, 3)]  # rungs 10, 30: three brackets
    by_bracket: dict[int, list[int]] = {}
    for index in range(200):
        by_bracket.setdefault(bracket_of(index, shares), []).append(index)
    aggressive, middle, full = (by_bracket[b][:4] for b in range(3))
    trials = {}
    for rank, index in enumerate(aggressive):  # values 1.0 .. 1.3 at step 10
        trials[f"a{rank}"] = progress(S.RUNNING, 1.0 + rank / 10, index=index)
    for rank, index in enumerate(middle):  # much worse, but no rung at step 10
        trials[f"m{rank}"] = progress(S.RUNNING, 5.0 + rank, index=index)
    for rank, index in enumerate(full):  # never stopped, whatever they do
        trials[f"f{rank}"] = progress(S.RUNNING, 9.0, 9.0, 9.0, 9.0, index=index)
    stop = hyperband_decisions(
        trials, minimize=True, min_steps=10, max_steps=90, reduction_factor=3, min_trials=1
    )
    assert sorted(stop) == ["a1", "a2", "a3"]
    assert stop["a1"].startswith("Hyperband bracket 0: ASHA rung at step 10")


def test_early_stopping_settings_are_checked():
    with pytest.raises(ValidationError, match="asha needs minSteps >= 1"):
        EarlyStopping(algorithm="asha")
    with pytest.raises(ValidationError, match="rungs must be increasing positive steps"):
        EarlyStopping(algorithm="asha", rungs=[100, 50])
    with pytest.raises(ValidationError, match="rungs is only used by algorithm asha"):
        EarlyStopping(algorithm="median", rungs=[10])
    with pytest.raises(ValidationError, match="hyperband needs maxSteps"):
        EarlyStopping(algorithm="hyperband", minSteps=10)
    with pytest.raises(ValidationError, match="maxSteps 5 must be at least minSteps 10"):
        EarlyStopping(algorithm="hyperband", minSteps=10, maxSteps=5)
    with pytest.raises(ValidationError, match="maxSteps is only used by algorithm hyperband"):
        EarlyStopping(algorithm="asha", minSteps=10, maxSteps=100)


def trial(spec, index: int, state: TrialState, values=(), value=None) -> ObservedTrial:
    curves = {"eval_loss": curve(*values)} if values else {}
    return observed_trial(spec, index, state, value, curves=curves)


def test_plan_prunes_and_gives_the_slot_to_a_new_trial():
    spec = make_spec(
        algorithm={"name": "random", "seed": 1},
        maxTrials=8,
        parallelism=2,
        parameters={"learning_rate": {"type": "log_uniform", "min": 1e-5, "max": 1e-3}},
        earlyStopping={"algorithm": "median", "minSteps": 20, "minTrials": 2},
    )
    seen = [
        trial(spec, 0, S.SUCCEEDED, (1.0, 0.8, 0.6), value=0.6),
        trial(spec, 1, S.SUCCEEDED, (1.0, 0.9, 0.7), value=0.7),
        trial(spec, 2, S.RUNNING, (1.2, 1.1)),  # best 1.1 vs median(0.8, 0.9) at step 20
        trial(spec, 3, S.RUNNING, (0.9, 0.7)),
    ]
    p = plan_trials(spec, seen, T0, sweep_name="sw")
    assert list(p.stop) == ["sw-0002"]
    assert p.stop["sw-0002"].startswith("median stopping at step 20")
    assert [t.index for t in p.create] == [4]  # the freed slot
    assert (p.status.trials.pruned, p.status.trials.running, p.status.trials.pending) == (1, 1, 1)
    assert "1 pruned" in p.status.message
    # Afterwards the trial is observed as pruned: its index is never created again.
    after = [*seen[:2], trial(spec, 2, S.STOPPED, (1.2, 1.1)), seen[3]]
    again = plan_trials(spec, after, T0, sweep_name="sw")
    assert [t.index for t in again.create] == [4] and list(again.stop) == []
    assert again.status.trials.pruned == 1


def test_a_pruned_only_sweep_ends_without_recreating_pruned_indices():
    spec = make_spec(maxTrials=2, earlyStopping={"algorithm": "median"})
    seen = [trial(spec, 0, S.SUCCEEDED, (0.5,), value=0.5), trial(spec, 1, S.STOPPED, (2.0,))]
    p = plan_trials(spec, seen, T0, sweep_name="sw")
    assert p.create == [] and p.status.phase == "Succeeded"
    assert (p.status.trials.succeeded, p.status.trials.pruned) == (1, 1)


def _signed(value: float, minimize: bool) -> float:
    return math.inf if not math.isfinite(value) else value if minimize else -value


def _median_rule(trials: dict[str, Progress], minimize: bool, min_steps: int, min_trials: int):
    """The median rule as the module docstring states it, trial by trial."""

    def best(curve: list[Point], step: int) -> float | None:
        values = [_signed(p.value, minimize) for p in curve if p.step <= step]
        return min(values) if values else None

    stopped = set()
    for name, trial in trials.items():
        if trial.state != S.RUNNING or not trial.curve or trial.curve[-1].step < min_steps:
            continue
        step = trial.curve[-1].step
        peers = [
            b
            for t in trials.values()
            if t.state == S.SUCCEEDED and t.curve and t.curve[-1].step >= step
            if (b := best(t.curve, step)) is not None
        ]
        mine = best(trial.curve, step)
        if len(peers) >= min_trials and mine is not None and mine > sorted_median(peers):
            stopped.add(name)
    return stopped


def sorted_median(values: list[float]) -> float:
    ordered, middle = sorted(values), len(values) // 2
    return ordered[middle] if len(values) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _asha_rule(trials: dict[str, Progress], rungs: list[int], minimize: bool, factor: int, k: int):
    """ASHA as the module docstring states it: a running trial at its highest rung, against
    the trials that reached the rung no later than it."""
    stopped = set()
    for name, trial in trials.items():
        reached = [r for r in rungs if any(p.step >= r for p in trial.curve)]
        if trial.state != S.RUNNING or not reached:
            continue
        rung = reached[-1]
        mine = next(p for p in trial.curve if p.step >= rung)
        others = [
            point
            for other, t in trials.items()
            if other != name
            if (point := next((p for p in t.curve if p.step >= rung), None)) is not None
            if point.time <= mine.time
        ]
        ranked = sorted(_signed(p.value, minimize) for p in [*others, mine])
        cutoff = ranked[max(1, len(ranked) // factor) - 1]
        if len(others) >= k and _signed(mine.value, minimize) > cutoff:
            stopped.add(name)
    return stopped


@pytest.mark.parametrize("seed", range(5))
def test_the_rules_decide_as_stated_on_random_sweeps(seed):
    """Median stopping and ASHA work out each step's and rung's standing once for all trials
    (per trial it took seconds at 1,000 running and 1,000 finished trials): they stop exactly
    the trials the rules, applied trial by trial, stop; with ties in time and value, NaNs and
    every trial state."""
    rng = random.Random(seed)
    for _ in range(200):
        trials = {}
        for i in range(rng.randint(1, 25)):
            steps = sorted(rng.sample(range(1, 13), rng.randint(0, 6)))
            curve = [
                Point(s, rng.choice([rng.random(), 0.5, math.nan]), float(rng.randint(0, 8)))
                for s in steps
            ]
            state = rng.choice([S.RUNNING, S.RUNNING, S.SUCCEEDED, S.STOPPED, S.FAILED])
            trials[f"t-{i:02d}"] = Progress(i, state, curve)
        minimize = rng.random() < 0.5
        min_steps, min_trials, factor = rng.randint(1, 4), rng.randint(1, 3), rng.randint(2, 4)
        median = median_decisions(
            trials, minimize=minimize, min_steps=min_steps, min_trials=min_trials
        )
        assert set(median) == _median_rule(trials, minimize, min_steps, min_trials)
        rungs = rung_steps(min_steps, factor, 13)
        asha = asha_decisions(
            trials, rungs, minimize=minimize, reduction_factor=factor, min_trials=min_trials
        )
        assert set(asha) == _asha_rule(trials, rungs, minimize, factor, min_trials)

"""Median stopping and ASHA on hand-made curves, and how the planner applies them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from sweep_operator.api import EarlyStopping
from sweep_operator.early_stopping import asha_decisions, median_decisions, rung_steps
from sweep_operator.plan import plan
from sweep_operator.trials import ObservedTrial, TrialState
from tests.unit.sweep_helpers import make_spec, observed_trial

S = TrialState
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def curve(*values: float, every: int = 10) -> list[tuple[int, float]]:
    return [(every * (i + 1), v) for i, v in enumerate(values)]


def flipped(curves: dict) -> dict:
    return {name: [(s, -v) for s, v in c] for name, c in curves.items()}


MEDIAN_CURVES = {
    "a": curve(1.0, 0.8, 0.6),
    "b": curve(1.0, 0.9, 0.7),
    "c": curve(1.1, 1.0, 0.9),
    "slow": curve(1.2, 1.1, 1.0),  # worse than the median of a, b, c at step 30 (0.7)
    "young": curve(1.5),  # only at step 10: its best 1.5 > median(1.0, 1.0, 1.1)
}


def test_median_stops_a_trial_worse_than_the_others_median_at_its_step():
    stop = median_decisions(
        MEDIAN_CURVES, ["slow", "c", "young"], minimize=True, min_steps=0, min_trials=3
    )
    assert sorted(stop) == ["c", "slow", "young"]
    assert stop["slow"] == (
        "median stopping at step 30: best value so far 1 is worse than the median 0.7 of "
        "3 other trials"
    )
    # c's best (0.9) against median(0.6, 0.7, 1.0) = 0.7: stopped too; a is the best so far.
    assert "a" not in median_decisions(
        MEDIAN_CURVES, ["a"], minimize=True, min_steps=0, min_trials=3
    )


def test_median_waits_for_min_steps_and_min_trials():
    running = ["slow", "young"]
    assert sorted(
        median_decisions(MEDIAN_CURVES, running, minimize=True, min_steps=20, min_trials=3)
    ) == ["slow"]
    # At step 30 only four trials besides slow... young never reached it, so three others.
    assert median_decisions(MEDIAN_CURVES, ["slow"], minimize=True, min_steps=0, min_trials=4) == {}


def test_median_uses_the_last_value_before_the_step_when_evals_do_not_align():
    curves = {
        "x": [(25, 0.7)],
        "y": [(20, 0.4), (40, 0.3)],  # its value at step 25 is the one logged at 20
        "z": [(10, 0.9), (30, 0.2)],  # at 25: 0.9, its later 0.2 not yet
    }
    stop = median_decisions(curves, ["x"], minimize=True, min_steps=0, min_trials=2)
    assert "median 0.65 of 2" in stop["x"]  # median(0.4, 0.9)


def test_maximize_mirrors_minimize():
    mirrored = flipped(MEDIAN_CURVES)
    running = ["a", "b", "c", "slow", "young"]
    assert (
        median_decisions(mirrored, running, minimize=False, min_steps=0, min_trials=3).keys()
        == median_decisions(MEDIAN_CURVES, running, minimize=True, min_steps=0, min_trials=3).keys()
    )
    asha = dict(reduction_factor=3, min_steps=10, min_trials=1)
    assert (
        asha_decisions(mirrored, running, minimize=False, **asha).keys()
        == asha_decisions(MEDIAN_CURVES, running, minimize=True, **asha).keys()
    )
    assert "value -1 is not in" not in str(
        asha_decisions(mirrored, running, minimize=False, **asha)
    )


def test_rungs_are_geometric_or_given():
    assert list(rung_steps(None, 10, 3, 100)) == [10, 30, 90]
    assert list(rung_steps([5, 50, 500], 0, 3, 100)) == [5, 50]


def test_asha_keeps_the_best_third_at_each_rung():
    curves = {f"t{i}": curve(1.0 + i / 10) for i in range(6)}  # t0 best ... t5 worst, step 10
    stop = asha_decisions(curves, list(curves), minimize=True, reduction_factor=3, min_steps=10)
    assert sorted(stop) == ["t2", "t3", "t4", "t5"]  # 6 // 3 = 2 go on
    assert (
        stop["t2"]
        == "ASHA rung at step 10: value 1.2 is not in the best 2 of 6 trials (cutoff 1.1)"
    )


def test_asha_judges_the_value_at_the_rung_not_later_progress():
    # At rung 10, b (2.0) is worse than a (1.0) and c (1.5): stopped although it improves.
    curves = {"a": curve(1.0), "b": curve(2.0, 0.1), "c": curve(1.5)}
    stop = asha_decisions(curves, ["b"], minimize=True, reduction_factor=3, min_steps=10)
    assert list(stop) == ["b"]


def test_asha_higher_rungs_compare_only_the_trials_that_reached_them():
    curves = {
        "a": curve(1.0, 0.9, 0.8, every=10),  # reaches rungs 10 and 20 (factor 2)
        "b": curve(1.1, 0.7, every=10),
        "c": curve(1.2, every=10),
        "d": curve(1.3, every=10),
    }
    stop = asha_decisions(curves, ["a", "b"], minimize=True, reduction_factor=2, min_steps=10)
    # Rung 10: a, b are the best 2 of 4. Rung 20: a (0.9) loses to b (0.7), 1 of 2 goes on.
    assert list(stop) == ["a"]
    assert "rung at step 20" in stop["a"]


def test_asha_needs_min_trials_at_the_rung():
    curves = {"a": curve(1.0), "b": curve(2.0)}
    assert (
        asha_decisions(curves, ["b"], minimize=True, reduction_factor=2, min_steps=10, min_trials=2)
        == {}
    )
    assert list(asha_decisions(curves, ["b"], minimize=True, reduction_factor=2, min_steps=10)) == [
        "b"
    ]


def test_early_stopping_settings_are_checked():
    with pytest.raises(ValidationError, match="asha needs minSteps >= 1"):
        EarlyStopping(algorithm="asha")
    with pytest.raises(ValidationError, match="rungs must be increasing positive steps"):
        EarlyStopping(algorithm="asha", rungs=[100, 50])
    with pytest.raises(ValidationError, match="rungs is only used by algorithm asha"):
        EarlyStopping(algorithm="median", rungs=[10])


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
    p = plan(spec, seen, T0, sweep_name="sw")
    assert p.delete == ["sw-0002"]
    assert p.stop_reasons["sw-0002"].startswith("median stopping at step 20")
    assert [t.index for t in p.create] == [4]  # the freed slot
    assert (p.status.trials.pruned, p.status.trials.running, p.status.trials.pending) == (1, 1, 1)
    assert "1 pruned" in p.status.message
    # Afterwards the trial is observed as pruned: its index is never created again.
    after = [*seen[:2], trial(spec, 2, S.PRUNED, (1.2, 1.1)), seen[3]]
    again = plan(spec, after, T0, sweep_name="sw")
    assert [t.index for t in again.create] == [4] and again.delete == []
    assert again.status.trials.pruned == 1


def test_a_pruned_only_sweep_ends_without_recreating_pruned_indices():
    spec = make_spec(maxTrials=2, earlyStopping={"algorithm": "median"})
    seen = [trial(spec, 0, S.SUCCEEDED, (0.5,), value=0.5), trial(spec, 1, S.PRUNED, (2.0,))]
    p = plan(spec, seen, T0, sweep_name="sw")
    assert p.create == [] and p.status.phase == "Succeeded"
    assert (p.status.trials.succeeded, p.status.trials.pruned) == (1, 1)

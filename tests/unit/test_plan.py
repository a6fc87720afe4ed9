"""The planner: keep `parallelism` trials active, stop at the target, derive the status."""

from __future__ import annotations

from datetime import timedelta

from sweep_operator.api import SweepSpec
from sweep_operator.trial_plan import TrialPlan, failed_status, plan_trials
from sweep_operator.trials import FetchState, ObservedFetch, ObservedTrial, TrialState
from tests.unit.sweep_helpers import T0, make_spec, observed_trial, raw_spec, trial_parameters

S = TrialState


def obs(spec: SweepSpec, index: int, state: TrialState, value: float | None = None, **kw):
    return observed_trial(
        spec,
        index,
        state,
        value,
        start_time=kw.pop("start", T0 + timedelta(minutes=index)),
        finish_time=kw.pop(
            "finish", None if state.active else T0 + timedelta(hours=1, minutes=index)
        ),
        **kw,
    )


def run(spec: SweepSpec, observed, now=T0, **kw) -> TrialPlan:
    return plan_trials(spec, observed, now, sweep_name="sw", **kw)


def condition(p: TrialPlan, kind: str):
    return next(c for c in p.status.conditions if c.type == kind)


def test_a_new_sweep_starts_parallelism_trials():
    spec = make_spec()
    p = run(spec, [])
    assert [(t.index, t.name) for t in p.create] == [(0, "sw-0000"), (1, "sw-0001")]
    assert p.create[1].parameters == {"learning_rate": 1e-4, "lora_rank": 16}
    assert list(p.stop) == []
    s = p.status
    assert s.phase == "Pending"
    assert (s.trials.total, s.trials.pending, s.trials.target) == (2, 2, 6)
    assert s.progress == "0/6"
    assert s.start_time == T0 and s.completion_time is None
    assert condition(p, "Running").status == "False"


def test_replanning_the_same_observation_never_duplicates():
    spec = make_spec()
    seen = [obs(spec, 0, S.PENDING), obs(spec, 1, S.RUNNING)]
    p = run(spec, seen)
    assert p.create == []
    assert p.status.phase == "Running"
    assert p.status.trials.running == 1 and p.status.trials.pending == 1


def test_a_finished_trial_frees_a_slot_for_the_next_index():
    spec = make_spec()
    seen = [obs(spec, 0, S.SUCCEEDED, 0.5), obs(spec, 1, S.RUNNING)]
    p = run(spec, seen)
    assert [t.index for t in p.create] == [2]
    assert p.status.best_trial.name == "sw-0000"
    assert p.status.message == (
        "1/6 trials succeeded, 1 running, 1 pending, 0 failed; best eval_loss=0.5 (sw-0000)"
    )


def test_a_missing_index_is_recreated_first():
    spec = make_spec()
    seen = [obs(spec, 0, S.SUCCEEDED, 0.5), obs(spec, 2, S.SUCCEEDED, 0.4)]
    assert [t.index for t in run(spec, seen).create] == [1, 3]


def simulate(spec: SweepSpec, objective, finish_order=None) -> tuple[TrialPlan, int, list[int]]:
    """Drive plan_trials() as the operator would: create what it asks, one trial ends per tick."""
    trials: dict[int, ObservedTrial] = {}
    created: list[int] = []
    peak = 0
    now = T0
    for _ in range(100):
        p = run(spec, list(trials.values()), now)
        for new in p.create:
            created.append(new.index)
            trials[new.index] = ObservedTrial(
                name=new.name, index=new.index, parameters=new.parameters, state=S.RUNNING
            )
        active = [t for t in trials.values() if t.state.active]
        peak = max(peak, len(active))
        if not active:
            return p, peak, created
        done = (finish_order or min)(t.index for t in active)
        trial = trials[done]
        trials[done] = trial.model_copy(
            update={"state": S.SUCCEEDED, "value": objective(trial.parameters), "finish_time": now}
        )
        now += timedelta(minutes=1)
    raise AssertionError("the sweep did not finish")


def test_a_whole_grid_runs_once_each_within_parallelism_and_finds_the_optimum():
    spec = make_spec()

    def loss(params):  # best at rank 16, lr 2e-4
        return abs(params["lora_rank"] - 16) + abs(params["learning_rate"] - 2e-4) * 1000

    final, peak, created = simulate(spec, loss, finish_order=max)
    assert sorted(created) == list(range(6)) and len(created) == 6
    assert peak == 2
    s = final.status
    assert s.phase == "Succeeded"
    assert s.best_trial.parameters == {"learning_rate": 2e-4, "lora_rank": 16}
    assert s.best_trial.value == 0
    assert (s.trials.succeeded, s.trials.total, s.progress) == (6, 6, "6/6")
    assert s.completion_time == T0 + timedelta(minutes=5)  # the last trial's finish
    assert condition(final, "Succeeded").status == "True"
    assert condition(final, "Succeeded").reason == "AllTrialsDone"


def test_max_trials_stops_a_grid_early():
    spec = make_spec(maxTrials=3, parallelism=5)
    p = run(spec, [])
    assert [t.index for t in p.create] == [0, 1, 2]
    done = [obs(spec, i, S.SUCCEEDED, float(i)) for i in range(3)]
    assert run(spec, done).status.phase == "Succeeded"


def test_random_sweep_plans_max_trials():
    spec = make_spec(
        algorithm={"name": "random", "seed": 7},
        maxTrials=3,
        parallelism=10,
        parameters={"learning_rate": {"type": "log_uniform", "min": 1e-5, "max": 1e-3}},
    )
    p = run(spec, [])
    assert [t.index for t in p.create] == [0, 1, 2]
    assert p.create[2].parameters == trial_parameters(spec, 2)


def test_parallelism_changes_take_effect_without_killing_running_trials():
    spec = make_spec(parallelism=2)
    seen = [obs(spec, 0, S.RUNNING), obs(spec, 1, S.RUNNING)]
    wider = run(make_spec(parallelism=4), seen)
    assert [t.index for t in wider.create] == [2, 3]
    narrower = run(make_spec(parallelism=1), seen)
    assert narrower.create == [] and list(narrower.stop) == []


def test_failures_within_the_budget_are_replaced():
    spec = make_spec(maxFailedTrials=1)
    seen = [obs(spec, 0, S.FAILED, message="OOMKilled"), obs(spec, 1, S.RUNNING)]
    p = run(spec, seen)
    assert p.status.phase == "Running"
    assert [t.index for t in p.create] == [2]
    assert p.status.trials.failed == 1


def test_past_the_failure_budget_the_sweep_fails_and_stops_its_trials():
    spec = make_spec(maxFailedTrials=1, parallelism=3)
    seen = [
        obs(spec, 0, S.FAILED, message="OOMKilled"),
        obs(spec, 1, S.FAILED, message="exit code 1"),
        obs(spec, 2, S.RUNNING),
    ]
    p = run(spec, seen)
    assert p.create == []
    assert list(p.stop) == ["sw-0002"]
    s = p.status
    assert s.phase == "Failed"
    assert (s.trials.failed, s.trials.running, s.trials.pruned) == (2, 0, 1)
    failed = condition(p, "Failed")
    assert (failed.status, failed.reason) == ("True", "TooManyFailedTrials")
    assert failed.message == (
        "2 trials failed (sw-0000, sw-0001), more than spec.maxFailedTrials=1; "
        "first failure: OOMKilled"
    )
    assert s.completion_time == T0 + timedelta(hours=1, minutes=1)


def test_without_a_budget_all_failed_trials_fail_the_sweep_at_the_end():
    spec = make_spec(maxTrials=2)
    p = run(spec, [obs(spec, 0, S.FAILED), obs(spec, 1, S.FAILED)])
    assert p.status.phase == "Failed"
    assert condition(p, "Failed").reason == "NoTrialSucceeded"


def test_succeeded_trials_without_the_metric_are_reported():
    spec = make_spec(maxTrials=3)
    seen = [obs(spec, 0, S.SUCCEEDED, 0.7), obs(spec, 1, S.SUCCEEDED), obs(spec, 2, S.RUNNING)]
    s = run(spec, seen).status
    assert (s.trials.succeeded, s.trials.unscored) == (2, 1)
    assert s.message.endswith("; 1 succeeded trials did not report eval_loss: sw-0001")
    assert s.best_trial.name == "sw-0000"
    nothing = run(spec, [obs(spec, i, S.SUCCEEDED) for i in range(3)])
    assert nothing.status.phase == "Failed"
    assert condition(nothing, "Failed").reason == "NoScoredTrial"


def test_best_trial_follows_the_goal_ignores_non_finite_values_and_breaks_ties_by_index():
    # A diverged trial (NaN, or an infinite loss) is never the best, wherever it comes.
    values = [float("nan"), float("inf"), 0.3, 0.3, 0.9, float("-inf")]
    minimize = make_spec(maxTrials=6)
    seen = [obs(minimize, i, S.SUCCEEDED, v, mlflow_run_id=f"run{i}") for i, v in enumerate(values)]
    best = run(minimize, seen).status.best_trial
    assert (best.index, best.value, best.mlflow_run_id) == (2, 0.3, "run2")
    maximize = make_spec(maxTrials=6, objective={"metric": "accuracy", "goal": "maximize"})
    assert run(maximize, seen).status.best_trial.index == 4


def test_a_changed_search_space_fails_the_sweep():
    old = make_spec()
    seen = [obs(old, 0, S.SUCCEEDED, 0.5), obs(old, 1, S.RUNNING)]
    new = make_spec(
        parameters={"lora_rank": {"values": [4, 8]}, "learning_rate": {"values": [1e-4]}}
    )
    p = run(new, seen)
    assert p.status.phase == "Failed" and p.create == [] and list(p.stop) == ["sw-0001"]
    assert condition(p, "Failed").reason == "SearchSpaceChanged"
    assert "spec.parameters or spec.algorithm changed" in p.status.message


def test_status_is_stable_when_nothing_changed():
    spec = make_spec()
    seen = [obs(spec, 0, S.SUCCEEDED, 0.5), obs(spec, 1, S.RUNNING), obs(spec, 2, S.RUNNING)]
    first = run(spec, seen, generation=3)
    later = run(spec, seen, now=T0 + timedelta(minutes=5), generation=3, previous=first.status)
    assert later.status == first.status  # the operator can skip the patch
    assert condition(later, "Running").last_transition_time == T0
    assert later.status.observed_generation == 3


def test_an_ended_sweep_runs_no_trial_again_whose_job_was_deleted():
    """A TTL, a cleanup policy or a user may delete finished trials' Jobs: the sweep stays
    ended, until its spec changes."""
    spec = make_spec(maxTrials=3)
    done = [obs(spec, 0, S.SUCCEEDED, 0.5), obs(spec, 1, S.SUCCEEDED, 0.3)]
    done.append(obs(spec, 2, S.SUCCEEDED, 0.4))
    ended = run(spec, done, generation=2)
    assert ended.status.phase == "Succeeded"
    later = T0 + timedelta(hours=3)
    for left in (done[1:], done[:1], []):  # the best trial's Job deleted too, or every Job
        cleaned = run(spec, left, now=later, generation=2, previous=ended.status)
        assert (cleaned.create, cleaned.status) == ([], ended.status)
    # A changed spec plans again from the Jobs there are.
    changed = run(spec, done[1:], now=later, generation=3, previous=ended.status)
    assert [t.index for t in changed.create] == [0]


def test_a_failed_sweep_stays_failed_for_its_reason():
    """Failed for a reason the next plan would not see again (no configuration fits a later
    trial): it stays failed, and why. A refusal holds only while its cause does."""
    spec = make_spec(maxTrials=3)
    failed = failed_status("NoFeasibleConfiguration", "trial 2: nothing fits", T0, generation=2)
    seen = [obs(spec, 0, S.SUCCEEDED, 0.5), obs(spec, 1, S.SUCCEEDED, 0.3)]
    again = run(spec, seen, now=T0 + timedelta(minutes=1), generation=2, previous=failed)
    assert (again.create, again.status) == ([], failed)
    refused = failed_status("InvalidSpec", "spec.trainer.image: required", T0, generation=2)
    fixed = run(spec, seen, now=T0 + timedelta(minutes=1), generation=2, previous=refused)
    assert [t.index for t in fixed.create] == [2]


def test_an_ended_sweep_with_an_unscored_trial_settles_but_runs_nothing_again():
    """A succeeded trial without its objective (MLflow did not answer yet, or it never logged
    it): the outcome is planned again as results come, but a deleted Job is not run again."""
    spec = make_spec(maxTrials=3)
    done = [obs(spec, 0, S.SUCCEEDED), obs(spec, 1, S.SUCCEEDED, 0.3), obs(spec, 2, S.SUCCEEDED)]
    ended = run(spec, done, generation=2)
    assert ended.status.phase == "Succeeded"
    later = run(spec, done[:2], now=T0 + timedelta(hours=1), generation=2, previous=ended.status)
    assert later.create == [] and later.status.phase == "Succeeded"
    scored = [obs(spec, 0, S.SUCCEEDED, 0.2), *done[1:2]]
    settled = run(spec, scored, now=T0 + timedelta(hours=1), generation=2, previous=ended.status)
    assert settled.status.best_trial.name == "sw-0000"


def test_a_condition_transition_time_moves_when_its_status_changes():
    spec = make_spec(maxTrials=1)
    running = run(spec, [obs(spec, 0, S.RUNNING)])
    done_at = T0 + timedelta(hours=2)
    done = run(spec, [obs(spec, 0, S.SUCCEEDED, 0.1)], now=done_at, previous=running.status)
    assert condition(done, "Succeeded").last_transition_time == done_at
    assert condition(done, "Running").last_transition_time == done_at
    assert condition(done, "Failed").last_transition_time == T0


def test_failed_status_for_an_invalid_sweep():
    s = failed_status("InvalidSpec", "spec.parameters.lora_rnak: unknown", T0, generation=2)
    assert s.phase == "Failed" and s.message == "spec.parameters.lora_rnak: unknown"
    failed = next(c for c in s.conditions if c.type == "Failed")
    assert (failed.status, failed.reason, failed.observed_generation) == ("True", "InvalidSpec", 2)
    again = failed_status(
        "InvalidSpec", s.message, T0 + timedelta(hours=1), previous=s, generation=2
    )
    assert again == s


def cached_spec() -> SweepSpec:
    raw = raw_spec()
    raw["trainer"].update(model="org/model", modelCache={"claimName": "models"})
    return make_spec(**raw)


def test_no_trial_starts_before_the_model_is_on_the_cache_claim():
    spec = cached_spec()
    first = run(spec, [])
    assert first.fetch_model and first.create == []
    assert first.status.phase == "Pending"
    assert condition(first, "Running").status == "False"
    assert first.status.message.startswith("downloading model org/model into")
    assert "(Job sw-model)" in first.status.message
    fetching = run(spec, [], fetch=ObservedFetch(state=FetchState.RUNNING))
    assert not fetching.fetch_model and fetching.create == []
    assert fetching.status.message == first.status.message
    done = run(spec, [], fetch=ObservedFetch(state=FetchState.SUCCEEDED))
    assert not done.fetch_model
    assert [t.name for t in done.create] == ["sw-0000", "sw-0001"]


def test_a_failed_model_download_fails_the_sweep_without_a_trial():
    spec = cached_spec()
    failed = ObservedFetch(
        state=FetchState.FAILED, message="model 'org/model' not found", finish_time=T0
    )
    p = run(spec, [], now=T0 + timedelta(minutes=5), fetch=failed)
    assert p.create == [] and not p.fetch_model
    assert p.status.phase == "Failed"
    assert condition(p, "Failed").reason == "ModelFetchFailed"
    assert p.status.message == (
        "downloading model org/model into spec.trainer.modelCache (Job sw-model) failed: "
        "model 'org/model' not found"
    )
    # Replanning later gives the same status: nothing to patch.
    again = run(spec, [], now=T0 + timedelta(hours=1), fetch=failed, previous=p.status)
    assert again.status == p.status


def test_a_sweep_without_a_model_cache_never_waits_for_a_download():
    p = run(make_spec(), [])
    assert not p.fetch_model and len(p.create) == 2

"""plan(): the whole policy of a reconcile beyond the trials: Events, the report's cadence,
MLflow's work and the status fields it adds, from an Observation and the operator's memory."""

from __future__ import annotations

from datetime import timedelta

from sweep_operator.api import MlflowStatus
from sweep_operator.naming import trial_name
from sweep_operator.observation import Memory, Observation, TrialRun
from sweep_operator.plan import CURVE_POLL_SECONDS, REPORT_INTERVAL_SECONDS, plan
from sweep_operator.trials import FetchState, NewTrial, ObservedFetch, TrialState
from tests.unit.sweep_helpers import T0, make_spec, observed_trial, trial_parameters

S = TrialState
URI = "http://mlflow:5000"
MLFLOW = MlflowStatus(experiment_id="7", parent_run_id="parent", url=f"{URI}/#/experiments/7")


def observation(trials, **fields) -> Observation:
    return Observation(sweep="sw", generation=1, trials=trials, **fields)


def tracked(trials, **fields) -> Observation:
    fields.setdefault("runs", {t.name: TrialRun(run_id=f"run-{t.index}") for t in trials})
    return observation(trials, mlflow=MLFLOW, tracking_uri=URI, **fields)


def all_succeeded(spec):
    return [observed_trial(spec, i, S.SUCCEEDED, 1.0 - i / 10) for i in range(6)]


def test_a_created_trial_the_index_has_not_shown_is_pending_not_created_again():
    spec = make_spec()
    first = plan(spec, observation([]), None, T0)
    assert [t.index for t in first.create] == [0, 1]
    again = plan(spec, observation([], unindexed=first.create), first.status, T0)
    assert again.create == []
    assert again.status.trials.pending == 2


def test_events_say_what_changed_since_the_last_reconcile():
    spec = make_spec()
    running = [observed_trial(spec, 0, S.RUNNING), observed_trial(spec, 1, S.RUNNING)]
    # The first reconcile after a start knows no earlier states: no transitions.
    assert plan(spec, observation(running), None, T0).events == []
    seen = Memory(states={t.name: S.PENDING for t in running})
    events = plan(spec, observation(running, memory=seen), None, T0).events
    assert [(e.reason, e.subject) for e in events] == [
        ("TrialStarted", "sw-0000"),
        ("TrialStarted", "sw-0001"),
    ]
    done = [observed_trial(spec, 0, S.SUCCEEDED, 0.5), running[1]]
    seen = Memory(states={t.name: S.RUNNING for t in running})
    events = plan(spec, observation(done, memory=seen), None, T0).events
    assert [(e.reason, e.subject, e.detail) for e in events] == [
        ("TrialSucceeded", "sw-0000", "eval_loss=0.5"),
        ("NewBestTrial", "sw-0000", "0.5 with learning_rate=0.0001, lora_rank=8"),
    ]


def test_a_trial_kueue_suspends_again_is_requeued_once_it_was_seen():
    spec = make_spec(trainer={**make_spec().trainer.model_dump(by_alias=True), "queueName": "q"})
    queued = [observed_trial(spec, 0, S.QUEUED)]
    new = plan(spec, observation(queued, memory=Memory(states={})), None, T0)
    assert new.events == []
    seen = Memory(states={"sw-0000": S.RUNNING})
    [event] = plan(spec, observation(queued, memory=seen), None, T0).events
    assert event.reason == "TrialRequeued"


def test_the_report_is_due_as_trials_end_at_most_every_interval_and_at_the_end():
    spec = make_spec()
    trials = [observed_trial(spec, 0, S.SUCCEEDED, 0.5), observed_trial(spec, 1, S.RUNNING)]
    assert plan(spec, observation(trials), None, T0).report == (1, "Running")
    recent = Memory(reported=(0, "Running"), report_age=REPORT_INTERVAL_SECONDS / 2)
    assert plan(spec, observation(trials, memory=recent), None, T0).report is None
    same = Memory(reported=(1, "Running"), report_age=REPORT_INTERVAL_SECONDS * 2)
    assert plan(spec, observation(trials, memory=same), None, T0).report is None
    ended = all_succeeded(spec)
    assert plan(spec, observation(ended, memory=recent), None, T0).report == (6, "Succeeded")


def test_an_ended_sweep_whose_jobs_were_deleted_keeps_its_report_and_status():
    spec = make_spec()
    ended = plan(spec, observation(all_succeeded(spec)), None, T0)
    assert ended.report == (6, "Succeeded")
    restarted = Memory()  # a restarted operator: it has published nothing yet
    cleaned = observation(all_succeeded(spec)[1:], memory=restarted)
    later = plan(spec, cleaned, ended.status, T0 + timedelta(hours=1))
    assert (later.report, later.status, later.create) == (None, ended.status, [])


def test_mlflow_work_follows_the_sweep():
    spec = make_spec()
    trials = [
        observed_trial(spec, 0, S.STOPPED, message="median stopping at step 20"),
        observed_trial(spec, 1, S.STOPPED, message="timeBudget 2h exhausted"),
        observed_trial(spec, 2, S.RUNNING),
    ]
    result = plan(spec, tracked(trials, memory=Memory(tagged=frozenset({"sw-0000"}))), None, T0)
    assert result.tag_stopped == {"sw-0001": "timeBudget 2h exhausted"}
    assert not result.close_parent_run
    assert result.status.mlflow == MLFLOW
    ended = plan(spec, tracked(all_succeeded(spec)), None, T0)
    assert ended.status.phase == "Succeeded" and ended.close_parent_run
    closed = Memory(parent_closed=True)
    assert not plan(spec, tracked(all_succeeded(spec), memory=closed), None, T0).close_parent_run
    # Untracked sweeps ask nothing of MLflow.
    untracked = plan(spec, observation(all_succeeded(spec)), None, T0)
    assert not untracked.close_parent_run and untracked.tag_stopped == {}


def test_the_best_trial_links_to_its_run_and_adapter():
    spec = make_spec()
    trials = all_succeeded(spec)
    trials = [t.model_copy(update={"mlflow_run_id": f"run-{t.index}"}) for t in trials]
    runs = {t.name: TrialRun(run_id=f"run-{t.index}", adapter="adapter") for t in trials}
    best = plan(spec, tracked(trials, runs=runs), None, T0).status.best_trial
    assert best is not None and best.name == "sw-0005"
    assert best.url == f"{URI}/#/experiments/7/runs/run-5"
    assert best.adapter_uri == "runs:/run-5/adapter"


def test_a_sweep_with_a_registered_model_succeeds_once_its_best_adapter_is_registered():
    spec = make_spec(mlflow={"registeredModel": "lora-best"})
    trials = all_succeeded(spec)
    runs = {t.name: TrialRun(run_id=f"run-{t.index}", adapter="adapter") for t in trials}
    registering = plan(spec, tracked(trials, runs=runs), None, T0)
    assert registering.register_adapter == "sw-0005"
    assert registering.status.phase == "Running" and not registering.close_parent_run
    assert "registering the adapter of sw-0005 as a version of lora-best" in (
        registering.status.message
    )
    done = Memory(registered={"sw-0005": "models:/lora-best/3"})
    later = T0 + timedelta(seconds=2)
    result = plan(spec, tracked(trials, runs=runs, memory=done), registering.status, later)
    assert result.register_adapter is None and result.close_parent_run
    assert result.status.phase == "Succeeded"
    assert result.status.best_trial.adapter_uri == "models:/lora-best/3"
    # After a restart the stored status says it is registered: not registered twice.
    restarted = plan(spec, tracked(trials, runs=runs), result.status, later)
    assert restarted.register_adapter is None
    assert restarted.status == result.status


def test_the_model_download_ending_is_an_event():
    spec = make_spec(
        trainer={
            **make_spec().trainer.model_dump(by_alias=True, exclude_none=True),
            "model": "org/model",
            "modelCache": {"claimName": "models"},
        }
    )
    fetched = ObservedFetch(state=FetchState.SUCCEEDED)
    seen = Memory(states={}, fetch_state=FetchState.RUNNING)
    [event] = plan(spec, observation([], fetch=fetched, memory=seen), None, T0).events
    assert (event.reason, event.subject) == ("ModelFetched", "sw-model")


def test_unindexed_trials_keep_their_parameters():
    spec = make_spec()
    created = [NewTrial(index=0, name=trial_name("sw", 0), parameters=trial_parameters(spec, 0))]
    result = plan(spec, observation([], unindexed=created), None, T0)
    assert [t.index for t in result.create] == [1]


def test_running_trials_under_early_stopping_are_looked_at_again_soon():
    """Curves reach MLflow without a cluster event: the operator must not wait for its resync
    to judge a trial at a rung."""
    stopping = make_spec(earlyStopping={"algorithm": "median", "minSteps": 3})
    running = [observed_trial(stopping, 0, S.RUNNING), observed_trial(stopping, 1, S.PENDING)]
    assert plan(stopping, observation(running), None, T0).recheck_after == CURVE_POLL_SECONDS
    pending = [observed_trial(stopping, 0, S.PENDING)]
    assert plan(stopping, observation(pending), None, T0).recheck_after is None
    assert plan(make_spec(), observation(running), None, T0).recheck_after is None

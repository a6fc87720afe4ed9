"""Sweeps through a Kueue queue: the trial Jobs handed to Kueue, and queued trials told apart
from pending and stopped ones."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sweep_operator.defaults import ENV_QUEUE_NAME, TrialDefaults
from sweep_operator.observe import job_summary, observe_trial
from sweep_operator.render import SweepRef, render_trial_job
from sweep_operator.trial_plan import plan_trials
from sweep_operator.trials import NewTrial, TrialState
from tests.unit.sweep_helpers import T0, make_spec, observed_trial, raw_spec

SWEEP = SweepRef(name="sw", namespace="team-a", uid="uid-1")
TRIAL = NewTrial(index=0, name="sw-0000", parameters={"learning_rate": 1e-4, "lora_rank": 8})


def queued_spec(**trainer):
    raw = raw_spec()
    raw["trainer"].update(trainer)
    return make_spec(**raw)


def test_a_queued_trial_job_is_labelled_for_kueue_and_created_suspended():
    spec = queued_spec(queueName="team-a", workloadPriorityClass="high")
    job = render_trial_job(SWEEP, spec, TRIAL)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert job["spec"]["suspend"] is True
    # Kueue reads the Job's labels; the pods keep only the operator's.
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]


def test_without_a_queue_nothing_changes():
    for spec in (queued_spec(), queued_spec(queueName="")):
        job = render_trial_job(SWEEP, spec, TRIAL)
        assert not any(k.startswith("kueue.x-k8s.io/") for k in job["metadata"]["labels"])
        assert "suspend" not in job["spec"]


@pytest.mark.parametrize(
    ("trainer", "problem"),
    [
        ({"queueName": "Team_A"}, "queueName 'Team_A' is not a LocalQueue name"),
        ({"queueName": "q", "workloadPriorityClass": "-x"}, "not a WorkloadPriorityClass name"),
        ({"workloadPriorityClass": "high"}, "workloadPriorityClass needs spec.trainer.queueName"),
    ],
)
def test_bad_queue_settings_name_the_field(trainer: dict, problem: str):
    with pytest.raises(ValidationError, match=problem):
        queued_spec(**trainer)


def test_the_operator_default_queue_applies_unless_the_sweep_opts_out():
    defaults = TrialDefaults.from_env({ENV_QUEUE_NAME: "shared"})
    assert defaults.apply(raw_spec())["trainer"]["queueName"] == "shared"
    opted_out = raw_spec()
    opted_out["trainer"]["queueName"] = ""
    assert defaults.apply(opted_out)["trainer"]["queueName"] == ""


def job(suspend: bool, stopped: str | None = None) -> dict:
    annotations = {"lorasweep.io/trial-index": "0", "lorasweep.io/parameters": "{}"}
    if stopped:
        annotations["lorasweep.io/stopped"] = stopped
    return {
        "metadata": {
            "name": "sw-0000",
            "uid": "u0",
            "labels": {"kueue.x-k8s.io/queue-name": "team-a"},
            "annotations": annotations,
        },
        "spec": {"suspend": suspend},
        "status": {},
    }


def test_a_job_kueue_suspends_is_queued_and_one_the_operator_stopped_is_pruned():
    queued = observe_trial(job_summary(job(suspend=True)), [], "eval_loss")
    assert queued.state == TrialState.QUEUED and queued.state.active
    # Stopped while Kueue still ran it (Kueue suspends it later): pruned at once.
    stopped = observe_trial(job_summary(job(suspend=False, stopped="asha")), [], "eval_loss")
    assert stopped.state == TrialState.STOPPED and stopped.message == "asha"
    admitted = observe_trial(job_summary(job(suspend=False)), [], "eval_loss")
    assert admitted.state == TrialState.PENDING


def test_queued_trials_are_counted_apart_and_hold_a_parallelism_slot():
    spec = queued_spec(queueName="team-a")
    trials = [
        observed_trial(spec, 0, TrialState.RUNNING),
        observed_trial(spec, 1, TrialState.QUEUED),
    ]
    result = plan_trials(spec, trials, T0, sweep_name="sw")
    assert result.create == []  # parallelism 2: both slots taken
    counts = result.status.trials
    assert (counts.queued, counts.pending, counts.running) == (1, 0, 1)
    assert result.status.phase == "Running"
    assert "1 running, 1 queued, 0 pending" in result.status.message


def test_new_trials_of_a_queued_sweep_count_as_queued_and_it_waits_until_one_runs():
    spec = queued_spec(queueName="team-a")
    result = plan_trials(spec, [], T0, sweep_name="sw")
    assert len(result.create) == 2
    assert (result.status.trials.queued, result.status.trials.pending) == (2, 0)
    waiting = [observed_trial(spec, i, TrialState.QUEUED) for i in range(2)]
    assert plan_trials(spec, waiting, T0, sweep_name="sw").status.phase == "Pending"


def test_a_preempted_trial_is_neither_failed_nor_pruned():
    spec = queued_spec(queueName="team-a")
    trials = [observed_trial(spec, i, TrialState.SUCCEEDED, 0.5) for i in range(5)]
    trials.append(observed_trial(spec, 5, TrialState.QUEUED))
    status = plan_trials(spec, trials, T0, sweep_name="sw").status
    assert status.phase == "Running"
    assert (status.trials.failed, status.trials.pruned, status.trials.queued) == (0, 0, 1)

"""The Events a reconcile posts on the sweep: one per trial, a summary for a burst."""

from __future__ import annotations

from sweep_operator.kube_writes import EVENT_BURST, posted
from sweep_operator.plan import SweepEvent


def test_each_trial_gets_an_event_naming_it():
    [event] = posted([SweepEvent("TrialSucceeded", "sw-0003", "eval_loss=0.5")])
    assert (event.reason, event.detail, event.type) == (
        "TrialSucceeded",
        "sw-0003: eval_loss=0.5",
        "Normal",
    )


def test_a_burst_is_one_event_that_keeps_a_reason_they_share():
    quota = "exceeded quota: jobs, requested: count/jobs.batch=1"
    refused = [
        SweepEvent("TrialCreateFailed", f"sw-{i:04d}", quota, "Warning")
        for i in range(EVENT_BURST + 1)
    ]
    [event] = posted(refused)
    assert event.type == "Warning"
    assert event.detail == f"6 trials: sw-0000, sw-0001, sw-0002, ..., sw-0005: {quota}"  # 5 + 1
    created = [SweepEvent("TrialCreated", f"sw-{i:04d}", f"lora_rank={i}") for i in range(7)]
    [event] = posted(created)
    assert event.detail == "7 trials: sw-0000, sw-0001, sw-0002, ..., sw-0006"

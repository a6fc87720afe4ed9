"""The Events a reconcile posts on the sweep: one per trial, a summary for a burst."""

from __future__ import annotations

from sweep_operator.kube_writes import EVENT_BURST, EVENT_INTERVAL, EventOutbox, posted
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


def test_events_that_come_sooner_than_the_interval_are_posted_together_once_it_passed():
    outbox = EventOutbox()
    created = SweepEvent("TrialCreated", "sw-0000", "lora_rank=2")
    assert outbox.add([created], now=100.0) == [created]  # a quiet sweep's Event goes at once
    assert outbox.due is None
    started = SweepEvent("TrialStarted", "sw-0000", "running")
    ended = SweepEvent("TrialSucceeded", "sw-0000", "eval_loss=0.5")
    assert outbox.add([started], now=100.2) == []
    assert outbox.due == 100.0 + EVENT_INTERVAL  # the sweep's daemon wakes for them
    assert outbox.add([], now=100.5) == []
    assert outbox.add([ended], now=100.0 + EVENT_INTERVAL) == [started, ended]
    assert outbox.due is None


def test_the_events_of_a_sweeps_end_are_posted_with_it():
    outbox = EventOutbox()
    outbox.add([SweepEvent("TrialStarted", "sw-0000", "running")], now=100.0)
    ended = SweepEvent("TrialSucceeded", "sw-0000", "eval_loss=0.5")
    assert outbox.add([ended], now=100.1, last=True) == [ended]

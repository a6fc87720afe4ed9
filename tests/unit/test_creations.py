"""Trial creations the reconcile starts and does not wait for: what becomes of each trial once
the apiserver answers, and of the trials it did not answer yet."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sweep_operator.kube_writes import Answer, Creations, SweepWriter
from sweep_operator.reconciler import Reconciler
from sweep_operator.render import RenderError, SweepRef
from sweep_operator.trials import NewTrial
from tests.unit.sweep_helpers import BASE_SPEC, make_spec


def trial(index: int) -> NewTrial:
    return NewTrial(index=index, name=f"sw-{index:04d}", parameters={"lora_rank": 2 + index})


def answered(answer: Answer | str | Exception) -> Future[Answer | str]:
    future: Future[Answer | str] = Future()
    if isinstance(answer, Exception):
        future.set_exception(answer)
    else:
        future.set_result(answer)
    return future


def creating(reconciler: Reconciler, index: int, future: Future[Answer | str]) -> None:
    """As the reconcile that plans trial `index` does."""
    reconciler.creations.start(trial(index), future)
    reconciler.created[trial(index).name] = trial(index)


def reconciler_creating(answers: dict[int, Answer | str | Exception]) -> Reconciler:
    """A reconciler that started creating these trials, answered."""
    reconciler = Reconciler(client.ApiClient(), logging.getLogger("test"))
    for index, answer in answers.items():
        creating(reconciler, index, answered(answer))
    return reconciler


def collect(reconciler: Reconciler, taken_elsewhere: frozenset[str] = frozenset()) -> list:
    """The next reconcile's look at the answers: its Events, as (reason, trial)."""
    events = reconciler._answered(reconciler.creations.collect(), set(taken_elsewhere))
    return [(e.reason, e.subject) for e in events]


def test_a_trial_stays_created_until_the_apiserver_answers_and_after_it_created_it():
    reconciler = reconciler_creating({0: Answer.CREATED, 1: Answer.OURS})
    in_flight: Future[Answer | str] = Future()
    creating(reconciler, 2, in_flight)
    # sw-0001's Job is this sweep's, created before and not indexed yet: it is not created anew.
    assert collect(reconciler) == [("TrialCreated", "sw-0000")]
    assert set(reconciler.created) == {"sw-0000", "sw-0001", "sw-0002"}  # none planned again
    in_flight.set_result(Answer.CREATED)  # answered after that reconcile: the next one says so
    assert collect(reconciler) == [("TrialCreated", "sw-0002")]


def test_a_trial_refused_or_not_answered_is_planned_again_and_its_refusal_said_once():
    quota = "exceeded quota: jobs"
    reconciler = reconciler_creating(
        {0: quota, 1: ApiException(status=503), 2: Answer.CREATED, 3: KeyError("a bug")}
    )
    events = reconciler._answered(reconciler.creations.collect(), taken_elsewhere=set())
    assert set(reconciler.created) == {"sw-0002"}
    assert ("TrialCreateFailed", "sw-0000", f"its Job was refused: {quota}") in [
        (e.reason, e.subject, e.detail) for e in events
    ]
    creating(reconciler, 0, answered(quota))  # the next reconcile tries again
    assert collect(reconciler) == []


def test_a_name_another_owners_job_holds_is_planned_again_and_said_once():
    reconciler = reconciler_creating({0: Answer.TAKEN})
    assert collect(reconciler, frozenset({"sw-0000"})) == [("TrialNameTaken", "sw-0000")]
    assert reconciler.created == {}
    creating(reconciler, 0, answered(Answer.TAKEN))
    assert collect(reconciler, frozenset({"sw-0000"})) == []


def test_a_trial_job_the_template_does_not_render_fails_the_reconcile_before_its_request():
    """Raised in the reconcile (which refuses the sweep), not left in a creation's answer."""
    spec = make_spec(trainer={**BASE_SPEC["trainer"], "jobTemplate": "{{ params.no_such }}"})
    creations = Creations()
    writer = SweepWriter(client.ApiClient())
    sweep = SweepRef(name="sw", namespace="ns", uid="uid-1")
    with pytest.raises(RenderError, match="no_such"):
        writer.create_trials(sweep, spec, [trial(0)], None, None, creations)
    assert "sw-0000" not in creations


def test_a_trial_stopped_before_its_creation_started_is_not_created_the_others_are_awaited():
    creations = Creations()
    queued: Future[Answer | str] = Future()  # behind other requests
    sent: Future[Answer | str] = Future()
    sent.set_running_or_notify_cancel()  # its request is on its way
    creations.start(trial(0), queued)
    creations.start(trial(1), sent)
    withdrawn: list[set[str]] = []
    stopping = threading.Thread(
        target=lambda: withdrawn.append(creations.withdraw(["sw-0000", "sw-0001"]))
    )
    stopping.start()
    stopping.join(0.2)
    assert stopping.is_alive() and queued.cancelled()  # waits for sw-0001's answer
    sent.set_result(Answer.CREATED)
    stopping.join(5)
    assert withdrawn == [{"sw-0000"}]
    assert [t.name for t in creations.collect().created] == ["sw-0001"]


def test_creations_not_started_are_dropped_when_the_sweep_goes():
    creations = Creations()
    queued: Future[Answer | str] = Future()
    sent: Future[Answer | str] = Future()
    sent.set_running_or_notify_cancel()  # its request cannot be recalled
    creations.start(trial(0), queued)
    creations.start(trial(1), sent)
    creations.cancel()
    assert queued.cancelled() and not sent.cancelled()

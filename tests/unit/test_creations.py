"""Trial creations the reconcile starts and does not wait for: what becomes of each trial once
the apiserver answers, and of the trials it did not answer yet."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sweep_operator.kube_writes import Creations
from sweep_operator.reconciler import Reconciler
from sweep_operator.render import RenderError
from sweep_operator.trials import NewTrial


def trial(index: int) -> NewTrial:
    return NewTrial(index=index, name=f"sw-{index:04d}", parameters={"lora_rank": 2 + index})


def answered(answer: bool | str | Exception) -> Future[bool | str]:
    future: Future[bool | str] = Future()
    if isinstance(answer, Exception):
        future.set_exception(answer)
    else:
        future.set_result(answer)
    return future


def reconciler_creating(answers: dict[int, bool | str | Exception]) -> Reconciler:
    """A reconciler that started creating these trials, answered."""
    reconciler = Reconciler(client.ApiClient(), logging.getLogger("test"), wake=lambda: None)
    for index, answer in answers.items():
        reconciler.creations.start(trial(index), answered(answer))
        reconciler.created[trial(index).name] = trial(index)
    return reconciler


def test_a_trial_stays_created_until_the_apiserver_answers_and_after_it_created_it():
    reconciler = reconciler_creating({0: True})
    creating: Future[bool | str] = Future()
    reconciler.creations.start(trial(1), creating)
    reconciler.created["sw-0001"] = trial(1)
    events = reconciler._answered(reconciler.creations.collect(), taken_elsewhere=set())
    assert set(reconciler.created) == {"sw-0000", "sw-0001"}  # neither is planned again
    assert [(e.reason, e.subject) for e in events] == [("TrialCreated", "sw-0000")]
    creating.set_result(True)  # answered after that reconcile: the next one says so
    events = reconciler._answered(reconciler.creations.collect(), taken_elsewhere=set())
    assert [(e.reason, e.subject) for e in events] == [("TrialCreated", "sw-0001")]


def test_a_trial_refused_or_not_answered_is_planned_again_and_its_refusal_said_once():
    quota = "exceeded quota: jobs"
    reconciler = reconciler_creating({0: quota, 1: ApiException(status=503), 2: True})
    events = reconciler._answered(reconciler.creations.collect(), taken_elsewhere=set())
    assert set(reconciler.created) == {"sw-0002"}
    assert ("TrialCreateFailed", "sw-0000", f"its Job was refused: {quota}") in [
        (e.reason, e.subject, e.detail) for e in events
    ]
    reconciler.creations.start(trial(0), answered(quota))  # the next reconcile tries again
    again = reconciler._answered(reconciler.creations.collect(), taken_elsewhere=set())
    assert again == []


def test_a_name_another_owners_job_holds_is_planned_again_and_said_once():
    reconciler = reconciler_creating({0: False, 1: False})
    events = reconciler._answered(reconciler.creations.collect(), taken_elsewhere={"sw-0000"})
    # sw-0001's Job is this sweep's, not indexed yet: the index shows it soon.
    assert reconciler.created == {}
    assert [(e.reason, e.subject) for e in events] == [("TrialNameTaken", "sw-0000")]
    reconciler.creations.start(trial(0), answered(False))
    assert reconciler._answered(reconciler.creations.collect(), {"sw-0000"}) == []


def test_a_trial_whose_job_does_not_render_is_planned_again_and_its_error_kept():
    reconciler = reconciler_creating({0: RenderError("spec.jobTemplate", "no such variable")})
    creation = reconciler.creations.collect()
    assert reconciler._answered(creation, taken_elsewhere=set()) == []
    assert reconciler.created == {}
    assert "spec.jobTemplate" in str(creation.unrendered["sw-0000"])


def test_a_stop_waits_for_the_trials_creation_and_each_answer_wakes_the_sweep():
    woken = threading.Event()
    creations = Creations(on_answer=woken.set)
    creating: Future[bool | str] = Future()
    creations.start(trial(0), creating)
    waited = threading.Thread(target=creations.wait, args=(["sw-0000"],))
    waited.start()
    waited.join(0.2)
    assert waited.is_alive() and not woken.is_set()
    creating.set_result(True)
    waited.join(5)
    assert not waited.is_alive() and woken.is_set()


def test_creations_not_started_are_dropped_when_the_sweep_goes():
    creations = Creations(on_answer=lambda: None)
    waiting: Future[bool | str] = Future()  # still queued behind other requests
    running: Future[bool | str] = Future()
    running.set_running_or_notify_cancel()  # its request is on its way: it cannot be recalled
    creations.start(trial(0), waiting)
    creations.start(trial(1), running)
    creations.cancel()
    assert waiting.cancelled() and not running.cancelled()

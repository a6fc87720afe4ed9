"""Which trial events are planned on at once: those that may free a trial's GPUs."""

from __future__ import annotations

from sweep_operator.observe import ends_a_trial


def job(*conditions: tuple[str, str]) -> dict:
    return {
        "kind": "Job",
        "status": {"conditions": [{"type": t, "status": s} for t, s in conditions]},
    }


def pod(phase: str) -> dict:
    return {"kind": "Pod", "status": {"phase": phase}}


def test_a_job_that_completes_fails_or_is_being_deleted_ends_a_trial():
    assert ends_a_trial("MODIFIED", job(("Complete", "True")))
    assert ends_a_trial("MODIFIED", job(("Failed", "True")))
    assert ends_a_trial(None, job(("Complete", "True")))  # in the operator's first listing
    deleting = {"kind": "Job", "metadata": {"deletionTimestamp": "2026-12-05T00:00:00Z"}}
    assert ends_a_trial("MODIFIED", deleting)  # foreground deletion: the trial is stopped


def test_a_job_still_running_or_suspended_does_not():
    assert not ends_a_trial("ADDED", {"kind": "Job", "metadata": {}})
    assert not ends_a_trial("MODIFIED", job(("Suspended", "True")))
    assert not ends_a_trial("MODIFIED", job(("Complete", "False")))


def test_a_pod_that_succeeds_or_fails_ends_a_trial_one_that_runs_does_not():
    assert ends_a_trial("MODIFIED", pod("Succeeded"))
    assert ends_a_trial("MODIFIED", pod("Failed"))
    assert not ends_a_trial("MODIFIED", pod("Running"))
    assert not ends_a_trial("ADDED", pod("Pending"))
    being_deleted = {**pod("Running"), "metadata": {"deletionTimestamp": "2026-12-05T00:00:00Z"}}
    assert not ends_a_trial("MODIFIED", being_deleted)  # its Job makes another


def test_a_deleted_job_or_pod_ends_a_trial():
    assert ends_a_trial("DELETED", job())
    assert ends_a_trial("DELETED", pod("Running"))

"""The model download as the planner sees it, from its Job and its pods."""

from __future__ import annotations

from datetime import UTC, datetime

from sweep_operator.observe import fetch_job_summary, fetch_pod_summary, observe_fetch
from sweep_operator.trials import FetchState


def job(*conditions: dict) -> dict:
    return {"metadata": {"name": "sw-model"}, "status": {"conditions": list(conditions)}}


def pod(phase: str, message: str = "") -> dict:
    terminated = {"state": {"terminated": {"message": message}}} if message else {}
    return {
        "metadata": {"name": "sw-model-abcde"},
        "status": {"phase": phase, "containerStatuses": [terminated]},
    }


FAILED = {
    "type": "Failed",
    "status": "True",
    "reason": "PodFailurePolicy",
    "message": "Container fetch for pod sw-model-abcde failed with exit code 2",
    "lastTransitionTime": "2025-01-01T12:00:05Z",
}


def test_no_job_yet_then_running_then_done():
    assert observe_fetch([], []).state == FetchState.MISSING
    running = observe_fetch([fetch_job_summary(job())], [fetch_pod_summary(pod("Running"))])
    assert running.state == FetchState.RUNNING
    complete = {"type": "Complete", "status": "True", "lastTransitionTime": "2025-01-01T12:00:09Z"}
    done = observe_fetch([fetch_job_summary(job(complete))], [])
    assert done.state == FetchState.SUCCEEDED
    assert done.finish_time == datetime(2025, 1, 1, 12, 0, 9, tzinfo=UTC)


def test_a_failed_download_says_why_from_its_pod():
    said = "model 'org/nope' not found on https://huggingface.co (HTTP 401)"
    failed = observe_fetch(
        [fetch_job_summary(job(FAILED))], [fetch_pod_summary(pod("Failed", said))]
    )
    assert (failed.state, failed.message) == (FetchState.FAILED, said)
    # Without a pod's message (it is gone), the Job's condition is what is left.
    bare = observe_fetch([fetch_job_summary(job(FAILED))], [])
    assert bare.message == FAILED["message"]

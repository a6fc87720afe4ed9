"""A multi-node trial's result is rank 0's: its Job completes once every rank's pod has
succeeded, and the pod watch may show another rank's success before rank 0's."""

from __future__ import annotations

import json
from typing import Any

from sweep_operator.observe import COMPLETION_INDEX, job_summary, observe_trial, pod_summary
from sweep_operator.trials import TrialState


def complete_job() -> dict[str, Any]:
    complete = {"type": "Complete", "status": "True", "lastTransitionTime": "2026-12-05T00:01:00Z"}
    summary = job_summary(
        {
            "metadata": {
                "name": "sw-0000",
                "uid": "job-1",
                "annotations": {"lorasweep.io/trial-index": "0"},
            },
            "spec": {"completionMode": "Indexed", "completions": 2},
            "status": {"startTime": "2026-12-05T00:00:00Z", "conditions": [complete]},
        }
    )
    assert summary is not None
    return summary


def rank_pod(rank: int, phase: str, message: str = "") -> dict[str, Any]:
    state = {"terminated": {"exitCode": 0, "message": message}} if phase == "Succeeded" else {}
    summary = pod_summary(
        {
            "metadata": {
                "name": f"sw-0000-{rank}-x",
                "labels": {"lorasweep.io/trial": "sw-0000"},
                "annotations": {COMPLETION_INDEX: str(rank)},
                "ownerReferences": [{"kind": "Job", "name": "sw-0000", "uid": "job-1"}],
            },
            "status": {"phase": phase, "containerStatuses": [{"state": state}]},
        }
    )
    assert summary is not None
    return summary


def test_a_trial_is_not_succeeded_before_rank_0_is_seen_to_report():
    result = json.dumps({"metrics": {"eval_loss": 0.25}})
    early = observe_trial(
        complete_job(), [rank_pod(0, "Running"), rank_pod(1, "Succeeded")], "eval_loss"
    )
    assert early.state == TrialState.RUNNING  # not a success without its result
    done = observe_trial(
        complete_job(),
        [rank_pod(0, "Succeeded", result), rank_pod(1, "Succeeded")],
        "eval_loss",
    )
    assert (done.state, done.value) == (TrialState.SUCCEEDED, 0.25)


def test_a_trial_whose_rank_0_pods_have_all_ended_reports_nothing_more():
    """Rank 0's succeeded pod deleted (a user, PodGC), a failed attempt of it left: the Job
    says the trial succeeded, and no result is coming from a pod."""
    observed = observe_trial(
        complete_job(), [rank_pod(0, "Failed"), rank_pod(1, "Succeeded")], "eval_loss"
    )
    assert (observed.state, observed.value) == (TrialState.SUCCEEDED, None)

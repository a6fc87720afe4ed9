"""A sweep deleted and applied again under the same name (as the README suggests to change
what cannot change) starts afresh: the earlier sweep's Jobs and pods, which carry the same
labels until the garbage collector deletes them, are not its trials."""

from __future__ import annotations

import json
from typing import Any

from sweep_operator.api import KIND
from sweep_operator.observe import job_summary, owned_by, pod_summary, trials_observer
from sweep_operator.trials import TrialState


def result(loss: float) -> str:
    return json.dumps({"metrics": {"eval_loss": loss}})


def job(sweep_uid: str, job_uid: str) -> dict[str, Any]:
    complete = {"type": "Complete", "status": "True", "lastTransitionTime": "2026-12-05T00:01:00Z"}
    summary = job_summary(
        {
            "metadata": {
                "name": "sw-0000",
                "uid": job_uid,
                "labels": {"lorasweep.io/sweep": "sw"},
                "annotations": {"lorasweep.io/trial-index": "0"},
                "ownerReferences": [{"kind": KIND, "name": "sw", "uid": sweep_uid}],
            },
            "spec": {},
            "status": {"startTime": "2026-12-05T00:00:00Z", "conditions": [complete]},
        }
    )
    assert summary is not None
    return summary


def pod(job_uid: str, phase: str, message: str = "") -> dict[str, Any]:
    state = {"terminated": {"exitCode": 0, "message": message}} if message else {"running": {}}
    summary = pod_summary(
        {
            "metadata": {
                "name": f"sw-0000-{job_uid}",
                "labels": {"lorasweep.io/trial": "sw-0000"},
                "ownerReferences": [{"kind": "Job", "name": "sw-0000", "uid": job_uid}],
            },
            "status": {"phase": phase, "containerStatuses": [{"state": state}]},
        }
    )
    assert summary is not None
    return summary


def test_the_earlier_sweeps_jobs_are_not_its_trials():
    old, new = job("sweep-1", "job-1"), job("sweep-2", "job-2")
    assert owned_by([old, new], "sweep-2") == [new]
    assert owned_by([old], "sweep-2") == []


def test_a_trial_reads_its_own_jobs_pods_not_a_lingering_one_of_the_same_name():
    new = job("sweep-2", "job-2")
    lingering = pod("job-1", "Succeeded", result(0.25))  # the earlier sweep's trial sw-0000
    own = pod("job-2", "Succeeded", result(0.5))
    [trial] = trials_observer([new], [lingering, own], "eval_loss")({})
    assert (trial.state, trial.value) == (TrialState.SUCCEEDED, 0.5)
    # Until its own pod's end is seen, it is still reporting, whatever the lingering one says.
    [trial] = trials_observer([new], [lingering, pod("job-2", "Running")], "eval_loss")({})
    assert (trial.state, trial.value) == (TrialState.RUNNING, None)

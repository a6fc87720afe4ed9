"""The reconciler's memos: of observed trials, the same trials as observing afresh, whatever
changed between two reconciles (the kopf indexes replace a summary when its object changes);
of MLflow runs, the runs last read."""

from __future__ import annotations

import json
import logging

from sweep_operator.mlflow_runs import RunsCache
from sweep_operator.observation import TrialRun
from sweep_operator.observe import TrialMemo, job_summary, pod_summary, trials_observer
from sweep_operator.trials import Point, TrialState


def job(name: str, index: int, complete: bool = False) -> dict:
    status: dict = {"startTime": "2026-12-05T00:00:00Z"}
    if complete:
        status["conditions"] = [
            {"type": "Complete", "status": "True", "lastTransitionTime": "2026-12-05T00:01:00Z"}
        ]
    return job_summary(
        {
            "metadata": {
                "name": name,
                "uid": f"uid-{name}",
                "labels": {},
                "annotations": {
                    "lorasweep.io/trial-index": str(index),
                    "lorasweep.io/parameters": json.dumps({"lora_rank": index}),
                },
            },
            "spec": {},
            "status": status,
        }
    )


def pod(trial: str, phase: str, message: str = "") -> dict:
    state = {"terminated": {"exitCode": 0, "message": message}} if phase == "Succeeded" else {}
    summary = pod_summary(
        {
            "metadata": {
                "name": f"{trial}-pod",
                "labels": {"lorasweep.io/trial": trial},
                "ownerReferences": [{"kind": "Job", "name": trial, "uid": f"uid-{trial}"}],
            },
            "status": {"phase": phase, "containerStatuses": [{"state": state}]},
        }
    )
    assert summary is not None
    return summary


def both(
    jobs: list[dict],
    pods: list[dict],
    memo: TrialMemo,
    results: dict | None = None,
    curves: dict | None = None,
):
    fresh = trials_observer(jobs, pods, "eval_loss")(results or {}, curves)
    remembered = trials_observer(jobs, pods, "eval_loss", memo)(results or {}, curves)
    assert remembered == fresh
    return remembered


def test_the_memo_sees_every_change_a_fresh_observation_sees():
    memo = TrialMemo()
    jobs = [job("sw-0000", 0), job("sw-0001", 1)]
    pods = [pod("sw-0000", "Running"), pod("sw-0001", "Pending")]
    first = both(jobs, pods, memo)
    assert [t.state for t in first] == [TrialState.RUNNING, TrialState.PENDING]

    # Trial 0 ends: its Job and pod summaries are replaced; trial 1's stay the same objects.
    jobs[0] = job("sw-0000", 0, complete=True)
    pods[0] = pod("sw-0000", "Succeeded", '{"metrics": {"eval_loss": 0.25}}')
    second = both(jobs, pods, memo)
    assert second[0].state == TrialState.SUCCEEDED and second[0].value == 0.25
    assert second[1] is first[1]  # unchanged: not observed again

    # An MLflow result arrives for trial 1, and a third trial's Job appears without a pod.
    jobs.append(job("sw-0002", 2))
    results = {"sw-0001": {"run_id": "r1", "metrics": {"train_loss": 1.5}}}
    third = both(jobs, pods, memo, results)
    assert third[1].mlflow_run_id == "r1"
    assert third[2].state == TrialState.PENDING

    # Early stopping reads trial 1's curve, then reads it again: each read is a new object.
    curves = {"sw-0001": {"eval_loss": [Point(1, 0.9)]}}
    fourth = both(jobs, pods, memo, results, curves)
    assert fourth[1].curves == curves["sw-0001"] and fourth[0] is third[0]
    assert both(jobs, pods, memo, results, curves)[1] is fourth[1]  # the same read: reused
    curves = {"sw-0001": {"eval_loss": [Point(1, 0.9), Point(2, 0.7)]}}
    assert len(both(jobs, pods, memo, results, curves)[1].curves["eval_loss"]) == 2

    # A Job deleted and created again under the same name is observed afresh.
    del jobs[2]
    both(jobs, pods, memo, results)
    jobs.append(job("sw-0002", 2, complete=True))
    pods.append(pod("sw-0002", "Succeeded", '{"metrics": {"eval_loss": 0.5}}'))
    assert both(jobs, pods, memo, results)[2].value == 0.5


def test_the_plan_sees_an_uploaded_adapter_once_its_run_is_read_again():
    """RunsCache hands every plan the same runs until its results are replaced (read again);
    no request is made here."""
    cache = RunsCache("http://127.0.0.1:9", logging.getLogger("test"))
    cache.results = {"sw-0000": {"run_id": "r0"}}
    first = cache.runs()
    assert first == {"sw-0000": TrialRun(run_id="r0")}
    assert cache.runs() is first  # nothing read since: not made again
    cache.results = {**cache.results, "sw-0000": {"run_id": "r0", "adapter": "adapter"}}
    assert cache.runs() == {"sw-0000": TrialRun(run_id="r0", adapter="adapter")}

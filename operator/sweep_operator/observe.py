"""From Kubernetes objects to the trials the planner sees. Pure: dicts in, models out.

The operator keeps two kopf indexes, one of trial Jobs and one of trial pods, each holding the
compact summaries made here; everything the planner needs is rebuilt from them (and from MLflow
for results a pod no longer holds) on every reconcile.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lora_trainer.contract import EXIT_OUT_OF_MEMORY, ResultError, TrialResult
from sweep_operator.api import KIND
from sweep_operator.trials import (
    ANNOTATION_INDEX,
    ANNOTATION_PARAMETERS,
    ANNOTATION_STOPPED,
    LABEL_QUEUE_NAME,
    LABEL_TRIAL,
    Curve,
    FetchState,
    ObservedFetch,
    ObservedTrial,
    TrialState,
)

Summary = dict[str, Any]


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def job_summary(job: dict[str, Any]) -> Summary | None:
    """What the operator keeps of a trial Job; None for a Job that is not a lorasweep trial."""
    meta = job.get("metadata", {})
    annotations = meta.get("annotations") or {}
    if ANNOTATION_INDEX not in annotations:
        return None
    status = job.get("status") or {}
    conditions = _finished(status)
    return {
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "sweep_uid": _owner_uid(meta, KIND),
        "index": int(annotations[ANNOTATION_INDEX]),
        "parameters": json.loads(annotations.get(ANNOTATION_PARAMETERS, "{}")),
        "deleting": bool(meta.get("deletionTimestamp")),
        "complete": "Complete" in conditions,
        "failed": "Failed" in conditions,
        "failure": (conditions.get("Failed") or {}).get("message", ""),
        "fatal_exit_code": _fatal_exit_code(conditions.get("Failed")),
        "finished_at": status.get("completionTime")
        or (conditions.get("Failed") or {}).get("lastTransitionTime"),
        "started_at": status.get("startTime"),
        "ready": int(status.get("ready") or 0),
        "stopped": annotations.get(ANNOTATION_STOPPED),
        "suspended": bool((job.get("spec") or {}).get("suspend")),
        "queue": (meta.get("labels") or {}).get(LABEL_QUEUE_NAME),
    }


def _owner_uid(meta: dict[str, Any], kind: str) -> str:
    """The uid of the object's owner of this kind; "" when it has none (orphaned)."""
    owners = meta.get("ownerReferences") or []
    return next((o.get("uid", "") for o in owners if o.get("kind") == kind), "")


def owned_by(jobs: list[Summary], sweep_uid: str) -> list[Summary]:
    """The trial Jobs of this sweep. An earlier sweep of the same name leaves Jobs with the
    same label until the garbage collector has deleted them (a deleted sweep's Jobs go after
    it): they are another sweep's trials."""
    return [job for job in jobs if job["sweep_uid"] == sweep_uid]


# How the Job controller says a podFailurePolicy FailJob rule ended a Job (pkg/controller/job).
_FAIL_JOB_RULE = re.compile(r"failed with exit code (\d+) matching FailJob rule")


def _fatal_exit_code(failed: dict[str, Any] | None) -> int | None:
    """The exit code that made the Job fail at once by its podFailurePolicy: it outlives the pod
    (which PodGC or a user may delete) on the Job's Failed condition."""
    if failed is None or failed.get("reason") != "PodFailurePolicy":
        return None
    match = _FAIL_JOB_RULE.search(failed.get("message", ""))
    return int(match.group(1)) if match else None


def _finished(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A Job's true Complete and Failed conditions, by type."""
    return {
        c["type"]: c
        for c in status.get("conditions") or []
        if c.get("status") == "True" and c["type"] in ("Complete", "Failed")
    }


def ends_a_trial(event_type: str | None, obj: Mapping[str, Any]) -> bool:
    """Whether an event of a trial Job or pod (`event_type` ADDED, MODIFIED, DELETED, or None
    in kopf's first listing) may end a trial, and with it free its GPUs: a Job complete,
    failed or being deleted, a pod succeeded or failed, either deleted. Such an event is
    planned on sooner than other changes. Later events of what has ended count too: telling
    them apart would need the last state of each object, and they only bring a reconcile
    forward."""
    if event_type == "DELETED":
        return True
    status = obj.get("status") or {}
    if obj.get("kind") == "Pod":  # one being deleted is replaced by its Job: no end
        return status.get("phase") in ("Succeeded", "Failed")
    return bool(_finished(status)) or bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def _pod_end(pod: dict[str, Any]) -> Summary:
    status = pod.get("status") or {}
    ends = [
        (cs.get("state") or {}).get("terminated") or {}
        for cs in status.get("containerStatuses") or []
    ]
    return {
        "name": pod["metadata"]["name"],
        "phase": status.get("phase", "Pending"),
        "message": next((end["message"] for end in ends if end.get("message")), ""),
        "exit_code": next((end["exitCode"] for end in ends if end.get("exitCode")), None),
    }


# The Job controller's annotation of an Indexed Job's pods: the pod's index, its node rank.
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def pod_summary(pod: dict[str, Any]) -> Summary | None:
    """A trial pod's Job (by uid: an earlier sweep's pod of the same trial name may linger),
    whether it is the one that reports the result (of a multi-node trial, rank 0's), its phase
    and the termination message its container left."""
    meta = pod.get("metadata", {})
    if not (meta.get("labels") or {}).get(LABEL_TRIAL):
        return None
    rank = (meta.get("annotations") or {}).get(COMPLETION_INDEX, "0")
    return {"job_uid": _owner_uid(meta, "Job"), "reports": rank == "0", **_pod_end(pod)}


def sweep_summary(sweep: dict[str, Any]) -> Summary:
    """What the operator keeps of every sweep for the warm start of later ones: its phase (""
    before its first status), MLflow experiment and tracking URI."""
    status = sweep.get("status") or {}
    spec_mlflow = (sweep.get("spec") or {}).get("mlflow") or {}
    return {
        "phase": status.get("phase") or "",
        "experiment_id": (status.get("mlflow") or {}).get("experimentId"),
        "tracking_uri": spec_mlflow.get("trackingUri"),
    }


def fetch_job_summary(job: dict[str, Any]) -> Summary:
    """What the operator keeps of a sweep's model download Job."""
    conditions = _finished(job.get("status") or {})
    failed = conditions.get("Failed") or {}
    return {
        "name": job["metadata"]["name"],
        "complete": "Complete" in conditions,
        "failed": bool(failed),
        "failure": failed.get("message") or failed.get("reason") or "",
        "finished_at": (conditions.get("Complete") or failed).get("lastTransitionTime"),
    }


def fetch_pod_summary(pod: dict[str, Any]) -> Summary:
    """A model download pod's phase and termination message (why it failed)."""
    return _pod_end(pod)


def observe_fetch(jobs: list[Summary], pods: list[Summary]) -> ObservedFetch:
    """The model download from its Job (one per sweep) and its pods' termination messages."""
    if not jobs:
        return ObservedFetch(state=FetchState.MISSING)
    job = jobs[0]
    finished = _time(job["finished_at"])
    if job["complete"]:
        return ObservedFetch(state=FetchState.SUCCEEDED, finish_time=finished)
    if not job["failed"]:
        return ObservedFetch(state=FetchState.RUNNING)
    said = [p["message"].strip() for p in pods if p["phase"] == "Failed" and p["message"].strip()]
    # A failed pod's message says why; the Job's condition only that it gave up.
    message = said[-1][-1000:] if said else job["failure"] or "the download Job failed"
    return ObservedFetch(state=FetchState.FAILED, message=message, finish_time=finished)


def parse_result(message: str) -> dict[str, float]:
    """The metrics of a TrialResult termination message; {} for any other message (a program
    that writes no result, or the log tail the kubelet keeps in its place)."""
    try:
        return TrialResult.from_json(message).metrics
    except ResultError:
        return {}


def observe_trial(
    job: Summary,
    pods: list[Summary],
    metric: str,
    tracked: dict[str, Any] | None = None,
    curves: dict[str, Curve] | None = None,
) -> ObservedTrial:
    """One trial from its Job, its pods, and (optionally) its MLflow run's metrics and
    learning curves.

    The termination message wins over MLflow, as the trial contract says: it is what the trial
    itself reported, and it is there even when MLflow was unreachable.
    """
    # The pod watch can lag the Job watch by a moment; until the pod's success (and with it the
    # termination message) is seen too, the trial is still reporting. Of a multi-node trial,
    # rank 0's: another rank's pod may be seen succeeded first. Once every pod seen has ended
    # (the succeeded one deleted, a failed attempt left) nothing more is coming.
    reporters = [p for p in pods if p["reports"]]
    reporting = not any(p["phase"] == "Succeeded" for p in reporters) and any(
        p["phase"] not in ("Succeeded", "Failed") for p in reporters
    )
    # Likewise a failed trial's exit code, which tells running out of memory from failing.
    ending = bool(pods) and not any(p["phase"] == "Failed" for p in pods)
    if job["complete"] and not reporting:
        state = TrialState.SUCCEEDED
    elif job["complete"] or (job["failed"] and ending):
        state = TrialState.RUNNING
    elif job["failed"] and EXIT_OUT_OF_MEMORY in (
        job["fatal_exit_code"],
        *(p["exit_code"] for p in pods),
    ):
        state = TrialState.INFEASIBLE
    elif job["failed"]:
        state = TrialState.FAILED
    elif job["deleting"] or job["stopped"] is not None:
        state = TrialState.STOPPED
    elif job["suspended"]:
        # Suspended without the operator's stop annotation: Kueue holds it until it has
        # quota (not admitted yet, or preempted). It waits; it has neither failed nor ended.
        state = TrialState.QUEUED
    elif job["ready"] > 0 or any(p["phase"] == "Running" for p in pods):
        state = TrialState.RUNNING
    else:
        state = TrialState.PENDING
    messages = [p["message"] for p in reporters if p["phase"] == "Succeeded" and p["message"]]
    reported = parse_result(messages[0]) if messages else {}
    metrics = dict((tracked or {}).get("metrics", {}))
    metrics.update(reported)
    message = job["stopped"] or "" if state == TrialState.STOPPED else ""
    if state in (TrialState.FAILED, TrialState.INFEASIBLE):
        failed_messages = [p["message"] for p in pods if p["phase"] == "Failed" and p["message"]]
        message = job["failure"] + (f": {failed_messages[-1][-500:]}" if failed_messages else "")
    return ObservedTrial(
        name=job["name"],
        index=job["index"],
        parameters=job["parameters"],
        state=state,
        value=metrics.get(metric) if state == TrialState.SUCCEEDED else None,
        metrics={k: v for k, v in metrics.items() if k != metric},
        mlflow_run_id=(tracked or {}).get("run_id"),
        start_time=_time(job["started_at"]),
        finish_time=_time(job["finished_at"]),
        message=message,
        curves=curves or {},
    )


@dataclass(frozen=True)
class _Seen:
    """One trial's observation, the metric it scored and the objects it was made from (its
    Job's and pods' summaries, MLflow's result and curves)."""

    metric: str
    sources: tuple[object, ...]
    trial: ObservedTrial

    def made_from(self, metric: str, sources: tuple[object, ...]) -> bool:
        return (
            self.metric == metric
            and len(self.sources) == len(sources)
            and all(a is b for a, b in zip(self.sources, sources, strict=True))
        )


class TrialMemo:
    """The last observation of each trial and the summaries it was made from. The indexes
    replace a Job's or pod's summary when the object changes, so while a trial's Job, pods,
    MLflow result and curves are the very objects seen last time, its observation is the same:
    a large sweep's reconcile no longer re-reads thousands of unchanged trials."""

    def __init__(self) -> None:
        self._last: dict[str, _Seen] = {}

    def observe(
        self,
        job: Summary,
        pods: list[Summary],
        metric: str,
        tracked: dict[str, Any] | None,
        curves: dict[str, Curve] | None,
    ) -> ObservedTrial:
        sources = (job, tracked, curves, *pods)
        last = self._last.get(job["name"])
        if last is not None and last.made_from(metric, sources):
            return last.trial
        trial = observe_trial(job, pods, metric, tracked, curves)
        self._last[job["name"]] = _Seen(metric, sources, trial)
        return trial

    def forget_others(self, names: set[str]) -> None:
        """Drop the trials whose Jobs are gone."""
        self._last = {name: last for name, last in self._last.items() if name in names}


def trials_observer(
    jobs: list[Summary], pods: list[Summary], metric: str, memo: TrialMemo | None = None
) -> Callable[..., list[ObservedTrial]]:
    """`observe_trial` of every trial Job with its pods, given MLflow's results by trial
    and, with early stopping, their curves (through `memo` when given: the observations of
    unchanged trials are reused)."""
    pods_by_job: dict[str, list[Summary]] = defaultdict(list)
    for pod in pods:
        pods_by_job[pod["job_uid"]].append(pod)
    if memo is not None:
        memo.forget_others({job["name"] for job in jobs})
    observe_one = memo.observe if memo is not None else observe_trial

    def observe(
        results: Mapping[str, dict[str, Any]],
        curves: Mapping[str, dict[str, Curve]] | None = None,
    ) -> list[ObservedTrial]:
        curves = curves or {}
        return [
            observe_one(
                job,
                pods_by_job[job["uid"]],
                metric,
                results.get(job["name"]),
                curves.get(job["name"]),
            )
            for job in jobs
        ]

    return observe

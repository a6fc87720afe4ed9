"""What the operator asks of Kueue for a sweep with spec.trainer.queueName: that stopped
trials never run again, and one Event when trials start waiting for quota."""

from __future__ import annotations

import logging

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sweep_operator.api import SweepSpec
from sweep_operator.trials import ObservedTrial, TrialState

# Kueue's API: a trial Job's Workload (found by the Job's uid) and LocalQueue.
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
LABEL_WORKLOAD_JOB_UID = "kueue.x-k8s.io/job-uid"


class Kueue:
    """One sweep's Workloads. Its fields are caches: a restart reads or does them again."""

    def __init__(self, api: client.ApiClient, logger: logging.Logger) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.logger = logger
        self.released: set[str] = set()  # stopped trials whose Workload is deactivated
        self.waiting_reported = False  # the Event that trials wait for quota, this time round
        self.cluster_queue: str | None = None  # of spec.trainer.queueName, once read

    def release(self, namespace: str, jobs: list[dict], stopping: list[str]) -> None:
        """Deactivate the Workload of each stopped trial (spec.active: false): Kueue then
        suspends its Job, frees its quota and never admits it again. Once per trial and
        operator run; a Workload Kueue has not made yet is looked for again next time."""
        wanted = {
            job["uid"]: job["name"]
            for job in jobs
            if job["queue"]
            and (job["stopped"] is not None or job["name"] in stopping)
            and not (job["complete"] or job["failed"])
            and job["name"] not in self.released
        }
        if not wanted:
            return
        try:
            for workload in self._workloads(namespace, list(wanted)):
                if workload["spec"].get("active", True):
                    self.custom.patch_namespaced_custom_object(
                        KUEUE_GROUP,
                        KUEUE_VERSION,
                        namespace,
                        "workloads",
                        workload["metadata"]["name"],
                        {"spec": {"active": False}},
                    )
                self.released.add(wanted[workload["metadata"]["labels"][LABEL_WORKLOAD_JOB_UID]])
        except ApiException as error:
            self.logger.warning("cannot deactivate stopped trials in Kueue yet: %s", error.reason)

    def _workloads(self, namespace: str, job_uids: list[str]) -> list[dict]:
        """The Kueue Workloads of these Jobs (Kueue labels each with its Job's uid)."""
        selector = f"{LABEL_WORKLOAD_JOB_UID} in ({','.join(sorted(job_uids))})"
        return self.custom.list_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, namespace, "workloads", label_selector=selector
        )["items"]

    def waiting_event(
        self,
        body: kopf.Body,
        spec: SweepSpec,
        namespace: str,
        jobs: list[dict],
        observed: list[ObservedTrial],
    ) -> None:
        """One Event when trials start waiting for quota, naming the ClusterQueue: Kueue tried
        their Workloads and reserved nothing (a Job it has not looked at yet is not waiting).
        Its message is Kueue's, read from the Workloads."""
        queued = {t.name for t in observed if t.state == TrialState.QUEUED}
        if not queued:
            self.waiting_reported = False
            return
        if self.waiting_reported or not spec.trainer.queue_name:
            return
        uids = [job["uid"] for job in jobs if job["name"] in queued]
        if not uids:
            return
        try:
            workloads = self._workloads(namespace, uids)
        except ApiException as error:
            self.logger.warning("cannot read the trials' Kueue Workloads: %s", error.reason)
            return
        refused = [
            c.get("message", "")
            for w in workloads
            for c in (w.get("status") or {}).get("conditions") or []
            if c["type"] == "QuotaReserved" and c["status"] == "False"
        ]
        if not refused:
            return
        queue = spec.trainer.queue_name
        where = f"LocalQueue {queue}"
        cluster_queue = self._cluster_queue(namespace, queue)
        if cluster_queue:
            where = f"ClusterQueue {cluster_queue} (LocalQueue {queue})"
        kopf.event(
            body,
            type="Normal",
            reason="WaitingForQuota",
            message=f"{len(queued)} trials wait for quota in {where}: {refused[0]}"[:1000],
        )
        self.waiting_reported = True

    def _cluster_queue(self, namespace: str, queue: str) -> str | None:
        """The ClusterQueue behind a LocalQueue; None when it cannot be read."""
        if self.cluster_queue is None:
            try:
                local = self.custom.get_namespaced_custom_object(
                    KUEUE_GROUP, KUEUE_VERSION, namespace, "localqueues", queue
                )
            except ApiException as error:
                self.logger.warning("cannot read LocalQueue %s: %s", queue, error.reason)
                return None
            self.cluster_queue = local["spec"].get("clusterQueue")
        return self.cluster_queue

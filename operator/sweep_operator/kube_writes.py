"""The Kubernetes writes of a reconcile: trial Jobs created and stopped, the headless Service
and the model download Job, the sweep's status, its Events and its report ConfigMap.

Every write may meet what an earlier operator did before it stopped (409: created already;
404: gone already): those are not errors.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import kopf
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sweep_operator.api import GROUP, KIND, PLURAL, VERSION, SweepSpec, SweepStatus
from sweep_operator.naming import label_value
from sweep_operator.plan import SweepEvent
from sweep_operator.render import (
    SweepRef,
    render_model_fetch_job,
    render_trial_job,
    render_trial_service,
)
from sweep_operator.trials import ANNOTATION_STOPPED, LABEL_SWEEP, NewTrial

API_WORKERS = 16
# Beyond this many Events of one reason posted together, a single summary Event is posted.
EVENT_BURST = 5
# Trial Jobs rendered and waiting for an API thread, at most (create_trials).
RENDERED_AHEAD = 2 * API_WORKERS
# A sweep's Events are posted together at most this often (EventOutbox).
EVENT_INTERVAL = 1.0

_api_pool = ThreadPoolExecutor(API_WORKERS, thread_name_prefix="lorasweep-api")


class Answer(Enum):
    """The apiserver's answer to a trial Job's creation, but a refusal (its reason)."""

    CREATED = "created"
    OURS = "ours"  # 409: the sweep's own Job, created before a restart or not yet indexed
    TAKEN = "taken"  # 409: another owner's Job holds the name (or did: it is gone since)


@dataclass
class Creation:
    """What the apiserver answered to trial creations: the trials it created (not those that
    existed), those whose name another owner's Job holds, the apiserver's reason for each it
    refused (a quota, an admission policy, an invalid Job), the error of each it did not
    answer (down, 429, 5xx), and of each that failed otherwise."""

    created: list[NewTrial] = field(default_factory=list)
    taken: list[NewTrial] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    unanswered: dict[str, Exception] = field(default_factory=dict)
    broken: dict[str, Exception] = field(default_factory=dict)


class Creations:
    """Trial Jobs being created. A reconcile starts their requests and goes on (status, Events,
    the next reconciles) while the apiserver answers: under load a creation takes up to half a
    second, and the trials that ended meanwhile waited for it. The next reconcile collects the
    answers (the Job's watch event wakes it; a refusal waits for the next one, as it did)."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[NewTrial, Future[Answer | str]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._pending

    def start(self, trial: NewTrial, future: Future[Answer | str]) -> None:
        self._pending[trial.name] = (trial, future)

    def withdraw(self, names: Iterable[str]) -> set[str]:
        """Before these trials are stopped: drop the creations not started yet (their names
        are returned) and wait for the others' answers (a stop that overtook its creation
        would find no Job, and the trial would run)."""
        withdrawn = {n for n in names if n in self._pending and self._pending[n][1].cancel()}
        for name in withdrawn:
            del self._pending[name]
        wait([self._pending[n][1] for n in names if n in self._pending])
        return withdrawn

    def cancel(self) -> None:
        """Drop the creations not started yet (the sweep was deleted, the operator stops): a
        deleted sweep's trials must not start, and a restarted operator plans them again."""
        for _, future in self._pending.values():
            future.cancel()

    def collect(self) -> Creation:
        """The answers that came since the last collect."""
        answered = Creation()
        for name, (trial, future) in list(self._pending.items()):
            if not future.done():
                continue
            del self._pending[name]
            try:
                answer = future.result()
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
                answered.unanswered[name] = error
            except Exception as error:
                answered.broken[name] = error
            else:
                if answer is Answer.CREATED:
                    answered.created.append(trial)
                elif answer is Answer.TAKEN:
                    answered.taken.append(trial)
                elif isinstance(answer, str):
                    answered.refused[name] = answer
        return answered


class SweepWriter:
    """Writes one sweep's objects; remembers only that its Service exists."""

    def __init__(self, api: client.ApiClient) -> None:
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.has_service = False

    def create_trials(
        self,
        sweep: SweepRef,
        spec: SweepSpec,
        trials: list[NewTrial],
        tracking_uri: str | None,
        parent_run_id: str | None,
        creations: Creations,
    ) -> None:
        """Start creating the trials' Jobs, into `creations`; each answer is an Answer, or the
        apiserver's reason when it refused the Job. A refused Job holds back neither the others
        nor the reconcile: the trial is planned again. A Job the template does not render
        raises RenderError here (the sweep is refused at every reconcile while it does).

        Each Job is rendered here and sent by the API threads while the next ones are rendered;
        at most RENDERED_AHEAD rendered Jobs wait for a thread (10,000 rendered Jobs hold about
        140 MiB): a large fan-out's reconcile returns once its last Jobs are on their way."""
        if trials:
            self.ensure_service(sweep, spec)
        ahead = threading.BoundedSemaphore(RENDERED_AHEAD)

        def create(trial: NewTrial, job: dict) -> Answer | str:
            try:
                return self._create_trial(sweep, trial, job)
            finally:
                ahead.release()

        for trial in trials:
            if trial.name in creations:  # a name another's Job held as it was created
                continue
            job = render_trial_job(
                sweep, spec, trial, tracking_uri=tracking_uri, parent_run_id=parent_run_id
            )
            ahead.acquire()
            creations.start(trial, _api_pool.submit(create, trial, job))

    def _create_trial(self, sweep: SweepRef, trial: NewTrial, job: dict) -> Answer | str:
        try:
            if self.create_job(sweep.namespace, job):
                return Answer.CREATED
        except ApiException as error:
            # Not answered, or asked to come back later (429): planned again.
            if error.status is None or error.status == 429 or not 400 <= error.status < 500:
                raise
            return _reason(error)
        # Read only on a 409, which is rare: whether the trial exists or waits for a name.
        ours = self._job_owner(sweep.namespace, trial.name) == sweep.uid
        return Answer.OURS if ours else Answer.TAKEN

    def _job_owner(self, namespace: str, name: str) -> str | None:
        """The uid of the sweep that owns Job `name`; None when it has none or is gone."""
        try:
            job = self.batch.read_namespaced_job(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        owners = job.metadata.owner_references or []
        return next((o.uid for o in owners if o.kind == KIND), None)

    def ensure_service(self, sweep: SweepRef, spec: SweepSpec) -> None:
        """The headless Service that gives the pods of multi-node trials their DNS names for
        the rendezvous: one per sweep, owned by it, created before its first trial."""
        service = render_trial_service(sweep, spec)
        if service is None or self.has_service:
            return
        try:
            _without_reply(self.core.create_namespaced_service, sweep.namespace, service)
        except ApiException as error:
            if error.status != 409:  # created before a restart
                raise
        self.has_service = True

    def create_fetch_job(self, sweep: SweepRef, spec: SweepSpec) -> str | None:
        """The Job that downloads the model into spec.trainer.modelCache; its name when this
        call created it."""
        job = render_model_fetch_job(sweep, spec)
        if job is None or not self.create_job(sweep.namespace, job):
            return None
        return job["metadata"]["name"]

    def create_job(self, namespace: str, job: dict) -> bool:
        try:
            _without_reply(self.batch.create_namespaced_job, namespace, job)
        except ApiException as error:
            if error.status == 409:  # created before a restart, or not yet in the index
                return False
            raise
        return True

    def stop_trials(self, namespace: str, stop: dict[str, str], queued: bool) -> None:
        """Stop trials: suspending a Job ends its pod (SIGTERM, then the grace period), and
        the annotation keeps it observed as stopped, so it is never planned again.

        Kueue owns the suspension of a queued Job (it would undo ours): such a Job only gets
        the annotation here, and kueue.Kueue.release has Kueue suspend it for good."""

        def one(name: str) -> None:
            patch: dict[str, Any] = {"metadata": {"annotations": {ANNOTATION_STOPPED: stop[name]}}}
            if not queued:
                patch["spec"] = {"suspend": True}
            try:
                _without_reply(self.batch.patch_namespaced_job, name, namespace, patch)
            except ApiException as error:
                if error.status != 404:
                    raise

        list(_api_pool.map(one, stop))

    def patch_status(
        self, body: kopf.Body, status: SweepStatus, previous: SweepStatus | None
    ) -> bool:
        """Write the status when it changed; whether it did."""
        if previous is not None and previous == status:
            return False
        meta = body["metadata"]
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            meta["namespace"],
            PLURAL,
            meta["name"],
            {"status": status.model_dump(mode="json", by_alias=True, exclude_none=True)},
        )
        return True

    def write_report(self, sweep: SweepRef, files: dict[str, str]) -> None:
        """The ConfigMap `<sweep>-report`, owned by the sweep."""
        configmap = {
            "metadata": {
                "name": f"{sweep.name}-report",
                "labels": {LABEL_SWEEP: label_value(sweep.name)},
                "ownerReferences": [sweep.owner_reference()],
            },
            "data": files,
        }
        try:
            _without_reply(self.core.create_namespaced_config_map, sweep.namespace, configmap)
        except ApiException as error:
            if error.status != 409:
                raise
            _without_reply(
                self.core.patch_namespaced_config_map,
                f"{sweep.name}-report",
                sweep.namespace,
                {"data": files},
            )


def _reason(error: ApiException) -> str:
    """The apiserver's message of a refused request (its Status), else the HTTP reason."""
    try:
        return str(json.loads(error.body)["message"])
    except (TypeError, ValueError, KeyError):
        return f"{error.status} {error.reason}"


def _without_reply(call: Callable[..., Any], *args: Any) -> None:
    """Make a write whose reply the operator does not need: decoding it into models costs more
    than the request (`_preload_content=False`). The raw reply is still read, which hands its
    connection back to the pool: an unread one kept it, so the next request opened a new one,
    TLS handshake and all (40% of a 1,000-trial fan-out went into handshakes)."""
    reply = call(*args, _preload_content=False)
    reply.drain_conn()
    reply.release_conn()


class EventOutbox:
    """A sweep's Events, posted together at most every EVENT_INTERVAL seconds: the first at
    once, those that come sooner after it held until then. At 25 trials ending a second a
    reconcile every ~0.15 s had one or two of each reason to post, each a request to the
    apiserver (an Event per trial created, started and ended); a second's worth of them
    is a burst, one Event per reason (`posted`). Events held when the operator stops are
    lost, as an Event is: they say what the status and the trials show."""

    def __init__(self) -> None:
        self._held: list[SweepEvent] = []
        self._posted_at = -float("inf")

    def add(self, events: list[SweepEvent], now: float, last: bool = False) -> list[SweepEvent]:
        """What to post now (`now`: a monotonic clock), of these and those held; all of them
        when they are the `last` (the sweep has ended: whoever saw it end reads them)."""
        self._held += events
        if not self._held or (now - self._posted_at < EVENT_INTERVAL and not last):
            return []
        out, self._held = self._held, []
        self._posted_at = now
        return out

    @property
    def due(self) -> float | None:
        """When the Events held are to be posted; None when none is."""
        return self._posted_at + EVENT_INTERVAL if self._held else None


def post_events(body: kopf.Body, events: list[SweepEvent]) -> None:
    """Kubernetes Events on the sweep (`posted`)."""
    for event in posted(events):
        kopf.event(body, type=event.type, reason=event.reason, message=event.detail)


def posted(events: list[SweepEvent]) -> list[SweepEvent]:
    """The Events as posted, the trial named in each message: one per trial, or one per reason
    for a burst (a large sweep starting at once must not cost the apiserver an Event per
    trial), with the detail when it is the same for all."""
    by_reason: dict[str, list[SweepEvent]] = defaultdict(list)
    for event in events:
        by_reason[event.reason].append(event)
    out = []
    for reason, group in by_reason.items():
        if len(group) <= EVENT_BURST:
            for event in group:
                message = (
                    event.detail if event.subject is None else f"{event.subject}: {event.detail}"
                )
                out.append(SweepEvent(reason, event.subject, message[:1000], event.type))
        else:
            names = [e.subject or "" for e in group]
            message = f"{len(group)} trials: {', '.join(names[:3])}, ..., {names[-1]}"
            details = {e.detail for e in group}
            if len(details) == 1:  # the same for all, e.g. the quota that refused their Jobs
                message += f": {details.pop()}"
            out.append(SweepEvent(reason, None, message[:1000], group[0].type))
    return out

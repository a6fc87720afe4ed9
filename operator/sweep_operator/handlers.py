"""The kopf wiring: indexes of trial Jobs and pods, and one reconcile loop per sweep.

Each sweep's daemon wakes on any change to the sweep's Jobs or pods, and at least every
RESYNC_SECONDS, and runs its Reconciler (reconciler.py): observe, plan, carry out.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from sweep_operator.api import GROUP, KIND, PLURAL, VERSION
from sweep_operator.defaults import trial_defaults
from sweep_operator.kube_writes import API_WORKERS
from sweep_operator.naming import label_value
from sweep_operator.observe import (
    ends_a_trial,
    fetch_job_summary,
    fetch_pod_summary,
    job_summary,
    observe_fetch,
    pod_summary,
    sweep_summary,
)
from sweep_operator.reconciler import Indexes, Reconciler
from sweep_operator.trials import LABEL_MODEL_FETCH, LABEL_SWEEP

RESYNC_SECONDS = 10.0
# Reconciles of one sweep start at least this far apart, counted start to start...
MIN_RECONCILE_INTERVAL = 0.5
# ...unless a trial ended: then as soon as this, or ENDED_DUTY times the CPU time the last
# reconcile took, whichever is longer (a large sweep's reconciles keep to a share of a core).
# CPU, not wall time: on a loaded apiserver most of a reconcile's wall time is waiting for
# the status write, and counting it held freed GPUs idle for nothing (p99 0.5 s at P=1000).
# The reconcile thread's CPU time: the Jobs it creates are rendered and sent by API threads.
# A reconcile that asks to plan again at once (Reconciler.again) keeps the longer interval.
ENDED_INTERVAL = 0.05
ENDED_DUTY = 4
# Sweeps reconciled at the same moment; others wait for a free thread, not for a sweep to end.
RECONCILE_WORKERS = 8
# What kopf watches of trials, as its decorators name resources.
JOBS = ("batch", "v1", "jobs")
PODS = ("", "v1", "pods")


@dataclass
class Wakeup:
    """What a sweep's daemon waits for, set from kopf's event loop by its trials' events."""

    changed: asyncio.Event = field(default_factory=asyncio.Event)  # any change of a trial
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # one that may end a trial


# The running daemons' wakeups, by (namespace, sweep label). Events of a sweep with no daemon
# set nothing: its daemon's first reconcile reads them all.
_wakeups: dict[tuple[str, str], Wakeup] = {}
# Reconciles of all sweeps: a sweep holds a thread only while it reconciles.
_reconcile_pool = ThreadPoolExecutor(RECONCILE_WORKERS, thread_name_prefix="lorasweep-reconcile")
# MLflow work of all sweeps (one at a time per sweep), outside their reconciles.
_mlflow_pool = ThreadPoolExecutor(RECONCILE_WORKERS, thread_name_prefix="lorasweep-mlflow")


def unreachable(error: Exception) -> bool:
    """Whether a reconcile failed because the apiserver did not answer (down, restarting,
    overloaded): the next reconcile retries, and a traceback each time would bury the log."""
    if isinstance(error, ApiException):
        return error.status in (429, 500, 502, 503, 504)
    return isinstance(error, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def _wake(namespace: str, sweep: str, ended: bool) -> None:
    wakeup = _wakeups.get((namespace, sweep))
    if wakeup is None:
        return
    wakeup.changed.set()
    if ended:
        wakeup.ended.set()


def _kube_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # Trials are created in parallel; the default pool of 4 connections would serialise them.
    configuration.connection_pool_maxsize = API_WORKERS
    return client.ApiClient(configuration)


class SweepsOnlyDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf builds a diff base (a deep copy of the object) on every event of every watched
    object; only handlers of changes read it, and trial Jobs and pods have none. Their events
    come by the thousand in a large sweep, and the copies were a third of their cost."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        if body.get("kind") != KIND:
            return {}
        return super().build(body=body, extra_fields=extra_fields)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Events are for users; kopf's own "handler succeeded" chatter stays in the log.
    settings.posting.level = logging.WARNING
    settings.persistence.finalizer = "lorasweep.io/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="lorasweep.io")
    settings.persistence.diffbase_storage = SweepsOnlyDiffBase(
        prefix="lorasweep.io", key="last-handled-configuration"
    )
    settings.execution.max_workers = 64
    # Only trial Jobs and pods (and the model download's) reach the operator: on a shared
    # cluster, watching every Job and pod would bring it each one's every change to parse and
    # filter here, at a cost per event that a large sweep already feels with its own.
    settings.watching.label_selectors[JOBS] = LABEL_SWEEP
    settings.watching.label_selectors[PODS] = LABEL_SWEEP
    # MLflow's client retries for minutes by default; an outage must delay results, not stall
    # every reconcile (and with it the creation of trials) behind those retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    # Ending a run prints a link to it on stdout, not in the log: one line per stopped trial.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # kopf logs every handled event at INFO; a 1,000-trial sweep makes thousands a minute.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    trial_defaults()  # a malformed LORASWEEP_DEFAULT_* variable stops the operator here
    memo.api = _kube_client()


@kopf.index(*JOBS, labels={LABEL_SWEEP: kopf.PRESENT})
async def trial_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any):
    summary = job_summary(dict(body))
    return {(namespace, labels[LABEL_SWEEP]): summary} if summary else None


@kopf.index(*PODS, labels={LABEL_SWEEP: kopf.PRESENT})
async def trial_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any):
    summary = pod_summary(dict(body))
    return {(namespace, labels[LABEL_SWEEP]): summary} if summary else None


_FETCH_LABELS = {LABEL_SWEEP: kopf.PRESENT, LABEL_MODEL_FETCH: kopf.PRESENT}


@kopf.index(*JOBS, labels=_FETCH_LABELS)
async def model_fetch_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any):
    return {(namespace, labels[LABEL_SWEEP]): fetch_job_summary(dict(body))}


@kopf.index(*PODS, labels=_FETCH_LABELS)
async def model_fetch_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any):
    return {(namespace, labels[LABEL_SWEEP]): fetch_pod_summary(dict(body))}


@kopf.index(GROUP, VERSION, PLURAL)
async def sweep_summaries(namespace: str, name: str, body: kopf.Body, **_: Any):
    """Every sweep's phase and MLflow experiment: what a warm start reads of earlier sweeps."""
    return {(namespace, name): sweep_summary(dict(body))}


# The model download Job and its pods carry the sweep label too: their changes wake it.
@kopf.on.event(*JOBS, labels={LABEL_SWEEP: kopf.PRESENT})
@kopf.on.event(*PODS, labels={LABEL_SWEEP: kopf.PRESENT})
async def trial_changed(
    namespace: str, labels: kopf.Labels, event: kopf.RawEvent, body: kopf.Body, **_: Any
) -> None:
    _wake(namespace, labels[LABEL_SWEEP], ends_a_trial(event["type"], body))


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10)
async def run_sweep(
    name: str,
    namespace: str,
    body: kopf.Body,
    trial_jobs: kopf.Index,
    trial_pods: kopf.Index,
    model_fetch_jobs: kopf.Index,
    model_fetch_pods: kopf.Index,
    sweep_summaries: kopf.Index,
    memo: kopf.Memo,
    logger: logging.Logger,
    stopped: kopf.DaemonStopped,
    **_: Any,
) -> None:
    # An async daemon holds no thread while it waits: a sync one would hold one of kopf's
    # workers for the sweep's whole life, finished or not, and some 64 sweeps would take
    # them all and starve the indexers. Reconciles run in a pool of their own instead.
    # Trial labels carry label_value(name): sweep names may be longer than a label allows.
    key = (namespace, label_value(name))
    wakeup = _wakeups[key] = Wakeup()
    loop = asyncio.get_running_loop()

    def wake() -> None:
        """From another thread: a report was published."""
        if not loop.is_closed():
            loop.call_soon_threadsafe(wakeup.changed.set)

    reconciler = Reconciler(memo.api, logger)
    indexes = Indexes(sweeps=sweep_summaries, jobs=trial_jobs, pods=trial_pods)

    def reconcile() -> float:
        """One reconcile; the CPU time it took."""
        cpu_before = time.thread_time()
        try:
            reconciler.reconcile(
                body,
                list(trial_jobs.get(key, [])),
                list(trial_pods.get(key, [])),
                observe_fetch(
                    list(model_fetch_jobs.get(key, [])), list(model_fetch_pods.get(key, []))
                ),
                indexes,
            )
        except Exception as error:
            if unreachable(error):
                logger.warning("reconcile of %s/%s: %s; retrying", namespace, name, error)
            else:
                logger.exception("reconcile of %s/%s failed; retrying", namespace, name)
        return time.thread_time() - cpu_before

    def caught_up(work: asyncio.Future) -> None:
        if work.cancelled():
            return
        if work.exception() is not None:
            logger.error("MLflow work of %s/%s failed: %r", namespace, name, work.exception())
        elif work.result():
            wakeup.changed.set()

    catching_up: asyncio.Future | None = None
    publishing: Future | None = None
    try:
        # kopf cancels the daemon when the sweep is deleted or the operator stops; Python 3.11's
        # asyncio.wait_for loses a cancellation that comes as its event is set, and kopf then
        # leaves the daemon running. The flag kopf sets before cancelling ends it anyway.
        while not stopped:
            wakeup.changed.clear()
            wakeup.ended.clear()
            started = loop.time()
            # kopf keeps its settings and logging context in context variables.
            context = contextvars.copy_context()
            reconciling = loop.run_in_executor(_reconcile_pool, context.run, reconcile)
            try:
                cpu = await asyncio.shield(reconciling)
            except asyncio.CancelledError:
                # Stopped mid-reconcile: let it end, its writes not cut off half way.
                await reconciling
                raise
            # The MLflow work the reconcile left is done while the next ones go on: a search
            # of thousands of runs (or an MLflow that does not answer) holds back no trial.
            if reconciler.mlflow_pending and (catching_up is None or catching_up.done()):
                catching_up = loop.run_in_executor(
                    _mlflow_pool, contextvars.copy_context().run, reconciler.catch_up_mlflow
                )
                catching_up.add_done_callback(caught_up)
            # The parent run is closed after the report being published (Reconciler).
            if reconciler.report.publishing not in (None, publishing):
                publishing = reconciler.report.publishing
                publishing.add_done_callback(lambda _: wake())
            # A burst of trial events (a large sweep starting, trials ending by the dozen) is
            # handled in one reconcile per interval, not one per event: each reconcile may
            # patch the status. Counted start to start: a reconcile that took longer (a status
            # write on a loaded apiserver) is followed at once when trials ended meanwhile, or
            # their GPUs wait for nothing. A trial that ends is planned on sooner: at half a
            # second, the interval was nearly all of a freed GPU's idle time in a small sweep.
            took = loop.time() - started
            await asyncio.sleep(
                min(MIN_RECONCILE_INTERVAL, max(ENDED_INTERVAL, ENDED_DUTY * cpu)) - took
            )
            rest = MIN_RECONCILE_INTERVAL - (loop.time() - started)
            if rest > 0 and not wakeup.ended.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.ended.wait(), rest)
            if reconciler.again:
                continue
            timeout = min(RESYNC_SECONDS, reconciler.recheck_after or RESYNC_SECONDS)
            if reconciler.events.due is not None:  # Events held to be posted together
                timeout = max(
                    ENDED_INTERVAL, min(timeout, reconciler.events.due - time.monotonic())
                )
            if reconciler.deadline is not None:
                # The time budget ends sooner than the next resync: be there when it does.
                until = (reconciler.deadline - datetime.now(UTC)).total_seconds()
                timeout = max(0.5, min(timeout, until))
            # kopf cancels this wait when the sweep is deleted or the operator stops.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.changed.wait(), timeout)
    finally:
        reconciler.creations.cancel()
        if _wakeups.get(key) is wakeup:  # not a newer daemon's, of a sweep made again
            del _wakeups[key]

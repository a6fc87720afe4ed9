"""The kopf operator: indexes of trial Jobs and pods, and one reconcile loop per sweep.

Reconcile is level-based: observe (the indexes, MLflow), plan (a pure function), act (create
or delete Jobs), then patch the status if it changed. The loop wakes on any change to the
sweep's Jobs or pods and at least every RESYNC_SECONDS. Nothing lives only in memory: after a
restart the same observation gives the same plan, and a trial created twice is refused by
the apiserver (its name is deterministic), so none is duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from lora_trainer.contract import TAG_NAMESPACE, TAG_SWEEP, TAG_TRIAL
from sweep_operator.api import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    MlflowStatus,
    ParameterImportance,
    SweepSpec,
    SweepStatus,
)
from sweep_operator.defaults import trial_defaults
from sweep_operator.importance import parameter_importance
from sweep_operator.naming import experiment_name, label_value, model_fetch_name
from sweep_operator.objective import objective_values, scorer
from sweep_operator.observe import (
    fetch_job_summary,
    fetch_pod_summary,
    job_summary,
    observe_fetch,
    observe_trial,
    pod_summary,
    sweep_summary,
)
from sweep_operator.plan import Plan, failed_status, plan
from sweep_operator.render import (
    RenderError,
    SweepRef,
    render_model_fetch_job,
    render_trial_job,
    render_trial_service,
)
from sweep_operator.report import (
    best_config_yaml,
    correlations_csv,
    importance_csv,
    learning_curves_png,
    optimization_plot_png,
    sensitivity_csv,
    trials_summary_csv,
)
from sweep_operator.semantic import SweepInvalid, validate_sweep
from sweep_operator.tracking import SweepRuns
from sweep_operator.trials import (
    ANNOTATION_STOPPED,
    LABEL_MODEL_FETCH,
    LABEL_SWEEP,
    Curve,
    FetchState,
    NewTrial,
    ObservedFetch,
    ObservedTrial,
    TrialState,
)
from sweep_operator.warm_start import ENDED, NOT_FOUND, Source, WarmStart, warm_start

RESYNC_SECONDS = 10.0
MIN_RECONCILE_INTERVAL = 1.0
# Default tracking server for sweeps that name none (set by the Helm chart).
DEFAULT_TRACKING_URI_ENV = "LORASWEEP_MLFLOW_TRACKING_URI"
API_WORKERS = 16
CREATE_CHUNK = 256
# Sweeps reconciled at the same moment; others wait for a free thread, not for a sweep to end.
RECONCILE_WORKERS = 8
# The report (ConfigMap, MLflow artifacts, plots) costs up to a second or two to make.
REPORT_INTERVAL_SECONDS = 60.0
IMPORTANCE_IN_STATUS = 5
# Beyond this many Events of one reason in one reconcile, a single summary Event is posted.
EVENT_BURST = 5
# Kueue's API: a trial Job's Workload (found by the Job's uid) and LocalQueue.
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
LABEL_WORKLOAD_JOB_UID = "kueue.x-k8s.io/job-uid"

# Set from kopf's event loop (trial events), awaited there by the sweep's daemon.
_wakeups: dict[tuple[str, str], asyncio.Event] = defaultdict(asyncio.Event)
# Reconciles of all sweeps: a sweep holds a thread only while it reconciles.
_reconcile_pool = ThreadPoolExecutor(RECONCILE_WORKERS, thread_name_prefix="lorasweep-reconcile")
_api_pool = ThreadPoolExecutor(API_WORKERS, thread_name_prefix="lorasweep-api")
# Parameter importance (several fANOVA fits, seconds at 1,000 trials) runs here, off the
# reconcile: one computation at a time for all sweeps, at most one queued per sweep.
_importance_pool = ThreadPoolExecutor(1, thread_name_prefix="lorasweep-importance")


def _wake(namespace: str, sweep: str) -> None:
    _wakeups[(namespace, sweep)].set()


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
    # MLflow's client retries for minutes by default; an outage must delay results, not stall
    # every reconcile (and with it the creation of trials) behind those retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    # kopf logs every handled event at INFO; a 1,000-trial sweep makes thousands a minute.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    trial_defaults()  # a malformed LORASWEEP_DEFAULT_* variable stops the operator here
    memo.api = _kube_client()


@kopf.index("batch", "v1", "jobs", labels={LABEL_SWEEP: kopf.PRESENT})
def trial_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any):
    summary = job_summary(dict(body))
    return {(namespace, labels[LABEL_SWEEP]): summary} if summary else None


@kopf.index("", "v1", "pods", labels={LABEL_SWEEP: kopf.PRESENT})
def trial_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any):
    summary = pod_summary(dict(body))
    return {(namespace, labels[LABEL_SWEEP]): summary} if summary else None


_FETCH_LABELS = {LABEL_SWEEP: kopf.PRESENT, LABEL_MODEL_FETCH: kopf.PRESENT}


@kopf.index("batch", "v1", "jobs", labels=_FETCH_LABELS)
def model_fetch_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any):
    return {(namespace, labels[LABEL_SWEEP]): fetch_job_summary(dict(body))}


@kopf.index("", "v1", "pods", labels=_FETCH_LABELS)
def model_fetch_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any):
    return {(namespace, labels[LABEL_SWEEP]): fetch_pod_summary(dict(body))}


@kopf.index(GROUP, VERSION, PLURAL)
def sweep_summaries(namespace: str, name: str, body: kopf.Body, **_: Any):
    """Every sweep's phase and MLflow experiment: what a warm start reads of earlier sweeps."""
    return {(namespace, name): sweep_summary(dict(body))}


@dataclass(frozen=True)
class Indexes:
    """The kopf indexes of every sweep, its trial Jobs and their pods, for what a sweep reads
    of other sweeps (its warm start)."""

    sweeps: kopf.Index
    jobs: kopf.Index
    pods: kopf.Index


# The model download Job and its pods carry the sweep label too: their changes wake it.
@kopf.on.event("batch", "v1", "jobs", labels={LABEL_SWEEP: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_SWEEP: kopf.PRESENT})
async def trial_changed(namespace: str, labels: kopf.Labels, **_: Any) -> None:
    _wake(namespace, labels[LABEL_SWEEP])


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
    **_: Any,
) -> None:
    # An async daemon holds no thread while it waits: a sync one would hold one of kopf's
    # workers for the sweep's whole life, finished or not, and some 64 sweeps would take
    # them all and starve the indexers. Reconciles run in a pool of their own instead.
    # Trial labels carry label_value(name): sweep names may be longer than a label allows.
    key = (namespace, label_value(name))
    wakeup = _wakeups[key]
    reconciler = Reconciler(memo.api, logger)
    indexes = Indexes(sweeps=sweep_summaries, jobs=trial_jobs, pods=trial_pods)

    def reconcile() -> None:
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
        except Exception:
            logger.exception("reconcile of %s/%s failed; retrying", namespace, name)

    loop = asyncio.get_running_loop()
    try:
        while True:
            wakeup.clear()
            # kopf keeps its settings and logging context in context variables.
            context = contextvars.copy_context()
            reconciling = loop.run_in_executor(_reconcile_pool, context.run, reconcile)
            try:
                await asyncio.shield(reconciling)
            except asyncio.CancelledError:
                # Stopped mid-reconcile: let it end, so no creation it made goes unseen.
                await reconciling
                raise
            # A burst of trial events (a large sweep starting) is handled in one reconcile a
            # second, not one per event: each reconcile may patch the status.
            await asyncio.sleep(MIN_RECONCILE_INTERVAL)
            timeout = RESYNC_SECONDS
            if reconciler.deadline is not None:
                # The time budget ends sooner than the next resync: be there when it does.
                until = (reconciler.deadline - datetime.now(UTC)).total_seconds()
                timeout = max(0.5, min(timeout, until))
            # kopf cancels this wait when the sweep is deleted or the operator stops.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout)
    finally:
        _wakeups.pop(key, None)


class Reconciler:
    """One sweep's observe → plan → act → status loop. Its fields are caches, not state: a
    fresh Reconciler after a restart reaches the same decisions."""

    def __init__(self, api: client.ApiClient, logger: logging.Logger) -> None:
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.logger = logger
        self.tracker: SweepRuns | None = None
        self.results: dict[str, dict[str, Any]] = {}  # MLflow results of finished trials
        self.searched: set[str] = set()  # finished trials MLflow was already asked about
        self.created: dict[str, NewTrial] = {}  # created here, not yet seen in the index
        self.states: dict[str, TrialState] | None = None  # last seen, for Events
        self.parent_closed = False
        self.curves: dict[str, dict[str, Curve]] = {}  # final curves of finished trials
        self.marked: set[str] = set()  # stopped trials whose MLflow run says why
        self.deadline: datetime | None = None  # when the time budget runs out
        self.importance: ParameterImportance | None = None  # the last one computed
        self.importance_job: Future[ParameterImportance] | None = None
        self.importance_basis: tuple | None = None  # the scored trials it was asked for
        self.reported: tuple[int, str] | None = None  # (finished trials, phase) last reported
        self.reported_at = 0.0
        self.has_service = False  # the headless Service of multi-node trials exists
        self.registered: dict[str, str] = {}  # trial -> models:/ URI of its registered adapter
        self.released: set[str] = set()  # stopped trials whose Kueue Workload is deactivated
        self.waiting_reported = False  # the Event that trials wait for quota, this time round
        self.cluster_queue: str | None = None  # of spec.trainer.queueName, once read
        self.fetch_state: FetchState | None = None  # last seen, for Events
        # MLflow results of warm-start sweeps' trials, by sweep: read once (they have ended).
        self.warm_results: dict[str, dict[str, dict[str, Any]]] = {}
        self.warm_summary = ""  # last posted in a WarmStart Event

    def reconcile(
        self,
        body: kopf.Body,
        jobs: list[dict],
        pods: list[dict],
        fetch: ObservedFetch,
        indexes: Indexes,
    ) -> None:
        now = datetime.now(UTC)
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        generation = meta.get("generation")
        previous = _stored_status(body)
        sweep = SweepRef(name=name, namespace=namespace, uid=meta["uid"])
        try:
            raw_spec = trial_defaults().apply(_plain(body.get("spec") or {}))
            spec = validate_sweep(raw_spec, sweep)
        except SweepInvalid as error:
            self._refuse(body, error.reason, str(error), now, previous)
            return

        tracking_uri = spec.mlflow.tracking_uri if spec.mlflow else None
        tracking_uri = tracking_uri or os.environ.get(DEFAULT_TRACKING_URI_ENV)
        mlflow_status = previous.mlflow if previous and previous.mlflow else None
        tracker = self._tracker(tracking_uri)
        if tracker and not (mlflow_status and mlflow_status.parent_run_id):
            mlflow_status = self._parent_run(tracker, spec, name, namespace, meta["uid"])

        observed = self._observe(spec, name, jobs, pods, tracker, mlflow_status)
        warm = self._warm_start(spec, sweep, indexes)
        result = plan(
            spec,
            observed,
            now,
            sweep_name=name,
            generation=generation,
            previous=previous,
            fetch=fetch,
            warm=warm,
        )
        self.deadline = result.deadline
        status = result.status.model_copy(update={"mlflow": mlflow_status})
        if tracker and mlflow_status and status.best_trial and status.best_trial.mlflow_run_id:
            status = status.model_copy(
                update={
                    "best_trial": status.best_trial.model_copy(
                        update={
                            "url": tracker.run_url(
                                mlflow_status.experiment_id, status.best_trial.mlflow_run_id
                            )
                        }
                    )
                }
            )
        status = self._adapter(spec, sweep, status, tracker)
        try:
            self._act(sweep, body, spec, result, tracking_uri, mlflow_status)
        except RenderError as error:
            self._refuse(body, "InvalidTemplate", str(error), now, previous)
            return
        self._release_stopped(namespace, jobs, result.delete)
        self._waiting_event(body, spec, namespace, jobs, observed)
        if tracker:
            self._mark_stopped_runs(tracker, observed)
        self._trial_events(body, observed, previous, status)
        if spec.trainer.model_cache is not None:
            self._fetch_events(body, spec, fetch)
        if warm is not None:
            self._warm_events(body, warm, status, previous)
        status = self._report(sweep, spec, observed, status, tracker)
        self._patch_status(body, status, previous)
        if tracker and mlflow_status and status.phase in ("Succeeded", "Failed"):
            self._close_parent(tracker, mlflow_status, status)

    # --- observe ---------------------------------------------------------------------------

    def _tracker(self, uri: str | None) -> SweepRuns | None:
        if not uri:
            return None
        if self.tracker is None or self.tracker.uri != uri.rstrip("/"):
            self.tracker = SweepRuns(uri)
        return self.tracker

    def _parent_run(
        self, tracker: SweepRuns, spec: SweepSpec, name: str, namespace: str, uid: str
    ) -> MlflowStatus | None:
        experiment = experiment_name(
            namespace, name, spec.mlflow.experiment_name if spec.mlflow else None
        )
        try:
            experiment_id, run_id = tracker.ensure_parent_run(experiment, name, namespace, uid)
        except Exception as error:  # MLflow down: trials still run, results come later
            self.logger.warning("MLflow unreachable, will retry: %s", error)
            return None
        return MlflowStatus(
            experiment_id=experiment_id,
            parent_run_id=run_id,
            url=tracker.experiment_url(experiment_id),
        )

    def _observe(
        self,
        spec: SweepSpec,
        name: str,
        jobs: list[dict],
        pods: list[dict],
        tracker: SweepRuns | None,
        mlflow_status: MlflowStatus | None,
    ) -> list[ObservedTrial]:
        pods_by_trial: dict[str, list[dict]] = defaultdict(list)
        for pod in pods:
            pods_by_trial[pod["trial"]].append(pod)
        metric = spec.objective.metric
        observed = [
            observe_trial(job, pods_by_trial[job["name"]], metric, self.results.get(job["name"]))
            for job in jobs
        ]
        # A finished trial's final run data does not change: ask MLflow (one search for the
        # whole sweep) when trials finished without a run id or objective since the last ask.
        wanted = {
            t.name
            for t in observed
            if not t.state.active
            and (t.mlflow_run_id is None or (t.state == TrialState.SUCCEEDED and t.value is None))
        }
        if wanted - self.searched and tracker and mlflow_status and mlflow_status.experiment_id:
            try:
                self.results.update(tracker.trial_results(mlflow_status.experiment_id, name))
            except Exception as error:
                self.logger.warning("cannot read trial results from MLflow yet: %s", error)
            else:
                self.searched |= wanted
                observed = [
                    observe_trial(
                        job, pods_by_trial[job["name"]], metric, self.results.get(job["name"])
                    )
                    for job in jobs
                ]
        if spec.early_stopping and tracker:
            observed = self._with_curves(spec, name, observed, tracker, mlflow_status)
        # Jobs this reconciler created that the index has not shown yet: pending, not missing
        # (else the next reconcile would plan them again and exceed parallelism in its count).
        indexed = {job["name"] for job in jobs}
        self.created = {n: t for n, t in self.created.items() if n not in indexed}
        state = TrialState.QUEUED if spec.trainer.queue_name else TrialState.PENDING
        observed += [
            ObservedTrial(name=t.name, index=t.index, parameters=t.parameters, state=state)
            for t in self.created.values()
        ]
        return observed

    def _with_curves(
        self,
        spec: SweepSpec,
        name: str,
        observed: list[ObservedTrial],
        tracker: SweepRuns,
        mlflow_status: MlflowStatus | None,
    ) -> list[ObservedTrial]:
        """Intermediate objective values from MLflow (one bulk read per 100 runs per metric),
        for early stopping. A finished trial's curve is read once more after it ends, then
        kept."""
        experiment_id = mlflow_status.experiment_id if mlflow_status else None
        if experiment_id and any(t.state.active and t.name not in self.results for t in observed):
            try:
                self.results.update(tracker.trial_results(experiment_id, name))
            except Exception as error:
                self.logger.warning("cannot read trial runs from MLflow yet: %s", error)
        wanted = {
            t.name: self.results[t.name]["run_id"]
            for t in observed
            if t.name in self.results and t.name not in self.curves
        }
        if not wanted:
            return [t.model_copy(update={"curves": self.curves.get(t.name, {})}) for t in observed]
        metrics = {spec.objective.metric, *(m.name for m in spec.objective.metrics or [])}
        fetched: dict[str, dict[str, Curve]] = defaultdict(dict)
        try:
            for metric in sorted(metrics):
                by_run = tracker.intermediate_values(list(wanted.values()), metric)
                for trial, run_id in wanted.items():
                    fetched[trial][metric] = by_run.get(run_id, [])
        except Exception as error:
            self.logger.warning("cannot read intermediate values from MLflow yet: %s", error)
        updated = []
        for trial in observed:
            curves = self.curves.get(trial.name) or fetched.get(trial.name, {})
            if trial.name in fetched and not trial.state.active:
                self.curves[trial.name] = curves
            updated.append(trial.model_copy(update={"curves": curves}))
        return updated

    def _warm_start(self, spec: SweepSpec, sweep: SweepRef, indexes: Indexes) -> WarmStart | None:
        """The warm-start history of spec.algorithm.warmStart, from the indexes (and MLflow for
        results no pod holds any more); None without a warm start."""
        if spec.algorithm.warm_start is None:
            return None
        sources = [
            self._warm_source(spec, sweep.namespace, name, indexes)
            for name in spec.algorithm.warm_start.sweeps
        ]
        others = [n for ns, n in indexes.sweeps if ns == sweep.namespace and n != sweep.name]
        return warm_start(spec, sources, others)

    def _warm_source(self, spec: SweepSpec, namespace: str, name: str, indexes: Indexes) -> Source:
        """One earlier sweep's trials, observed as the sweep's own are, scored by this sweep's
        objective."""
        summaries = list(indexes.sweeps.get((namespace, name), []))
        if not summaries:
            return Source(name=name, phase=None)
        summary = summaries[0]
        key = (namespace, label_value(name))
        jobs = list(indexes.jobs.get(key, []))
        pods_by_trial: dict[str, list[dict]] = defaultdict(list)
        for pod in indexes.pods.get(key, []):
            pods_by_trial[pod["trial"]].append(pod)
        metric = spec.objective.metric

        def observe(results: dict[str, dict[str, Any]]) -> list[ObservedTrial]:
            return [
                observe_trial(job, pods_by_trial[job["name"]], metric, results.get(job["name"]))
                for job in jobs
            ]

        trials = observe(self.warm_results.get(name, {}))
        # A result that is in no pod (deleted pods) may be in MLflow: asked once, after the
        # sweep ended, when its results are final.
        unscored = any(
            t.state == TrialState.SUCCEEDED and objective_values(spec, t) is None for t in trials
        )
        uri = summary["tracking_uri"] or os.environ.get(DEFAULT_TRACKING_URI_ENV)
        experiment = summary["experiment_id"]
        ended = summary["phase"] in ENDED
        if ended and unscored and name not in self.warm_results and uri and experiment:
            try:
                self.warm_results[name] = SweepRuns(uri).trial_results(experiment, name)
            except Exception as error:
                return Source(
                    name=name,
                    phase=summary["phase"],
                    unreadable=f"cannot read its trials' results from MLflow yet: {error}",
                )
            trials = observe(self.warm_results[name])
        return Source(name=name, phase=summary["phase"], trials=trials)

    def _warm_events(
        self, body: kopf.Body, warm: WarmStart, status: SweepStatus, previous: SweepStatus | None
    ) -> None:
        """A WarmStart Event saying which earlier trials TPE starts from (again when that
        changes), and a warning when the sweep fails for a missing sweep."""
        reason = next((c.reason for c in status.conditions if c.status == "True"), None)
        if reason == NOT_FOUND and not (previous and previous.phase == "Failed"):
            kopf.warn(body, reason=NOT_FOUND, message=status.message[:1000])
        if warm.summary and warm.summary != self.warm_summary:
            kopf.event(body, type="Normal", reason="WarmStart", message=warm.summary[:1000])
            self.warm_summary = warm.summary

    # --- act -------------------------------------------------------------------------------

    def _act(
        self,
        sweep: SweepRef,
        body: kopf.Body,
        spec: SweepSpec,
        result: Plan,
        tracking_uri: str | None,
        mlflow_status: MlflowStatus | None,
    ) -> None:
        parent = mlflow_status.parent_run_id if mlflow_status else None
        if result.fetch_model:
            self._create_fetch_job(sweep, body, spec)
        if result.create:
            self._ensure_service(sweep, spec)
        created: list[bool] = []
        # A few hundred rendered Jobs at a time: 10,000 of them at once hold about 140 MiB.
        for start in range(0, len(result.create), CREATE_CHUNK):
            chunk = result.create[start : start + CREATE_CHUNK]
            jobs = [
                render_trial_job(
                    sweep, spec, trial, tracking_uri=tracking_uri, parent_run_id=parent
                )
                for trial in chunk
            ]
            created += _api_pool.map(lambda job: self._create_job(sweep.namespace, job), jobs)
            self.created.update({trial.name: trial for trial in chunk})
        _post_events(
            body,
            [
                TrialEvent("TrialCreated", trial.name, _format_params(trial.parameters))
                for trial, was_created in zip(result.create, created, strict=True)
                if was_created
            ],
        )
        queued = bool(spec.trainer.queue_name)
        list(
            _api_pool.map(
                lambda job: self._stop_job(
                    sweep.namespace, job, result.stop_reasons.get(job), queued
                ),
                result.delete,
            )
        )

    def _ensure_service(self, sweep: SweepRef, spec: SweepSpec) -> None:
        """The headless Service that gives the pods of multi-node trials their DNS names for
        the rendezvous: one per sweep, owned by it, created before its first trial."""
        service = render_trial_service(sweep, spec)
        if service is None or self.has_service:
            return
        try:
            self.core.create_namespaced_service(sweep.namespace, service, _preload_content=False)
        except ApiException as error:
            if error.status != 409:  # created before a restart
                raise
        self.has_service = True

    def _create_fetch_job(self, sweep: SweepRef, body: kopf.Body, spec: SweepSpec) -> None:
        """The Job that downloads the model into spec.trainer.modelCache, before any trial."""
        job = render_model_fetch_job(sweep, spec)
        if job is None or not self._create_job(sweep.namespace, job):
            return
        cache = spec.trainer.model_cache
        claim = cache.claim_name if cache else ""
        detail = f"downloading model {spec.trainer.model} into PersistentVolumeClaim {claim}"
        _post_events(body, [TrialEvent("FetchingModel", job["metadata"]["name"], detail)])

    def _fetch_events(self, body: kopf.Body, spec: SweepSpec, fetch: ObservedFetch) -> None:
        """Events when the model download ends (the one at its start comes with its Job)."""
        before, self.fetch_state = self.fetch_state, fetch.state
        if before is None or before == fetch.state:
            return
        name = model_fetch_name(body["metadata"]["name"])
        if fetch.state == FetchState.SUCCEEDED:
            event = TrialEvent("ModelFetched", name, f"model {spec.trainer.model} is on the claim")
        elif fetch.state == FetchState.FAILED:
            event = TrialEvent("ModelFetchFailed", name, fetch.message, "Warning")
        else:
            return
        _post_events(body, [event])

    def _create_job(self, namespace: str, job: dict) -> bool:
        try:
            # The reply is not needed; decoding it into models costs more than the request.
            self.batch.create_namespaced_job(namespace, job, _preload_content=False)
        except ApiException as error:
            if error.status == 409:  # created before a restart, or not yet in the index
                return False
            raise
        return True

    def _stop_job(self, namespace: str, name: str, reason: str | None, queued: bool) -> None:
        """Stop a trial: suspending its Job ends its pod (SIGTERM, then the grace period), and
        the annotation keeps it observed as pruned, so it is never planned again.

        Kueue owns the suspension of a queued Job (it would undo ours): such a Job only gets
        the annotation here, and _release_stopped has Kueue suspend it for good."""
        patch: dict[str, Any] = {
            "metadata": {"annotations": {ANNOTATION_STOPPED: reason or "stopped by the operator"}}
        }
        if not queued:
            patch["spec"] = {"suspend": True}
        try:
            self.batch.patch_namespaced_job(name, namespace, patch, _preload_content=False)
        except ApiException as error:
            if error.status != 404:
                raise

    def _release_stopped(self, namespace: str, jobs: list[dict], stopping: list[str]) -> None:
        """Deactivate the Kueue Workload of each stopped trial (spec.active: false): Kueue
        then suspends its Job, frees its quota and never admits it again. Once per trial and
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

    def _waiting_event(
        self,
        body: kopf.Body,
        spec: SweepSpec,
        namespace: str,
        jobs: list[dict],
        observed: list[ObservedTrial],
    ) -> None:
        """One Event when trials start waiting for quota, naming the ClusterQueue: Kueue tried
        their Workloads and reserved nothing (a Job it has not looked at yet is not waiting)."""
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

    def _adapter(
        self, spec: SweepSpec, sweep: SweepRef, status: SweepStatus, tracker: SweepRuns | None
    ) -> SweepStatus:
        """Where the best trial's adapter is: an artifact of its MLflow run and, once the sweep
        has succeeded with spec.mlflow.registeredModel, that model's version registered here."""
        best = status.best_trial
        run = self.results.get(best.name) if best else None
        if best is None or run is None or not run.get("adapter"):
            return status
        uri = f"runs:/{run['run_id']}/{run['adapter']}"
        model = spec.mlflow.registered_model if spec.mlflow else None
        if model and tracker and status.phase == "Succeeded" and best.name not in self.registered:
            tags = {TAG_SWEEP: sweep.name, TAG_NAMESPACE: sweep.namespace, TAG_TRIAL: best.name}
            try:
                self.registered[best.name] = tracker.register_adapter(
                    model, run["run_id"], run["adapter"], tags
                )
            except Exception as error:
                self.logger.warning("cannot register the best adapter in MLflow yet: %s", error)
        uri = self.registered.get(best.name, uri)
        return status.model_copy(
            update={"best_trial": best.model_copy(update={"adapter_uri": uri})}
        )

    def _mark_stopped_runs(self, tracker: SweepRuns, observed: list[ObservedTrial]) -> None:
        """Tag the MLflow run of each stopped trial with why (once its Job shows the stop: a
        trial that completed just as it was stopped stays a success)."""
        for trial in observed:
            run = self.results.get(trial.name)
            if trial.state != TrialState.PRUNED or run is None or trial.name in self.marked:
                continue
            try:
                tracker.mark_stopped(run["run_id"], trial.message or "stopped by the operator")
            except Exception as error:
                self.logger.warning("cannot mark %s stopped in MLflow yet: %s", trial.name, error)
                return
            self.marked.add(trial.name)

    def _refuse(
        self,
        body: kopf.Body,
        reason: str,
        message: str,
        now: datetime,
        previous: SweepStatus | None,
    ) -> None:
        status = failed_status(
            reason, message, now, generation=body["metadata"].get("generation"), previous=previous
        )
        if self._patch_status(body, status, previous):
            kopf.warn(body, reason=reason, message=message)

    def _patch_status(
        self, body: kopf.Body, status: SweepStatus, previous: SweepStatus | None
    ) -> bool:
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

    def _trial_events(
        self,
        body: kopf.Body,
        observed: list[ObservedTrial],
        previous: SweepStatus | None,
        status: SweepStatus,
    ) -> None:
        events: list[TrialEvent] = []
        if self.states is not None:
            metric = body["spec"]["objective"]["metric"]
            for trial in observed:
                if self.states.get(trial.name) == trial.state:
                    continue
                if trial.state == TrialState.RUNNING:
                    events.append(TrialEvent("TrialStarted", trial.name, "running"))
                elif trial.state == TrialState.SUCCEEDED:
                    value = "no objective" if trial.value is None else f"{metric}={trial.value:g}"
                    events.append(TrialEvent("TrialSucceeded", trial.name, value))
                elif trial.state == TrialState.FAILED:
                    events.append(
                        TrialEvent("TrialFailed", trial.name, trial.message or "failed", "Warning")
                    )
                elif trial.state == TrialState.INFEASIBLE:
                    detail = "ran out of GPU memory: " + (trial.message or "exit code 4")
                    events.append(TrialEvent("TrialInfeasible", trial.name, detail, "Warning"))
                elif trial.state == TrialState.PRUNED:
                    events.append(TrialEvent("TrialStopped", trial.name, trial.message))
                elif trial.state == TrialState.QUEUED and trial.name in self.states:
                    detail = "suspended by Kueue (preempted); it waits for quota to run again"
                    events.append(TrialEvent("TrialRequeued", trial.name, detail))
        self.states = {t.name: t.state for t in observed}
        best, before = status.best_trial, previous.best_trial if previous else None
        if best is not None and (before is None or before.name != best.name):
            detail = f"{best.value:g} with {_format_params(best.parameters)}"
            events.append(TrialEvent("NewBestTrial", best.name, detail))
        _post_events(body, events)

    def _report(
        self,
        sweep: SweepRef,
        spec: SweepSpec,
        observed: list[ObservedTrial],
        status: SweepStatus,
        tracker: SweepRuns | None,
    ) -> SweepStatus:
        """best_config.yaml, trials_summary.csv, importance.csv, sensitivity.csv and
        correlations.csv in the ConfigMap `<sweep>-report`, those and the plots as artifacts of
        the parent run, parameter importance there and in status. Refreshed as trials finish
        (at most every REPORT_INTERVAL_SECONDS), and once more when the sweep ends.

        Importance is computed in the background from the trials of a report and published
        with the next one; its status field keeps the last one computed (the stored one after
        a restart, until the first computation ends)."""
        self._collect_importance()
        finished = sum(not t.state.active for t in observed)
        terminal = status.phase in ("Succeeded", "Failed")
        due = terminal or time.monotonic() - self.reported_at >= REPORT_INTERVAL_SECONDS
        if finished and (finished, status.phase) != self.reported and due:
            try:
                self._publish_report(sweep, spec, observed, status, tracker)
            except Exception as error:
                self.logger.warning("cannot publish the sweep report yet: %s", error)
            else:
                self.reported = (finished, status.phase)
                self.reported_at = time.monotonic()
                self._start_importance(spec, observed)
        if self.importance is None:
            return status
        shown = self.importance.model_copy(
            update={"parameters": self.importance.parameters[:IMPORTANCE_IN_STATUS]}
        )
        return status.model_copy(update={"parameter_importance": shown})

    def _start_importance(self, spec: SweepSpec, observed: list[ObservedTrial]) -> None:
        """Ask the background pool for the importance of these trials, unless it is computing
        one already or was asked for the same scored trials before."""
        score = scorer(spec, observed)
        basis = tuple((t.name, score.value(t)) for t in observed if t.state == TrialState.SUCCEEDED)
        if self.importance_job is not None or basis == self.importance_basis:
            return
        self.importance_basis = basis
        self.importance_job = _importance_pool.submit(parameter_importance, spec, observed)

    def _collect_importance(self) -> None:
        """Take a finished importance computation; the report is published again with it."""
        job = self.importance_job
        if job is None or not job.done():
            return
        self.importance_job = None
        try:
            self.importance = job.result()
        except Exception as error:
            self.logger.warning("cannot compute parameter importance: %s", error)
            self.importance_basis = None  # asked again with the next report
            return
        self.reported = None

    def _publish_report(
        self,
        sweep: SweepRef,
        spec: SweepSpec,
        observed: list[ObservedTrial],
        status: SweepStatus,
        tracker: SweepRuns | None,
    ) -> None:
        files: dict[str, str | bytes] = {
            "best_config.yaml": best_config_yaml(spec, status.best_trial, sweep_name=sweep.name),
            "trials_summary.csv": trials_summary_csv(spec, observed),
            "importance.csv": importance_csv(self.importance),
            "sensitivity.csv": sensitivity_csv(spec, observed),
            "correlations.csv": correlations_csv(spec, observed),
        }
        configmap = {
            "metadata": {
                "name": f"{sweep.name}-report",
                "labels": {LABEL_SWEEP: label_value(sweep.name)},
                "ownerReferences": [sweep.owner_reference()],
            },
            "data": files,
        }
        try:
            self.core.create_namespaced_config_map(
                sweep.namespace, configmap, _preload_content=False
            )
        except ApiException as error:
            if error.status != 409:
                raise
            self.core.patch_namespaced_config_map(
                f"{sweep.name}-report", sweep.namespace, {"data": files}, _preload_content=False
            )
        parent = status.mlflow.parent_run_id if status.mlflow else None
        if tracker and parent:
            if not spec.early_stopping:  # with it, the trials have their curves already
                observed = self._with_curves(spec, sweep.name, observed, tracker, status.mlflow)
            best = status.best_trial.name if status.best_trial else None
            files["optimization_plot.png"] = optimization_plot_png(spec, observed)
            files["learning_curves.png"] = learning_curves_png(spec, observed, best)
            shares = self.importance.parameters if self.importance else []
            tracker.log_report(parent, files, {share.name: share.percent for share in shares})

    def _close_parent(
        self, tracker: SweepRuns, mlflow_status: MlflowStatus, status: SweepStatus
    ) -> None:
        if self.parent_closed or not mlflow_status.parent_run_id:
            return
        best = status.best_trial.model_dump() if status.best_trial else None
        try:
            tracker.close_parent_run(mlflow_status.parent_run_id, best, status.phase)
        except Exception as error:
            self.logger.warning("cannot close the MLflow parent run yet: %s", error)
            return
        self.parent_closed = True


@dataclass(frozen=True)
class TrialEvent:
    reason: str
    trial: str
    detail: str
    type: str = "Normal"


def _post_events(body: kopf.Body, events: list[TrialEvent]) -> None:
    """Kubernetes Events on the sweep: one per trial, or one per reason for a burst (a large
    sweep starting at once must not cost the apiserver an Event per trial)."""
    by_reason: dict[str, list[TrialEvent]] = defaultdict(list)
    for event in events:
        by_reason[event.reason].append(event)
    for reason, group in by_reason.items():
        if len(group) <= EVENT_BURST:
            for event in group:
                message = f"{event.trial}: {event.detail}"[:1000]
                kopf.event(body, type=event.type, reason=reason, message=message)
        else:
            names = [e.trial for e in group]
            message = f"{len(group)} trials: {', '.join(names[:3])}, ..., {names[-1]}"
            kopf.event(body, type=group[0].type, reason=reason, message=message)


def _stored_status(body: kopf.Body) -> SweepStatus | None:
    stored = body.get("status")
    if not stored:
        return None
    try:
        return SweepStatus.model_validate(dict(stored))
    except ValidationError:
        return None


def _plain(value: Any) -> Any:
    """kopf's live body views as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _format_params(parameters: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in parameters.items())

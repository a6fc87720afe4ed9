"""The operator at scale on the dev cluster (started if needed), on simulated GPU nodes.

Three measurements, one JSON line each (`--mode`):

fanout (default): how fast the operator fans a large sweep out into Jobs, against a plain
    client doing the same in the same run. The Job controller (kube-controller-manager) is
    paused during both, so that neither pays for pods: on 2 cores, starting 10,000 pods takes
    the machine for most of an hour and would measure the cluster, not the operator.
    1. baseline: a plain client creates the trial Jobs the sweep would render, 16 requests in
    flight (the operator's own concurrency), into a namespace of its own; 2. operator: `kopf
    run` of the operator watching another namespace; a grid sweep of `--trials` trials, all in
    parallel, is applied, and the clock stops when the last Job exists. Then the Job
    controller starts again and makes the pods (up to `--settle` seconds; the operator indexes
    every one of them and reconciles on their events). Counted at the end: the operator's API
    requests per trial (from the apiserver's audit log, which records only the operator's
    identity), its peak resident memory, the sweep's status size.
turnover: the GPU idle gap. Sweeps of parallelism P (`--parallelism`, e.g. 8,1000) whose trials
    run 20-60 s (P >= 100) or 2-6 s (or `--trial-seconds LOW-HIGH`), so they end one after
    another (at P=1000, 25 a second with 20-60 s): the time from a trial's
    Job completing (its Complete condition, as a watch sees it) to the next trial's pod being
    created, p50 and p99; and the operator's part of it, to the next trial's Job being created
    (the Job controller makes the pod). Gaps count once all P slots are filled: trials that end
    during the ramp-up (the first P Jobs take ~25 s at P=1000 on 2 cores, and trials last 20 s)
    are counted apart, with the ramp-up's length. Also: the operator's CPU time and API
    requests per trial, and the share of the machine's CPU that was busy during each run
    (`machine_busy_share`; the rest of the machine, the bench's helpers included, counts too).
    The baseline, run first in a namespace of its own: the same trial Jobs, created by a plain
    client the moment a watch sees one complete, its idle gap on the same cluster (what the Job
    controller, the apiserver and the simulated nodes take, on cores the bench shares; it
    logs no MLflow runs).
    With `--mlflow`, the sweep tracks to the dev cluster's MLflow, and the bench logs each
    trial's run as a trainer would (created when its Job appears, ended with its metric when
    it completes): the operator then looks up thousands of runs as trials end. With
    `--early-stopping` too, the sweep stops trials by the median rule, and each run logs a
    learning curve as it is created: the operator then also reads every running trial's
    curve every 2 s. The curves are all alike, so the rule stops none and turnover is as
    without it: what is measured is the cost of reading them.
sweeps: many sweeps on one operator. `--sweeps` N sweeps: half of them one-trial sweeps that
    have finished, then the rest, each running 20 trials 4 at a time: the time until all have
    finished, and the longest any of them waited for its first trial.

    .venv/bin/python bench/operator_scale.py [--mode fanout --trials 1000]
    .venv/bin/python bench/operator_scale.py --mode turnover --parallelism 8,1000 \
        [--trial-seconds 60-180] [--mlflow [--early-stopping]]
    .venv/bin/python bench/operator_scale.py --mode sweeps --sweeps 100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import urllib3
from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines
from mlflow import MlflowClient
from mlflow.entities import Metric

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import devcluster  # noqa: E402
from devcluster.operator_process import OperatorProcess, release_sweeps  # noqa: E402
from lora_trainer.contract import TAG_SWEEP, TAG_TRIAL  # noqa: E402
from sweep_operator.api import GROUP, PLURAL, VERSION, SweepSpec  # noqa: E402
from sweep_operator.naming import trial_name  # noqa: E402
from sweep_operator.render import SweepRef, render_trial_job  # noqa: E402
from sweep_operator.trials import LABEL_SWEEP, NewTrial  # noqa: E402
from tests.e2e.sweeps import sweep_manifest  # noqa: E402
from tests.support import wait_for  # noqa: E402
from tests.unit.sweep_helpers import trial_parameters  # noqa: E402

GPUS_PER_NODE = 100
CONCURRENCY = 16
SETTLE_SECONDS = 10  # after the last pod: the reconciles its events cause
CURVE_STEPS = 5  # points of each run's curve, with --early-stopping


def bench_nodes(gpus: int) -> dict[str, int]:
    return {f"bench-gpu-{i}": GPUS_PER_NODE for i in range(math.ceil(gpus / GPUS_PER_NODE))}


def sweep_spec(trials: int, parallelism: int, annotations: dict[str, str]) -> dict:
    return {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "algorithm": {"name": "grid"},
        # Two parameters: one may list at most 1,000 values.
        "parameters": {
            "lora_rank": {"values": list(range(1, 101))},
            "lora_alpha": {"values": list(range(1, math.ceil(trials / 100) + 1))},
        },
        "maxTrials": trials,
        "parallelism": parallelism,
        "trainer": {
            "image": "lorasweep-bench",
            "command": ["train"],
            "nodeSelector": {"lorasweep.io/node-mode": "sim"},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "podAnnotations": annotations,
        },
    }


def create_namespace(core: client.CoreV1Api, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: devcluster.has_default_service_account(core, name), 30, "ServiceAccount")
    return name


def delete_namespace(batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str) -> None:
    """Delete a namespace with its Jobs. Deleting the namespace alone leaves the Jobs and their
    simulated pods in place; deleting 10,000 Jobs outlasts a request (504), and goes on."""

    def deleted() -> bool:
        try:
            batch.delete_collection_namespaced_job(namespace, propagation_policy="Background")
            return count(batch.list_namespaced_job, namespace) == 0
        except (client.exceptions.ApiException, urllib3.exceptions.HTTPError) as error:
            print(f"deleting the Jobs of {namespace}: {error}; again", file=sys.stderr)
            return False

    wait_for(deleted, 600, f"the Jobs of {namespace} to be deleted", interval=5)
    with contextlib.suppress(client.exceptions.ApiException):
        core.delete_namespace(namespace)


def count(list_call: Any, namespace: str) -> int:
    """How many objects a namespaced list call finds (the namespace's Jobs or pods).

    One item and the count of the rest: polling must not load the apiserver it measures
    (the baseline's clock needs no polling at all). The apiserver counts the rest only for
    a list without selectors; the namespace holds nothing but the sweep's objects."""
    page = list_call(namespace, limit=1)
    return len(page.items) + (page.metadata.remaining_item_count or 0)


def plain_jobs(spec: dict, namespace: str, trials: int) -> list[dict]:
    """The trial Jobs the sweep would render, for a plain client to create in `namespace`."""
    parsed = SweepSpec.model_validate(spec)
    sweep = SweepRef(name="baseline", namespace=namespace, uid=str(uuid.uuid4()))
    jobs = []
    for index in range(trials):
        trial = NewTrial(
            index=index,
            name=trial_name("baseline", index),
            parameters=trial_parameters(parsed, index),
        )
        job = render_trial_job(sweep, parsed, trial)
        # No owner: the garbage collector would delete Jobs of a sweep that does not exist.
        del job["metadata"]["ownerReferences"]
        jobs.append(job)
    return jobs


def baseline(batch: client.BatchV1Api, namespace: str, spec: dict, trials: int) -> float:
    jobs = plain_jobs(spec, namespace, trials)
    for job in jobs:
        # Suspended: no pods, so the cluster is as quiet after the baseline as before it.
        job["spec"]["suspend"] = True
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda job: batch.create_namespaced_job(namespace, job), jobs))
    return time.monotonic() - started


def operator_requests(offset: int) -> int:
    with devcluster.AUDIT_LOG.open() as log:
        log.seek(offset)
        return sum(1 for line in log if '"lorasweep-operator"' in line)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[int, int]:
    """The machine's busy and total CPU time so far, all cores (/proc/stat, in ticks)."""
    ticks = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return sum(ticks) - idle, sum(ticks)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the machine's CPU time that was busy between two `machine_cpu()`."""
    return round((after[0] - before[0]) / (after[1] - before[1]), 2)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


@dataclass
class Bench:
    api: client.ApiClient
    core: client.CoreV1Api
    batch: client.BatchV1Api
    custom: client.CustomObjectsApi
    namespace: str  # the operator's
    operator: OperatorProcess

    def phases(self) -> dict[str, str | None]:
        listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        return {s["metadata"]["name"]: s.get("status", {}).get("phase") for s in listed["items"]}

    def apply(self, name: str, spec: dict) -> None:
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, sweep_manifest(name, spec)
        )


def fanout(bench: Bench, trials: int, settle: float) -> dict:
    # Trials outlive the benchmark: it measures fan-out, not completion.
    spec = sweep_spec(trials, trials, {"lorasweep.io/sim-duration": "60m"})
    timeout = 60 + trials / 10
    cluster = devcluster.Cluster.load()
    assert cluster is not None
    base_ns = create_namespace(bench.core, "bench-baseline")  # its ServiceAccount needs them
    try:
        paused = devcluster.stop_process(cluster, "kube-controller-manager", crash=False)
    except BaseException:
        delete_namespace(bench.batch, bench.core, base_ns)
        raise
    try:
        try:
            baseline_seconds = baseline(bench.batch, base_ns, spec, trials)
        finally:
            delete_namespace(bench.batch, bench.core, base_ns)
        bench.operator.start()
        audit_offset = devcluster.AUDIT_LOG.stat().st_size
        started = time.monotonic()
        bench.apply("scale", spec)
        wait_for(
            lambda: count(bench.batch.list_namespaced_job, bench.namespace) == trials,
            timeout,
            f"{trials} Jobs",
            interval=0.1,
        )
        operator_seconds = time.monotonic() - started
    finally:
        devcluster.start_process(cluster, paused)
    # The reconciles that follow the fan-out count too (status, Events, the pods' events).
    settled = time.monotonic()
    with contextlib.suppress(AssertionError):  # wait_for's timeout: the pods came slower
        wait_for(
            lambda: count(bench.core.list_namespaced_pod, bench.namespace) == trials,
            settle,
            "pods",
            interval=2,
        )
    time.sleep(SETTLE_SECONDS)
    settle_seconds = time.monotonic() - settled
    requests = operator_requests(audit_offset)
    pods = count(bench.core.list_namespaced_pod, bench.namespace)
    sweep = bench.custom.get_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, PLURAL, "scale"
    )
    return {
        "trials": trials,
        "baseline_seconds": round(baseline_seconds, 2),
        "operator_seconds": round(operator_seconds, 2),
        "ratio_operator_to_baseline": round(operator_seconds / baseline_seconds, 2),
        "operator_requests_per_trial": round(requests / trials, 2),
        "operator_peak_rss_mib": round(peak_rss_mib(bench.operator.pid), 1),
        "status_bytes": len(json.dumps(sweep.get("status", {}))),
        "settle_seconds": round(settle_seconds),
        "pods_at_the_end": pods,
    }


class TrialRuns:
    """Each trial's MLflow run, as the trainer would log it: created when its Job appears,
    ended with its objective when the Job completes (in a pool, off the watch)."""

    def __init__(self, uri: str, experiment: str, sweep: str, curves: bool) -> None:
        # Ending a run prints a link to it: 2,000 lines around the one JSON line of the bench.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self.client.create_experiment(experiment)
        self.sweep = sweep
        self.curves = curves
        self.run_ids: dict[str, str] = {}
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="bench-mlflow")

    def started(self, trial: str) -> None:
        self.pool.submit(self._create, trial)

    def ended(self, trial: str) -> None:
        self.pool.submit(self._end, trial)

    def _create(self, trial: str) -> None:
        tags = {TAG_SWEEP: self.sweep, TAG_TRIAL: trial}
        run = self.client.create_run(self.experiment_id, run_name=trial, tags=tags)
        if self.curves:  # one request: the same curve for every trial, which stops none
            now = int(time.time() * 1000)
            points = [Metric("eval_loss", 0.5, now, step) for step in range(1, CURVE_STEPS + 1)]
            self.client.log_batch(run.info.run_id, metrics=points)
        self.run_ids[trial] = run.info.run_id

    def _end(self, trial: str) -> None:
        if trial in self.run_ids:
            self.client.log_metric(self.run_ids[trial], "eval_loss", 0.5)
            self.client.set_terminated(self.run_ids[trial])

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class Listener(Protocol):
    """What is told of each trial Job as a watch first sees it created, and then complete."""

    def started(self, trial: str) -> None: ...

    def ended(self, trial: str) -> None: ...


class Stamps:
    """When a watch first saw each trial Job of `namespace` created, each Job complete and
    each pod created; `listener` is told of each Job as it starts and ends."""

    def __init__(self, bench: Bench, namespace: str, listener: Listener | None = None) -> None:
        self.bench = bench
        self.namespace = namespace
        self.listener = listener
        self.jobs: dict[str, float] = {}
        self.pods: dict[str, float] = {}
        self.completed: dict[str, float] = {}
        self.stopped = threading.Event()
        self.threads = [
            threading.Thread(target=self._watch_pods, daemon=True),
            threading.Thread(target=self._watch_jobs, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _stream(self, list_call: Any, record: Any) -> None:
        """Raw events, resumed where the last watch ended. A new watch without a version would
        replay every existing object, and decoding events into the client's models costs ~ms
        each: at 25 trials ending a second the stamps fell seconds behind the cluster."""
        version = None
        while not self.stopped.is_set():
            reply = list_call(
                self.namespace,
                watch=True,
                timeout_seconds=5,
                resource_version=version,
                allow_watch_bookmarks=True,
                _preload_content=False,
            )
            for line in iter_resp_lines(reply):
                event = json.loads(line)
                if event["type"] == "ERROR":  # the version is too old: start again
                    version = None
                    break
                version = event["object"]["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    record(event["type"], event["object"], time.monotonic())
                if self.stopped.is_set():
                    return

    def _watch_pods(self) -> None:
        def record(kind: str, pod: dict, now: float) -> None:
            if kind == "ADDED":
                self.pods.setdefault(pod["metadata"]["name"], now)

        self._stream(self.bench.core.list_namespaced_pod, record)

    def _watch_jobs(self) -> None:
        def record(kind: str, job: dict, now: float) -> None:
            name = job["metadata"]["name"]
            if kind == "ADDED" and name not in self.jobs:
                self.jobs[name] = now
                if self.listener:
                    self.listener.started(name)
            conditions = job.get("status", {}).get("conditions", [])
            complete = any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)
            if complete and name not in self.completed:
                self.completed[name] = now
                if self.listener:
                    self.listener.ended(name)

        self._stream(self.bench.batch.list_namespaced_job, record)

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(10)

    def gaps(self, created: dict[str, float], parallelism: int) -> tuple[list[float], int]:
        """The k-th completion frees the slot the (P+k)-th trial fills (`created`: its Job
        or its pod): the gaps from the moment all P slots were filled, and how many trials
        ended before that. Those ended during the ramp-up: slots were still empty, and the
        (P+k)-th trial waits for the first P to be created, not for the operator to notice."""
        completions = sorted(self.completed.values())
        ordered = sorted(created.values())
        filled = ordered[parallelism - 1]
        pairs = list(zip(completions, ordered[parallelism:], strict=False))
        steady = [made - done for done, made in pairs if done >= filled]
        return steady, len(pairs) - len(steady)


class PlainTurnover:
    """The baseline of the idle gap: a plain client that creates the next trial Job the moment
    a watch sees one complete (no status, no Events, no planning), P at a time."""

    def __init__(self, batch: client.BatchV1Api, namespace: str, jobs: list[dict]) -> None:
        self.batch = batch
        self.namespace = namespace
        self.waiting = iter(jobs)
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="bench-plain")
        self.errors: list[Exception] = []

    def fill(self, slots: int) -> None:
        for _ in range(slots):
            self.ended("")

    def started(self, trial: str) -> None:
        pass

    def ended(self, trial: str) -> None:
        with self.lock:
            job = next(self.waiting, None)
        if job is not None:
            self.pool.submit(self._create, job)

    def _create(self, job: dict) -> None:
        """As the operator creates a Job: the reply is not decoded into models."""
        try:
            reply = self.batch.create_namespaced_job(self.namespace, job, _preload_content=False)
            reply.drain_conn()
            reply.release_conn()
        except Exception as error:  # the baseline would wait for a Job that never comes
            self.errors.append(error)

    def all_ended(self, completed: int, trials: int) -> bool:
        if self.errors:
            raise RuntimeError(f"the baseline could not create a Job: {self.errors[0]}")
        return completed == trials

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def plain_turnover(
    bench: Bench, spec: dict, parallelism: int, trials: int, longest: float
) -> tuple[list[float], float]:
    """The idle gaps of the same turnover made by PlainTurnover in a namespace of its own,
    deleted with its pods before the operator's run, and the machine's busy share meanwhile;
    `longest`: the longest trial's seconds."""
    namespace = create_namespace(bench.core, "bench-baseline")
    plain = PlainTurnover(bench.batch, namespace, plain_jobs(spec, namespace, trials))
    stamps = Stamps(bench, namespace, plain)
    try:
        cpu_before = machine_cpu()
        plain.fill(parallelism)
        wait_for(
            lambda: plain.all_ended(len(stamps.completed), trials),
            120 + 5 * trials * longest / parallelism,
            f"the baseline's {trials} Jobs to complete",
            interval=2,
        )
        busy = busy_share(cpu_before, machine_cpu())
    finally:
        stamps.stop()
        plain.close()
        delete_namespace(bench.batch, bench.core, namespace)
    # Pods deleted by the thousand would weigh on the operator's run.
    wait_for(lambda: count(bench.core.list_namespaced_pod, namespace) == 0, 600, "pods deleted")
    gaps, _ = stamps.gaps(stamps.pods, parallelism)
    return gaps, busy


def turnover(
    bench: Bench,
    parallelism: int,
    mlflow_uri: str | None,
    early_stopping: bool,
    trial_seconds: tuple[int, int] | None,
) -> dict:
    long = parallelism >= 100
    trials = parallelism * 2 if long else parallelism * 10
    low, high = trial_seconds or ((20, 60) if long else (2, 6))
    annotations = {
        "lorasweep.io/sim-duration": f"{low}s",
        "lorasweep.io/sim-duration-max": f"{high}s",
        "lorasweep.io/sim-result": '{"metrics": {"eval_loss": 0.5}}',
    }
    name = f"turnover-{parallelism}"
    spec = sweep_spec(trials, parallelism, annotations)
    baseline_gaps, baseline_busy = plain_turnover(bench, spec, parallelism, trials, high)
    runs = None
    if mlflow_uri:
        spec["mlflow"] = {"trackingUri": mlflow_uri, "experimentName": bench.namespace}
        runs = TrialRuns(mlflow_uri, bench.namespace, name, early_stopping)
        if early_stopping:
            spec["earlyStopping"] = {"algorithm": "median", "minSteps": 1, "minTrials": 1}
    audit_offset = devcluster.AUDIT_LOG.stat().st_size
    bench.operator.start()
    cpu_before = cpu_seconds(bench.operator.pid)
    stamps = Stamps(bench, bench.namespace, runs)
    try:
        machine_before = machine_cpu()
        bench.apply(name, spec)
        wait_for(
            lambda: bench.phases().get(name) == "Succeeded",
            # On 2 cores pods wait to be scheduled too.
            120 + 5 * trials * high / parallelism,
            f"sweep {name} to succeed",
            interval=2,
        )
        busy = busy_share(machine_before, machine_cpu())
    finally:
        stamps.stop()
        if runs:
            runs.close()
    cpu = cpu_seconds(bench.operator.pid) - cpu_before
    requests = operator_requests(audit_offset)
    gaps, ramp_up_ends = stamps.gaps(stamps.pods, parallelism)
    # The operator's part: the next Job created; the rest is the Job controller's pod.
    operator_gaps, _ = stamps.gaps(stamps.jobs, parallelism)
    jobs = sorted(stamps.jobs.values())
    return {
        "parallelism": parallelism,
        "trials": trials,
        "mlflow": runs is not None,
        "early_stopping": "earlyStopping" in spec,
        "trial_seconds": f"{low}s-{high}s",
        "ramp_up_seconds": round(jobs[parallelism - 1] - jobs[0], 2),
        "ended_during_ramp_up": ramp_up_ends,
        "gaps": len(gaps),
        "idle_gap_p50_seconds": round(percentile(gaps, 0.5), 2),
        "idle_gap_p99_seconds": round(percentile(gaps, 0.99), 2),
        "idle_gap_max_seconds": round(max(gaps), 2),
        "baseline_idle_gap_p50_seconds": round(percentile(baseline_gaps, 0.5), 2),
        "baseline_idle_gap_p99_seconds": round(percentile(baseline_gaps, 0.99), 2),
        "ratio_idle_gap_p99_to_baseline": round(
            percentile(gaps, 0.99) / percentile(baseline_gaps, 0.99), 2
        ),
        "operator_gap_p50_seconds": round(percentile(operator_gaps, 0.5), 2),
        "operator_gap_p99_seconds": round(percentile(operator_gaps, 0.99), 2),
        "machine_busy_share": busy,
        "baseline_machine_busy_share": baseline_busy,
        "operator_cpu_seconds_per_trial": round(cpu / trials, 3),
        "api_requests_per_trial": round(requests / trials, 2),
    }


def many_sweeps(bench: Bench, sweeps: int) -> dict:
    quick = {
        "lorasweep.io/sim-duration": "1s",
        "lorasweep.io/sim-duration-max": "3s",
        "lorasweep.io/sim-result": '{"metrics": {"eval_loss": 0.5}}',
    }
    bench.operator.start()
    finished = [f"finished-{i}" for i in range(sweeps // 2)]
    for name in finished:
        bench.apply(name, sweep_spec(1, 1, quick))
    wait_for(
        lambda: all(bench.phases().get(n) == "Succeeded" for n in finished),
        600,
        "the first half to finish",
        interval=2,
    )
    running = [f"running-{i}" for i in range(sweeps - len(finished))]
    started = time.monotonic()
    for name in running:
        bench.apply(name, sweep_spec(20, 4, quick))
    first_trial: dict[str, float] = {}
    ended: dict[str, float] = {}
    deadline = started + 900
    while len(ended) < len(running) and time.monotonic() < deadline:
        jobs = bench.batch.list_namespaced_job(bench.namespace).items
        owners = {j.metadata.labels.get(LABEL_SWEEP) for j in jobs}
        phases = bench.phases()
        now = time.monotonic() - started
        for name in running:
            if name in owners:
                first_trial.setdefault(name, now)
            if phases.get(name) == "Succeeded":
                ended.setdefault(name, now)
        time.sleep(1)
    return {
        "sweeps": sweeps,
        "finished_before": len(finished),
        "running": len(running),
        "trials_each": 20,
        "all_finished": len(ended) == len(running),
        "seconds_until_all_finished": round(max(ended.values()), 1) if ended else None,
        "max_seconds_to_first_trial": round(max(first_trial.values()), 1) if first_trial else None,
        "never_started": len(running) - len(first_trial),
        "operator_peak_rss_mib": round(peak_rss_mib(bench.operator.pid), 1),
    }


def trial_seconds(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        bounds = int(low), int(high)
    except ValueError:
        bounds = (0, 0)
    if not 0 < bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"want LOW-HIGH whole seconds, 0 < LOW <= HIGH: {text}")
    return bounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("fanout", "turnover", "sweeps"), default="fanout")
    parser.add_argument("--trials", type=int, default=1000, help="fanout: trials of the sweep")
    parser.add_argument("--parallelism", default="8,1000", help="turnover: comma-separated P")
    parser.add_argument(
        "--trial-seconds",
        type=trial_seconds,
        help="turnover: how long trials run, LOW-HIGH seconds (default 20-60 at P >= 100, "
        "else 2-6)",
    )
    parser.add_argument("--sweeps", type=int, default=100, help="sweeps: how many")
    parser.add_argument(
        "--mlflow", action="store_true", help="turnover: track to the dev cluster's MLflow"
    )
    parser.add_argument(
        "--early-stopping",
        action="store_true",
        help="turnover with --mlflow: stop trials by the median rule, runs log curves",
    )
    parser.add_argument(
        "--settle", type=float, default=300, help="fanout: longest wait for the trials' pods"
    )
    args = parser.parse_args()
    if args.early_stopping and not (args.mode == "turnover" and args.mlflow):
        parser.error("--early-stopping needs --mode turnover and --mlflow")
    parallelisms = [int(p) for p in args.parallelism.split(",")]

    devcluster.up()
    api = config.new_client_from_config(str(devcluster.KUBECONFIG))
    api.configuration.connection_pool_maxsize = CONCURRENCY
    core = client.CoreV1Api(api)
    gpus = {"fanout": args.trials, "turnover": 2 * max(parallelisms), "sweeps": 400}
    nodes = bench_nodes(gpus[args.mode])
    existing = {n.metadata.name for n in core.list_node().items}
    devcluster.create_nodes({n: g for n, g in nodes.items() if n not in existing}, "sim")
    devcluster.apply_crds(devcluster.Cluster.load())

    results = []
    for run in parallelisms if args.mode == "turnover" else [None]:
        namespace = create_namespace(core, "bench-operator")
        log_path = devcluster.STATE_DIR / "logs" / "bench-operator.log"
        bench = Bench(
            api,
            core,
            client.BatchV1Api(api),
            client.CustomObjectsApi(api),
            namespace,
            OperatorProcess(namespace, log_path),
        )
        try:
            if args.mode == "fanout":
                results.append(fanout(bench, args.trials, args.settle))
            elif args.mode == "turnover":
                assert run is not None
                mlflow_uri = devcluster.Cluster.load().mlflow_url if args.mlflow else None
                results.append(
                    turnover(bench, run, mlflow_uri, args.early_stopping, args.trial_seconds)
                )
            else:
                results.append(many_sweeps(bench, args.sweeps))
            # On stderr at once: cleaning 10,000 trials up takes minutes, and may fail.
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        finally:
            bench.operator.stop()
            release_sweeps(api, namespace)
            delete_namespace(bench.batch, core, namespace)
    # The extra nodes would change what other users of the dev cluster (tests) expect.
    for node in nodes:
        with contextlib.suppress(client.exceptions.ApiException):
            core.delete_node(node)
    if args.mode == "turnover":
        print(json.dumps({"bench": "operator_turnover", "runs": results}))
    else:
        print(json.dumps({"bench": f"operator_{args.mode}", **results[0]}))


if __name__ == "__main__":
    main()

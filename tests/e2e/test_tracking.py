"""The operator's MLflow adapter against the real tracking server."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient

from lora_trainer.contract import TAG_PARENT_RUN_ID, TAG_SWEEP, TAG_TRIAL
from sweep_operator import mlflow_runs
from sweep_operator.api import MlflowStatus
from sweep_operator.mlflow_runs import RunsCache
from sweep_operator.observe import trials_observer
from sweep_operator.plan import CURVE_POLL_SECONDS
from sweep_operator.tracking import SweepRuns
from sweep_operator.trials import Curve, ObservedTrial, TrialState
from tests.support import free_port
from tests.unit.sweep_helpers import make_spec


def test_parent_run_is_found_again_after_a_restart(mlflow_uri):
    experiment, uid = f"tracking-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    first = SweepRuns(mlflow_uri).ensure_parent_run(experiment, "s", "ns", uid)
    # A new SweepRuns is what a restarted operator has: nothing in memory.
    again = SweepRuns(mlflow_uri).ensure_parent_run(experiment, "s", "ns", uid)
    assert again == first
    other = SweepRuns(mlflow_uri).ensure_parent_run(experiment, "s", "ns", str(uuid.uuid4()))
    assert other[0] == first[0] and other[1] != first[1]


def test_trial_results_and_intermediate_values_in_bulk(mlflow_uri):
    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    experiment = mlflow.create_experiment(f"tracking-{uuid.uuid4().hex[:8]}")
    curves = {}
    # More runs than one bulk request may name, so batching is exercised.
    for i in range(105):
        run = mlflow.create_run(experiment, tags={TAG_SWEEP: "s", TAG_TRIAL: f"s-{i:04d}"})
        curve = [(step, 1.0 / (step + 1) + i) for step in range(3)]
        for step, value in curve:
            mlflow.log_metric(run.info.run_id, "eval_loss", value, step=step)
        curves[run.info.run_id] = curve
    runs = SweepRuns(mlflow_uri)

    results = runs.trial_results(experiment, "s")
    assert len(results) == 105
    assert results["s-0007"]["metrics"]["eval_loss"] == curves[results["s-0007"]["run_id"]][-1][1]
    assert runs.trial_results(experiment, "s", started_since=time.time() - 600) == results
    assert runs.trial_results(experiment, "s", started_since=time.time() + 600) == {}
    ids = [results[f"s-{i:04d}"]["run_id"] for i in range(101)]  # more than one search names
    assert runs.runs_by_id(experiment, ids) == {
        f"s-{i:04d}": results[f"s-{i:04d}"] for i in range(101)
    }

    got = runs.intermediate_values(list(curves), "eval_loss")
    assert {run: [(p.step, p.value) for p in points] for run, points in got.items()} == curves
    # ASHA orders the trials that reached a rung by when they logged their value there.
    assert all(p.time > 1.7e9 for points in got.values() for p in points)


def test_a_sweep_made_again_under_its_name_reads_its_own_runs_not_the_earlier_ones(mlflow_uri):
    """Deleted and applied again, a sweep gets a new parent run in the same experiment: the
    earlier sweep's trial runs, with the same trial names, are not its results."""
    experiment = f"tracking-{uuid.uuid4().hex[:8]}"
    runs = SweepRuns(mlflow_uri)
    experiment_id, earlier = runs.ensure_parent_run(experiment, "s", "ns", str(uuid.uuid4()))
    _, parent = runs.ensure_parent_run(experiment, "s", "ns", str(uuid.uuid4()))
    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    started = int(time.time() * 1000)

    def trial_run(parent_run_id: str | None, loss: float) -> str:
        tags = {TAG_SWEEP: "s", TAG_TRIAL: "s-0000"}
        if parent_run_id:
            tags[TAG_PARENT_RUN_ID] = parent_run_id
        nonlocal started
        started += 1000  # each run a second after the last: MLflow lists the newest first
        run_id = mlflow.create_run(experiment_id, start_time=started, tags=tags).info.run_id
        mlflow.log_metric(run_id, "eval_loss", loss)
        return run_id

    trial_run(earlier, 0.1)
    own = trial_run(parent, 0.5)
    trial_run(earlier, 0.2)  # newer, still the earlier sweep's
    assert runs.trial_results(experiment_id, "s", parent_run_id=parent)["s-0000"]["run_id"] == own
    # A trial created while MLflow was down logs without a parent: it counts.
    unparented = trial_run(None, 0.7)
    found = runs.trial_results(experiment_id, "s", parent_run_id=parent)
    assert found["s-0000"]["run_id"] == unparented  # the newest


RESULT = '{"metrics": {"eval_loss": 0.5}}'


class Trials:
    """Trial Jobs and pods as the operator's indexes summarise them (observe.job_summary and
    observe.pod_summary), observed as a reconcile does."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}

    def run(self, name: str) -> None:
        self._set(name, complete=False, phase="Running", message="")

    def end(self, name: str, message: str = RESULT) -> None:
        """The trial succeeds; `message` is its termination message ("" when it wrote none)."""
        self._set(name, complete=True, phase="Succeeded", message=message)

    def _set(self, name: str, complete: bool, phase: str, message: str) -> None:
        self.jobs[name] = {
            **dict.fromkeys(("sweep_uid", "failure"), ""),
            **dict.fromkeys(("finished_at", "started_at", "stopped", "queue", "fatal_exit_code")),
            "uid": f"uid-{name}",
            **dict.fromkeys(("deleting", "failed", "suspended"), False),
            "name": name,
            "index": int(name.rsplit("-", 1)[1]),
            "parameters": {},
            "complete": complete,
            "ready": 0 if complete else 1,
        }
        pod = {"phase": phase, "message": message, "exit_code": None, "reports": True}
        self.pods[name] = {"job_uid": f"uid-{name}", **pod}

    def observe(
        self, results: Mapping[str, dict[str, Any]], curves: Mapping[str, dict[str, Curve]]
    ) -> list[ObservedTrial]:
        jobs, pods = list(self.jobs.values()), list(self.pods.values())
        return trials_observer(jobs, pods, "eval_loss")(results, curves)


def test_observing_trials_asks_mlflow_nothing_what_is_missing_is_read_apart(mlflow_uri):
    """A reconcile observes a sweep's trials with the runs read so far, so a slow or
    unreachable MLflow holds none back (and with it no new trial). What it misses (the run of
    a trial that ended) is read apart and seen by the next reconcile; one about to end the
    sweep reads it at once, and so does a started (or restarted) operator's first one."""
    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    experiment = mlflow.create_experiment(f"tracking-{uuid.uuid4().hex[:8]}")
    tracked = MlflowStatus(experiment_id=experiment)
    spec = make_spec(earlyStopping={"algorithm": "median"})
    cache = RunsCache(mlflow_uri, logging.getLogger(__name__))
    trials = Trials()

    def observe() -> dict[str, ObservedTrial]:
        observed = cache.observe(spec, "sw", tracked, trials.observe)
        return {t.name: t for t in observed}

    def start(name: str) -> str:
        trials.run(name)
        run = mlflow.create_run(experiment, tags={TAG_SWEEP: "sw", TAG_TRIAL: name})
        mlflow.log_metric(run.info.run_id, "eval_loss", 0.9, step=1)
        return run.info.run_id

    before = start("sw-0000")
    trials.end("sw-0000")
    assert observe()["sw-0000"].mlflow_run_id == before  # read by the first reconcile

    running = start("sw-0001")
    observed = observe()
    assert observed["sw-0001"].mlflow_run_id is None and not observed["sw-0001"].curves
    assert cache.due is not None and cache.due.unfound == {"sw-0001"}  # early stopping asks
    assert cache.catch_up()
    assert not cache.pending  # until a reconcile finds something missing again
    found = observe()["sw-0001"]
    assert found.mlflow_run_id == running
    # Its curve is read with its run, not one poll later.
    assert [(p.step, p.value) for p in found.curves["eval_loss"]] == [(1, 0.9)]
    mlflow.log_metric(running, "eval_loss", 0.8, step=2)
    time.sleep(CURVE_POLL_SECONDS)  # running trials' curves are read at most this often
    observe()
    assert cache.catch_up()
    points = observe()["sw-0001"].curves["eval_loss"]
    assert [(p.step, p.value) for p in points] == [(1, 0.9), (2, 0.8)]

    ended = start("sw-0002")
    trials.end("sw-0002")
    assert observe()["sw-0002"].mlflow_run_id is None
    assert cache.due is not None and cache.due.ended == {"sw-0002": None}
    assert cache.catch_up()
    assert observe()["sw-0002"].mlflow_run_id == ended
    assert cache.due is None or not cache.due.ended  # an ended trial's run is searched once

    last = start("sw-0003")
    trials.end("sw-0003")
    assert observe()["sw-0003"].mlflow_run_id is None
    assert cache.read_results()
    assert observe()["sw-0003"].mlflow_run_id == last
    assert not cache.read_results()  # nothing is missing any more


def test_early_stopping_searches_only_the_runs_started_since_its_last_search(
    mlflow_uri, monkeypatch
):
    """Under early stopping the operator looks for running trials' runs every poll: it
    searches the runs started since its last search, not all the sweep's (a search of
    thousands takes seconds), and reads an ended trial's known run by its id. A run whose
    trainer's clock is far behind is found by the search of all runs made every
    FULL_SEARCH_SECONDS."""
    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    experiment = mlflow.create_experiment(f"tracking-{uuid.uuid4().hex[:8]}")
    tracked = MlflowStatus(experiment_id=experiment)
    spec = make_spec(earlyStopping={"algorithm": "median"})
    cache = RunsCache(mlflow_uri, logging.getLogger(__name__))
    searched: list[int] = []  # how many runs each search of the sweep's runs returned
    search = cache.tracker.trial_results

    def counted(*args: Any) -> dict[str, dict[str, Any]]:
        found = search(*args)
        searched.append(len(found))
        return found

    monkeypatch.setattr(cache.tracker, "trial_results", counted)
    trials = Trials()
    ten_minutes_ago = int((time.time() - 600) * 1000)

    def create_run(name: str, start_time: int | None = None) -> str:
        tags = {TAG_SWEEP: "sw", TAG_TRIAL: name}
        return mlflow.create_run(experiment, start_time=start_time, tags=tags).info.run_id

    def poll() -> dict[str, ObservedTrial]:
        time.sleep(CURVE_POLL_SECONDS)
        cache.observe(spec, "sw", tracked, trials.observe)
        cache.catch_up()
        return {t.name: t for t in cache.observe(spec, "sw", tracked, trials.observe)}

    for i in range(20):  # trials that ended long ago
        create_run(f"sw-{i:04d}", ten_minutes_ago)
        trials.end(f"sw-{i:04d}")
    cache.observe(spec, "sw", tracked, trials.observe)
    assert searched == [20]  # a started operator's first read: every run

    trials.run("sw-0020")
    running = create_run("sw-0020")
    assert poll()["sw-0020"].mlflow_run_id == running
    assert searched[-1] == 1  # only the run started since

    trials.run("sw-0021")
    late = create_run("sw-0021", ten_minutes_ago)  # its trainer's clock is behind
    assert poll()["sw-0021"].mlflow_run_id is None
    monkeypatch.setattr(mlflow_runs, "FULL_SEARCH_SECONDS", 0.0)
    assert poll()["sw-0021"].mlflow_run_id == late
    assert searched[-1] == 22
    monkeypatch.setattr(mlflow_runs, "FULL_SEARCH_SECONDS", 300.0)

    # The running trial ends, its objective only in MLflow: its run is read by its id.
    mlflow.log_metric(running, "eval_loss", 0.25)
    trials.end("sw-0020", message="")
    searches = len(searched)
    assert poll()["sw-0020"].value == 0.25
    assert len(searched) == searches

    # A trial that ended before any look found its run, whose start time is ten minutes back
    # (its trainer's clock is behind): its run is not among the new ones, so all are searched.
    skewed = create_run("sw-0022", ten_minutes_ago)
    mlflow.log_metric(skewed, "eval_loss", 0.125)
    trials.end("sw-0022", message="")
    ended = poll()["sw-0022"]
    assert (ended.state, ended.value, ended.mlflow_run_id) == (TrialState.SUCCEEDED, 0.125, skewed)
    assert searched[-1] == 23


def test_a_result_only_in_mlflow_is_awaited_while_mlflow_answers(mlflow_uri, monkeypatch):
    """A trial that wrote no termination message and logged its objective only to MLflow is
    still reporting until its run is read: it is not counted as succeeded without an objective
    (nor announced so in an Event). A restarted operator reads those that ended before it at
    once. While MLflow does not answer, such a trial is counted without its objective."""
    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    experiment = mlflow.create_experiment(f"tracking-{uuid.uuid4().hex[:8]}")
    tracked = MlflowStatus(experiment_id=experiment)
    spec = make_spec()
    trials = Trials()

    def end_with(name: str, value: float) -> None:
        run = mlflow.create_run(experiment, tags={TAG_SWEEP: "sw", TAG_TRIAL: name})
        mlflow.log_metric(run.info.run_id, "eval_loss", value)
        trials.end(name, message="")

    end_with("sw-0000", 0.3)
    cache = RunsCache(mlflow_uri, logging.getLogger(__name__))
    first = cache.observe(spec, "sw", tracked, trials.observe)  # a started operator's
    assert [(t.state, t.value) for t in first] == [(TrialState.SUCCEEDED, 0.3)]

    end_with("sw-0001", 0.4)
    [_, reporting] = cache.observe(spec, "sw", tracked, trials.observe)
    assert (reporting.state, reporting.value) == (TrialState.RUNNING, None)
    assert cache.catch_up()
    [_, scored] = cache.observe(spec, "sw", tracked, trials.observe)
    assert (scored.state, scored.value) == (TrialState.SUCCEEDED, 0.4)

    # The operator's settings (handlers.configure): MLflow's client would retry for minutes.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = RunsCache(f"http://127.0.0.1:{free_port()}", logging.getLogger(__name__))
    unscored = down.observe(spec, "sw", tracked, trials.observe)
    assert [(t.state, t.value) for t in unscored] == [(TrialState.SUCCEEDED, None)] * 2


def test_an_unreachable_mlflow_changes_no_observation_and_is_read_again(monkeypatch):
    # The operator's settings (handlers.configure): MLflow's client would retry for minutes.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = RunsCache(f"http://127.0.0.1:{free_port()}", logging.getLogger(__name__))
    trials = Trials()
    trials.end("sw-0000")
    observed = down.observe(make_spec(), "sw", MlflowStatus(experiment_id="1"), trials.observe)
    assert [(t.state, t.value, t.mlflow_run_id) for t in observed] == [
        (TrialState.SUCCEEDED, 0.5, None)
    ]
    assert not down.catch_up() and not down.read_results()
    down.observe(make_spec(), "sw", MlflowStatus(experiment_id="1"), trials.observe)
    assert down.due is not None and down.due.ended == {"sw-0000": None}  # asked again

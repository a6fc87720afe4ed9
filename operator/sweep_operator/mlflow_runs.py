"""What the reconciler reads from and writes to MLflow for one sweep, with its caches.

A finished trial's run does not change, so its results and curves are read once and kept;
MLflow being down only delays them (each read logs a warning and is tried again after a later
reconcile). The caches are not state: a restarted operator reads the same again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from lora_trainer.contract import TAG_NAMESPACE, TAG_SWEEP, TAG_TRIAL
from sweep_operator.api import MlflowStatus, SweepSpec, SweepStatus
from sweep_operator.naming import experiment_name, experiment_url
from sweep_operator.observation import TrialRun
from sweep_operator.plan import CURVE_POLL_SECONDS
from sweep_operator.tracking import SweepRuns
from sweep_operator.trials import Curve, ObservedTrial, TrialState

# Observes a sweep's trials given MLflow's results and curves by trial (observe.observe_trial
# per Job).
Observe = Callable[
    [Mapping[str, dict[str, Any]], Mapping[str, dict[str, Curve]]], list[ObservedTrial]
]

# A run's start time is the trainer's clock. A search for the runs started since the last one
# reaches back this much further, for trainers whose clocks are behind the operator's and for
# runs being created while the last search ran.
CLOCK_SKEW_SECONDS = 60.0
# All the sweep's runs are searched this often all the same, for a trainer whose clock is
# further behind: early stopping then sees its running trial this late, not never. (An ended
# trial whose run is not among the new ones has all of them searched at once.)
FULL_SEARCH_SECONDS = 300.0


@dataclass(frozen=True)
class Reads:
    """What the next read of MLflow fetches, as the last reconcile saw the trials."""

    experiment_id: str
    sweep: str
    parent_run_id: str | None  # the sweep's, whose trials' runs are under it
    # Trials that ended without their run's final data, with the run's id where it is known
    # (then it is read by id; else the runs started since the last search are searched).
    ended: Mapping[str, str | None]
    unfound: frozenset[str]  # running trials whose runs are not known yet (with early stopping)
    curves: tuple[tuple[str, str, bool], ...]  # (trial, run id, ended) whose curves to read
    metrics: tuple[str, ...]  # the objective's metrics, for the curves


class RunsCache:
    """One sweep's MLflow runs as the operator sees them, and its MLflow work.

    A reconcile reads only what is cached here, so MLflow's speed (a search of thousands of
    runs takes seconds) or an outage does not hold back the creation of trials. It notes what
    it missed (`due`) and which stopped trials' runs to tag (`to_tag`); `catch_up` does that
    outside the reconcile, in a thread of its own, and the sweep is then woken to plan with
    it. The exceptions: the parent run is asked for once in the first reconcile, so that the
    first trials' runs nest under it; a new cache's first reconcile reads the runs of trials
    that ended before it (the operator started or restarted); a reconcile that would end the
    sweep while results are missing reads them first (`read_results`), so that the best trial
    and the parent run are not settled without them; and registering the adapter and closing
    the parent run, which settle the sweep's outcome, are done in the reconcile.

    What a reconcile reads here is replaced whole, never changed in place: `catch_up` may
    replace it meanwhile.
    """

    def __init__(self, uri: str, logger: logging.Logger) -> None:
        self.uri = uri
        self.tracker = SweepRuns(uri)
        self.logger = logger
        self.results: Mapping[str, dict[str, Any]] = {}  # MLflow results by trial
        self.searched: frozenset[str] = frozenset()  # ended trials searched for after they ended
        self.curves: Mapping[str, dict[str, Curve]] = {}  # final curves of ended trials
        self.live_curves: Mapping[str, dict[str, Curve]] = {}  # running trials', as last read
        self.due: Reads | None = None  # what the last reconcile found missing
        self.to_tag: Mapping[str, str] = {}  # stopped trials whose run to tag, with why
        self.tagged: frozenset[str] = frozenset()  # stopped trials whose run says why
        self.parent: MlflowStatus | None = None
        self.registered: dict[str, str] = {}  # trial -> models:/ URI of its registered adapter
        self.parent_closed = False
        self._answered = True  # by MLflow, at the last read
        self._first_read_tried = False
        self._parent_wanted: tuple[str, str, str, str] | None = None  # experiment, sweep, ns, uid
        self._merging = threading.Lock()
        self._curves_read_at = -math.inf  # time.monotonic() of the last read of curves
        # time.time() at the start of the last search that answered: runs started before it
        # (less CLOCK_SKEW_SECONDS) have been found; None until a search of all of them.
        self._searched_until: float | None = None
        self._full_search_at = -math.inf  # time.monotonic() of the last search of all runs
        self._runs: tuple[Mapping[str, dict[str, Any]], Mapping[str, TrialRun]] = ({}, {})

    def parent_run(
        self, spec: SweepSpec, name: str, namespace: str, uid: str
    ) -> MlflowStatus | None:
        """The sweep's experiment and parent run, created on the first call; None while MLflow
        cannot be reached (trials still run, results come later, and `catch_up` asks again)."""
        if self.parent is None and self._parent_wanted is None:
            experiment = experiment_name(
                namespace, name, spec.mlflow.experiment_name if spec.mlflow else None
            )
            self._parent_wanted = (experiment, name, namespace, uid)
            self._ensure_parent(self._parent_wanted)
        return self.parent

    def _ensure_parent(self, wanted: tuple[str, str, str, str]) -> bool:
        try:
            experiment_id, run_id = self.tracker.ensure_parent_run(*wanted)
        except Exception as error:
            self.logger.warning("MLflow unreachable, will retry: %s", error)
            return False
        self.parent = MlflowStatus(
            experiment_id=experiment_id,
            parent_run_id=run_id,
            url=experiment_url(self.uri, experiment_id),
        )
        return True

    @property
    def pending(self) -> bool:
        """Whether the last reconcile left work for `catch_up`."""
        unmade = self.parent is None and self._parent_wanted is not None
        untagged = any(trial not in self.tagged for trial in self.to_tag)
        return unmade or self.due is not None or untagged

    def catch_up(self) -> bool:
        """What the last reconcile left: the parent run if it could not be made, the reads it
        missed, the stopped trials' tags. Whether anything came of it (then plan again with
        it); what was done is not pending any more, so a sweep whose reconciles stop asking
        (a sweep refused for a bad spec) is not read again and again."""
        wanted = self._parent_wanted
        made = self.parent is None and wanted is not None and self._ensure_parent(wanted)
        due = self.due
        read = self._read(due)
        if read and self.due is due:
            self.due = None
        return made or bool(read) or self._tag(self.to_tag) > 0

    def observe(
        self, spec: SweepSpec, sweep: str, mlflow: MlflowStatus | None, observe: Observe
    ) -> list[ObservedTrial]:
        """The trials with the MLflow results read so far (and their curves, with early
        stopping); what is missing becomes `due`."""
        # An ended trial's final curve over the one last read while it ran. The curves are the
        # objects read (so an observation memo sees them unchanged until they are read again).
        curves = {**self.live_curves, **self.curves} if spec.early_stopping else {}
        observed = observe(self.results, curves)
        self.due = self._missing(spec, sweep, mlflow, observed)
        if self.due and self.due.ended and not self._first_read_tried:
            # A new cache (the operator started or restarted) reads the runs of the trials that
            # ended before it at once, as one search: else each one that reported only to
            # MLflow would be shown still reporting, and an ended sweep Running, until then.
            self._first_read_tried = True
            self.read_results()
            observed = observe(self.results, curves)
            self.due = self._missing(spec, sweep, mlflow, observed)
        if self.due and self.due.ended and self._answered:
            observed = [self._reporting(t, self.due.ended) for t in observed]
        return observed

    @staticmethod
    def _reporting(trial: ObservedTrial, unread: Mapping[str, str | None]) -> ObservedTrial:
        """A trial that succeeded without its objective in its termination message is still
        reporting until its run is read (as `observe_trial` waits for the pod's message): it
        is not counted, nor announced, as succeeded without one. Not while MLflow does not
        answer: then it is, as before, and its value comes once MLflow is back."""
        if trial.name in unread and trial.state == TrialState.SUCCEEDED and trial.value is None:
            return trial.model_copy(update={"state": TrialState.RUNNING})
        return trial

    def _missing(
        self,
        spec: SweepSpec,
        sweep: str,
        mlflow: MlflowStatus | None,
        observed: list[ObservedTrial],
    ) -> Reads | None:
        """A finished trial's run is searched for once after it ended (its final data do not
        change); with early stopping, running trials' curves at most every
        CURVE_POLL_SECONDS."""
        experiment_id = mlflow.experiment_id if mlflow else None
        if experiment_id is None:
            return None
        results = self.results
        ended = {
            t.name: t.mlflow_run_id
            for t in observed
            if not t.state.active
            and t.name not in self.searched
            and (t.mlflow_run_id is None or (t.state == TrialState.SUCCEEDED and t.value is None))
        }
        unfound: frozenset[str] = frozenset()
        curves: tuple[tuple[str, str, bool], ...] = ()
        # Curves change while trials run, and each read of them costs a request per 100 runs.
        if spec.early_stopping and time.monotonic() - self._curves_read_at >= CURVE_POLL_SECONDS:
            unfound = frozenset(
                t.name for t in observed if t.state.active and t.name not in results
            )
            curves = tuple(
                (t.name, results[t.name]["run_id"], not t.state.active)
                for t in observed
                if t.name in results and t.name not in self.curves
            )
        if not (ended or unfound or curves):
            return None
        parent = mlflow.parent_run_id if mlflow else None
        return Reads(experiment_id, sweep, parent, ended, unfound, curves, _metrics(spec))

    def read_results(self) -> bool:
        """Read the runs of trials that ended without their results, for a reconcile about to
        end the sweep; whether there were any and MLflow answered."""
        due = self.due
        if due is None or not due.ended:
            return False
        return bool(self._read(replace(due, unfound=frozenset(), curves=())))

    def _read(self, due: Reads | None) -> bool | None:
        """Whether MLflow answered; None when there was nothing to read."""
        if due is None:
            return None
        if due.curves or due.unfound:
            self._curves_read_at = time.monotonic()
        try:
            found, searched = self._search(due)
            wanted = {trial: run_id for trial, run_id, _ in due.curves}
            # A running trial's run found now has its curve read now too: early stopping does
            # not wait one more poll before it first sees the trial's curve.
            wanted |= {t: found[t]["run_id"] for t in due.unfound if t in found}
            curves = self._read_curves(wanted, due.metrics) if wanted else {}
        except Exception as error:
            self.logger.warning("cannot read trial results from MLflow yet: %s", error)
            self._answered = False
            return False
        self._answered = True
        final = {trial for trial, _, ended in due.curves if ended}
        with self._merging:
            self.results = {**self.results, **found}
            self.searched |= frozenset(due.ended)
            # The runs searched are kept above, so the next search may start where this one did.
            if searched is not None:
                started, full = searched
                self._searched_until = max(started, self._searched_until or started)
                if full:
                    self._full_search_at = time.monotonic()
            self.curves = {**self.curves, **{t: c for t, c in curves.items() if t in final}}
            if wanted:
                self.live_curves = {t: c for t, c in curves.items() if t not in final}
        return True

    def _search(self, due: Reads) -> tuple[dict[str, dict[str, Any]], tuple[float, bool] | None]:
        """The results of the runs `due` asks for, and when the search of the sweep's runs
        began and whether it was of all of them (None if there was none).

        Runs known already are read by id. The others are looked for among the runs started
        since the last search: every run is then found by the first search after it was
        created, as a search of all of them (seconds at thousands of runs) would, every
        CURVE_POLL_SECONDS under early stopping. All of them are searched at first, every
        FULL_SEARCH_SECONDS, and when an ended trial's run is not among the new ones (its
        trainer's clock is far behind, or it made none): else the sweep could end without it."""
        known = [run_id for run_id in due.ended.values() if run_id is not None]
        found = self.tracker.runs_by_id(due.experiment_id, known) if known else {}
        if not due.unfound and len(known) == len(due.ended):
            return found, None
        started = time.time()
        since = self._searched_until
        full = since is None or time.monotonic() - self._full_search_at >= FULL_SEARCH_SECONDS
        window = None if full or since is None else since - CLOCK_SKEW_SECONDS
        parent = due.parent_run_id
        found |= self.tracker.trial_results(due.experiment_id, due.sweep, window, parent)
        missed = any(run_id is None and t not in found for t, run_id in due.ended.items())
        if window is not None and missed:
            found |= self.tracker.trial_results(due.experiment_id, due.sweep, None, parent)
            full = True
        return found, (started, full)

    def _read_curves(
        self, wanted: dict[str, str], metrics: tuple[str, ...]
    ) -> dict[str, dict[str, Curve]]:
        """Each trial's intermediate objective values, by metric (one bulk read per 100 runs
        per metric)."""
        fetched: dict[str, dict[str, Curve]] = {trial: {} for trial in wanted}
        for metric in metrics:
            by_run = self.tracker.intermediate_values(list(wanted.values()), metric)
            for trial, run_id in wanted.items():
                fetched[trial][metric] = by_run.get(run_id, [])
        return fetched

    def with_curves(self, spec: SweepSpec, observed: list[ObservedTrial]) -> list[ObservedTrial]:
        """The trials with their curves, for the report: an ended trial's is read once and
        kept, a running trial's each time."""
        results = self.results
        wanted = {
            t.name: results[t.name]["run_id"]
            for t in observed
            if t.name in results and t.name not in self.curves
        }
        fetched: dict[str, dict[str, Curve]] = {}
        if wanted:
            try:
                fetched = self._read_curves(wanted, _metrics(spec))
            except Exception as error:
                self.logger.warning("cannot read intermediate values from MLflow yet: %s", error)
            ended = {t.name for t in observed if not t.state.active}
            with self._merging:
                self.curves = {**self.curves, **{t: c for t, c in fetched.items() if t in ended}}
        curves = self.curves
        return [
            t.model_copy(update={"curves": curves.get(t.name) or fetched.get(t.name, {})})
            for t in observed
        ]

    def runs(self) -> Mapping[str, TrialRun]:
        """The trials' runs as the plan reads them; made again only when the results change
        (every reconcile reads them, and a sweep has thousands). The results are replaced
        whole, never changed in place: the same object holds the same runs."""
        results, memo = self.results, self._runs
        if memo[0] is not results:
            memo = (
                results,
                {
                    trial: TrialRun(run_id=run["run_id"], adapter=run.get("adapter"))
                    for trial, run in results.items()
                },
            )
            self._runs = memo
        return memo[1]

    def _tag(self, reasons: Mapping[str, str]) -> int:
        """Tag each stopped trial's run with why it was stopped; how many were tagged."""
        results, tagged = self.results, 0
        for trial, reason in reasons.items():
            if trial in self.tagged:
                continue
            try:
                self.tracker.mark_stopped(results[trial]["run_id"], reason)
            except Exception as error:
                self.logger.warning("cannot mark %s stopped in MLflow yet: %s", trial, error)
                continue
            self.tagged |= {trial}
            tagged += 1
        return tagged

    def register_adapter(self, model: str, trial: str, sweep: str, namespace: str) -> None:
        """Register the trial's uploaded adapter as a new version of `model`."""
        run = self.results[trial]
        tags = {TAG_SWEEP: sweep, TAG_NAMESPACE: namespace, TAG_TRIAL: trial}
        try:
            self.registered[trial] = self.tracker.register_adapter(
                model, run["run_id"], run["adapter"], tags
            )
        except Exception as error:
            self.logger.warning("cannot register the best adapter in MLflow yet: %s", error)

    def close_parent_run(self, status: SweepStatus) -> None:
        """End the parent run with the sweep's outcome and best trial."""
        parent = status.mlflow.parent_run_id if status.mlflow else None
        if parent is None:
            return
        best = status.best_trial.model_dump() if status.best_trial else None
        try:
            self.tracker.close_parent_run(parent, best, status.phase)
        except Exception as error:
            self.logger.warning("cannot close the MLflow parent run yet: %s", error)
            return
        self.parent_closed = True

    def log_report(
        self, status: SweepStatus, files: dict[str, str | bytes], importance: dict[str, float]
    ) -> None:
        """The report's files as artifacts of the parent run, importance as its metrics."""
        parent = status.mlflow.parent_run_id if status.mlflow else None
        if parent:
            self.tracker.log_report(parent, files, importance)


def _metrics(spec: SweepSpec) -> tuple[str, ...]:
    """The objective's metrics, whose curves early stopping and the report read."""
    return tuple(sorted({spec.objective.metric, *(m.name for m in spec.objective.metrics or [])}))


def results_of(uri: str, experiment_id: str, sweep: str) -> dict[str, dict[str, Any]]:
    """Every trial run's results of another sweep (a warm start's), read once."""
    return SweepRuns(uri).trial_results(experiment_id, sweep)

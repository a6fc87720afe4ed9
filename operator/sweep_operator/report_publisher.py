"""Publishing the sweep report (report.py makes the files): the ConfigMap `<sweep>-report`,
the parent run's artifacts, and parameter importance computed in the background."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

from sweep_operator.api import ParameterImportance, SweepSpec, SweepStatus
from sweep_operator.importance import parameter_importance
from sweep_operator.kube_writes import SweepWriter
from sweep_operator.mlflow_runs import RunsCache
from sweep_operator.objective import scorer
from sweep_operator.render import SweepRef
from sweep_operator.report import (
    best_config_yaml,
    correlations_csv,
    importance_csv,
    learning_curves_png,
    optimization_plot_png,
    sensitivity_csv,
    trials_summary_csv,
)
from sweep_operator.trials import ObservedTrial, TrialState

# Parameter importance (several fANOVA fits, seconds at 1,000 trials) runs here, off the
# reconcile: one computation at a time for all sweeps, at most one queued per sweep.
_importance_pool = ThreadPoolExecutor(1, thread_name_prefix="lorasweep-importance")
# Reports are published here, off the reconcile, one at a time per sweep: drawing the plots of
# 2,000 trials, reading their curves and uploading took 24 s in a reconcile, and no trial was
# created meanwhile.
_publish_pool = ThreadPoolExecutor(2, thread_name_prefix="lorasweep-report")


class ReportPublisher:
    """One sweep's report. Importance is computed from the trials of a report and published
    with the next one; status keeps the last one computed."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.importance: ParameterImportance | None = None
        self.job: Future[ParameterImportance] | None = None
        self.basis: tuple | None = None  # the scored trials it was asked for
        self.publishing: Future[bool] | None = None  # the report being published

    def collect_importance(self) -> bool:
        """Take a finished importance computation; whether there is a new one (the report is
        then due again, to publish it)."""
        job = self.job
        if job is None or not job.done():
            return False
        self.job = None
        try:
            self.importance = job.result()
        except Exception as error:
            self.logger.warning("cannot compute parameter importance: %s", error)
            self.basis = None  # asked again with the next report
            return False
        return True

    def publish(
        self,
        writer: SweepWriter,
        runs: RunsCache | None,
        sweep: SweepRef,
        spec: SweepSpec,
        observed: list[ObservedTrial],
        status: SweepStatus,
        at_once: bool = False,
    ) -> bool:
        """Start publishing the report of these trials in the background (`at_once`: publish
        it now), and computing their importance; whether it started (not while the last
        report is being published), or with `at_once`, whether it was published.

        The report: best_config.yaml, trials_summary.csv, importance.csv, sensitivity.csv and
        correlations.csv in the ConfigMap, those and the plots as artifacts of the parent run,
        importance as its metrics."""
        if self.publishing_now:
            return False
        importance, best = self.importance, status.best_trial

        def write() -> bool:
            try:
                files: dict[str, str | bytes] = {
                    "best_config.yaml": best_config_yaml(spec, best, sweep_name=sweep.name),
                    "trials_summary.csv": trials_summary_csv(spec, observed),
                    "importance.csv": importance_csv(importance),
                    "sensitivity.csv": sensitivity_csv(spec, observed),
                    "correlations.csv": correlations_csv(spec, observed),
                }
                writer.write_report(sweep, {k: v for k, v in files.items() if isinstance(v, str)})
                if runs is not None and status.mlflow and status.mlflow.parent_run_id:
                    # With early stopping the trials have their curves already.
                    curved = observed if spec.early_stopping else runs.with_curves(spec, observed)
                    files["optimization_plot.png"] = optimization_plot_png(spec, curved)
                    files["learning_curves.png"] = learning_curves_png(
                        spec, curved, best.name if best else None
                    )
                    shares = importance.parameters if importance else []
                    runs.log_report(status, files, {share.name: share.percent for share in shares})
            except Exception as error:
                self.logger.warning("cannot publish the sweep report yet: %s", error)
                return False
            return True

        self._start_importance(spec, observed)
        if at_once:
            return write()
        self.publishing = _publish_pool.submit(write)
        return True

    @property
    def publishing_now(self) -> bool:
        return self.publishing is not None and not self.publishing.done()

    def failed(self) -> bool:
        """Whether the last report could not be published (it is due again)."""
        job = self.publishing
        if job is None or not job.done():
            return False
        self.publishing = None
        return not job.result()

    def _start_importance(self, spec: SweepSpec, observed: list[ObservedTrial]) -> None:
        """Ask the background pool for the importance of these trials, unless it is computing
        one already or was asked for the same scored trials before."""
        score = scorer(spec, observed)
        basis = tuple((t.name, score.value(t)) for t in observed if t.state == TrialState.SUCCEEDED)
        if self.job is not None or basis == self.basis:
            return
        self.basis = basis
        self.job = _importance_pool.submit(parameter_importance, spec, observed)

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


class ReportPublisher:
    """One sweep's report. Importance is computed from the trials of a report and published
    with the next one; status keeps the last one computed."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.importance: ParameterImportance | None = None
        self.job: Future[ParameterImportance] | None = None
        self.basis: tuple | None = None  # the scored trials it was asked for

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
    ) -> bool:
        """best_config.yaml, trials_summary.csv, importance.csv, sensitivity.csv and
        correlations.csv in the ConfigMap, those and the plots as artifacts of the parent run,
        importance as its metrics; then importance of these trials is asked for. Whether it
        was published (else it is tried again)."""
        files: dict[str, str | bytes] = {
            "best_config.yaml": best_config_yaml(spec, status.best_trial, sweep_name=sweep.name),
            "trials_summary.csv": trials_summary_csv(spec, observed),
            "importance.csv": importance_csv(self.importance),
            "sensitivity.csv": sensitivity_csv(spec, observed),
            "correlations.csv": correlations_csv(spec, observed),
        }
        try:
            writer.write_report(sweep, {k: v for k, v in files.items() if isinstance(v, str)})
            if runs is not None and status.mlflow and status.mlflow.parent_run_id:
                if not spec.early_stopping:  # with it, the trials have their curves already
                    observed = runs.with_curves(spec, observed)
                best = status.best_trial.name if status.best_trial else None
                files["optimization_plot.png"] = optimization_plot_png(spec, observed)
                files["learning_curves.png"] = learning_curves_png(spec, observed, best)
                shares = self.importance.parameters if self.importance else []
                runs.log_report(status, files, {share.name: share.percent for share in shares})
        except Exception as error:
            self.logger.warning("cannot publish the sweep report yet: %s", error)
            return False
        self._start_importance(spec, observed)
        return True

    def _start_importance(self, spec: SweepSpec, observed: list[ObservedTrial]) -> None:
        """Ask the background pool for the importance of these trials, unless it is computing
        one already or was asked for the same scored trials before."""
        score = scorer(spec, observed)
        basis = tuple((t.name, score.value(t)) for t in observed if t.state == TrialState.SUCCEEDED)
        if self.job is not None or basis == self.basis:
            return
        self.basis = basis
        self.job = _importance_pool.submit(parameter_importance, spec, observed)

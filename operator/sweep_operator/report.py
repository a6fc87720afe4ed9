"""The sweep report, as files: best_config.yaml, trials_summary.csv, optimization_plot.png,
and parameter importance. Pure: text, bytes and dicts in, the adapters store them (ConfigMap,
MLflow artifacts, status)."""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import yaml

from sweep_operator.api import BestTrial, SweepSpec
from sweep_operator.objective import minimizing, scorer
from sweep_operator.space import searched
from sweep_operator.trials import ObservedTrial, TrialState


def best_config_yaml(spec: SweepSpec, best: BestTrial | None, *, sweep_name: str) -> str:
    """The best trial's full training config: the fixed settings plus its parameters."""
    document: dict[str, Any] = {
        "sweep": sweep_name,
        "objective": {"metric": spec.objective.metric, "goal": spec.objective.goal},
    }
    if best is None:
        document["best_trial"] = None
    else:
        document["best_trial"] = {
            "name": best.name,
            "index": best.index,
            "value": best.value,
            "mlflow_run_id": best.mlflow_run_id,
        }
        config: dict[str, Any] = {}
        if spec.trainer.model is not None:
            config["model_name_or_path"] = spec.trainer.model
        config.update(spec.trainer.config)
        config.update(best.parameters)
        document["parameters"] = dict(sorted(best.parameters.items()))
        document["config"] = dict(sorted(config.items()))
    return yaml.safe_dump(document, sort_keys=False)


def _duration(trial: ObservedTrial) -> float | None:
    if trial.start_time and trial.finish_time:
        return (trial.finish_time - trial.start_time).total_seconds()
    return None


def trials_summary_csv(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> str:
    """One row per trial in index order: params, objective, state, duration in seconds."""
    trials = sorted(trials, key=lambda t: t.index)
    names = sorted({name for t in trials for name in t.parameters} | set(spec.parameters))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", "name", "state", *names, "objective", "duration_s"])
    score = scorer(spec, trials)
    for t in trials:
        value = score.value(t) if t.state == TrialState.SUCCEEDED else None
        duration = _duration(t)
        writer.writerow(
            [
                t.index,
                t.name,
                t.state.value,
                *(t.parameters.get(name, "") for name in names),
                "" if value is None else repr(value),
                "" if duration is None else f"{duration:g}",
            ]
        )
    return out.getvalue()


def best_so_far(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> list[tuple[int, float, float]]:
    """(index, objective, best objective up to this index) of the scored trials."""
    better = min if minimizing(spec) else max
    points: list[tuple[int, float, float]] = []
    score = scorer(spec, trials)
    for t in sorted(trials, key=lambda t: t.index):
        value = score.value(t) if t.state == TrialState.SUCCEEDED else None
        if value is None:
            continue
        best = better(value, points[-1][2]) if points else value
        points.append((t.index, value, best))
    return points


def optimization_plot_png(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> bytes:
    """Objective per trial (dots) with the best-so-far line, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display in the operator's pod
    from matplotlib.figure import Figure

    points = best_so_far(spec, trials)
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    if points:
        index, value, best = zip(*points, strict=True)
        axes.scatter(index, value, s=16, color="tab:blue", label="trial objective")
        axes.step(index, best, where="post", color="tab:red", label="best so far")
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no scored trial yet", ha="center", va="center")
    axes.set_xlabel("trial index")
    axes.set_ylabel(f"{spec.objective.metric} ({spec.objective.goal})")
    axes.set_title("optimization history")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def parameter_importance(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> dict[str, float]:
    """Share of the objective's variance each searched parameter explains (fANOVA, seeded).

    Empty until at least two trials have different scores: importance needs variation.
    """
    import optuna

    from sweep_operator.tpe import build_study

    score = scorer(spec, trials)
    finished = [t for t in trials if t.state == TrialState.SUCCEEDED and score.value(t) is not None]
    values = {score.value(t) for t in finished}
    if len(values) < 2 or spec.objective.mode == "pareto":
        return {}
    study = build_study(spec, finished)
    # fANOVA cannot rate a parameter that took a single value in the history.
    dimensions = [
        name
        for name in sorted(searched(spec.parameters))
        if len({repr(t.parameters.get(name)) for t in finished}) > 1
    ]
    if not dimensions:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        importance = optuna.importance.get_param_importances(
            study,
            evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            params=dimensions,
        )
    return {name: round(share, 4) for name, share in importance.items() if math.isfinite(share)}

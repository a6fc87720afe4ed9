"""The sweep report, as files: best_config.yaml, trials_summary.csv, optimization_plot.png,
importance.csv, sensitivity.csv, correlations.csv and learning_curves.png. Pure: text, bytes
and dicts in, the adapters store them (ConfigMap, MLflow artifacts, status).

What a tuner reads to narrow a search: which values of each parameter did well (sensitivity:
the objective's mean, standard deviation and count per value, ranges cut into bins), which
way each parameter pulls (correlations), how much of the objective's variance each explains
(importance, in percent with its spread, from importance.py), and how the trials learned (all
learning curves, the stopped ones marked)."""

from __future__ import annotations

import csv
import io
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from sweep_operator.api import BestTrial, ParameterImportance, ParameterSpec, SweepSpec
from sweep_operator.objective import minimizing, scorer
from sweep_operator.render import trainer_settings
from sweep_operator.space import searched
from sweep_operator.trials import Curve, ObservedTrial, TrialState

# Ranges are cut into this many bins for the sensitivity table (in log space for
# log_uniform); an int range with at most this many points keeps its values.
SENSITIVITY_BINS = 5


def best_config_yaml(spec: SweepSpec, best: BestTrial | None, *, sweep_name: str) -> str:
    """The best trial's full training config, as the bundled trainer's settings: the model, the
    data files and the fixed settings plus its parameters. Its `config` mapping is what
    `python -m lora_trainer --config` reads, to train the winner again outside the sweep."""
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
        config = trainer_settings(spec, best.parameters)
        document["parameters"] = dict(sorted(best.parameters.items()))
        document["config"] = dict(sorted(config.items()))
    return yaml.safe_dump(document, sort_keys=False)


def _duration(trial: ObservedTrial) -> float | None:
    if trial.start_time and trial.finish_time:
        return (trial.finish_time - trial.start_time).total_seconds()
    return None


def trials_summary_csv(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> str:
    """One row per trial in index order: params, state, objective, each of
    spec.objective.additionalMetrics (as the trial last reported it), duration in seconds."""
    trials = sorted(trials, key=lambda t: t.index)
    names = sorted({name for t in trials for name in t.parameters} | set(spec.parameters))
    extra = spec.objective.additional_metrics
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", "name", "state", *names, "objective", *extra, "duration_s"])
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
                *(repr(t.metrics[name]) if name in t.metrics else "" for name in extra),
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


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display in the operator's pod
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(figure: Any) -> bytes:
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def optimization_plot_png(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> bytes:
    """Objective per trial (dots) with the best-so-far line, as PNG bytes."""
    points = best_so_far(spec, trials)
    figure = _figure(7, 4)
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
    return _png(figure)


def importance_csv(importance: ParameterImportance | None) -> str:
    """Every searched parameter's share of the objective's variance, in percent: the mean over
    the bootstrap resamples, the lowest and highest, and whether it is above the random
    reference (its last row); no rows before it is computed (see importance.py)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["parameter", "percent", "min_percent", "max_percent", "signal"])
    rows = (
        [(share, str(share.signal).lower()) for share in importance.parameters]
        if importance
        else []
    )
    if importance and importance.reference:
        rows.append((importance.reference, ""))
    for share, signal in rows:
        writer.writerow(
            [share.name, f"{share.percent:g}", f"{share.min:g}", f"{share.max:g}", signal]
        )
    return out.getvalue()


def _scored(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> list[tuple[ObservedTrial, float]]:
    """(trial, objective) of the scored trials, in index order."""
    score = scorer(spec, trials)
    return [
        (t, value)
        for t in sorted(trials, key=lambda t: t.index)
        if t.state == TrialState.SUCCEEDED and (value := score.value(t)) is not None
    ]


def _bins(spec: ParameterSpec) -> list[tuple[float, float]] | None:
    """The sensitivity bins of a range, None for a parameter whose values are listed (or an int
    range with few points), which is tabled per value."""
    if spec.values is not None or spec.min is None or spec.max is None:
        return None
    if spec.type == "int" and (spec.max - spec.min) // (spec.step or 1) < SENSITIVITY_BINS:
        return None
    log = spec.type == "log_uniform"
    low, high = (math.log(spec.min), math.log(spec.max)) if log else (spec.min, spec.max)
    edges = [low + (high - low) * i / SENSITIVITY_BINS for i in range(SENSITIVITY_BINS + 1)]
    if log:
        edges = [math.exp(e) for e in edges]
    edges[0], edges[-1] = spec.min, spec.max  # exact bounds, whatever exp(log(x)) gives
    return list(itertools.pairwise(edges))


def _int_points(spec: ParameterSpec) -> list[int]:
    assert spec.min is not None and spec.max is not None  # an int range
    return list(range(int(spec.min), int(spec.max) + 1, spec.step or 1))


def _label(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def sensitivity_csv(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> str:
    """The objective's mean, standard deviation and count per value of each searched
    parameter, over the scored trials. Listed values appear in their order (count 0 for one
    no scored trial had); ranges are cut into SENSITIVITY_BINS equal bins, in log space for
    log_uniform, each [low, high) but the last [low, high]."""
    scored = _scored(spec, trials)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["parameter", "value", "mean", "std", "count"])
    for name, parameter in sorted(searched(spec.parameters).items()):
        groups: list[tuple[str, list[float]]] = []
        bins = _bins(parameter)
        if bins is not None:
            for i, (low, high) in enumerate(bins):
                last = i == len(bins) - 1
                inside = [
                    value
                    for t, value in scored
                    if low <= t.parameters[name] < high or (last and t.parameters[name] == high)
                ]
                groups.append((f"[{low:.4g}, {high:.4g}{']' if last else ')'}", inside))
        else:
            values = parameter.values or _int_points(parameter)
            groups = [
                (_label(v), [value for t, value in scored if t.parameters[name] == v])
                for v in values
            ]
        for label, values in groups:
            writer.writerow(
                [
                    name,
                    label,
                    f"{statistics.fmean(values):.6g}" if values else "",
                    f"{statistics.stdev(values):.6g}" if len(values) > 1 else "",
                    len(values),
                ]
            )
    return out.getvalue()


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None when either side does not vary."""
    rx, ry = _ranks(xs), _ranks(ys)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return None
    return statistics.correlation(rx, ry)


def correlation_ratio(groups: Sequence[Sequence[float]]) -> float | None:
    """eta: the share of the values' spread that lies between the groups (0 to 1, the square
    root of the between-group over the total sum of squares); None without spread."""
    values = [v for g in groups for v in g]
    mean = statistics.fmean(values)
    total = sum((v - mean) ** 2 for v in values)
    if total == 0:
        return None
    between = sum(len(g) * (statistics.fmean(g) - mean) ** 2 for g in groups if g)
    return math.sqrt(between / total)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def correlations_csv(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> str:
    """How each searched parameter goes with the objective, over the scored trials: Spearman's
    rank correlation for a numeric parameter (its sign says which way; it is the same in log
    space), the correlation ratio eta for a categorical one (strings or booleans: strength
    only, no sign). Empty where a side does not vary or fewer than 3 trials are scored."""
    scored = _scored(spec, trials)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["parameter", "method", "correlation", "count"])
    for name in sorted(searched(spec.parameters)):
        seen = [t.parameters[name] for t, _ in scored]
        objective = [value for _, value in scored]
        coefficient: float | None = None
        if all(_numeric(v) for v in seen):
            method = "spearman"
            if len(scored) >= 3:
                coefficient = spearman([float(v) for v in seen], objective)
        else:
            method = "eta"
            if len(scored) >= 3:
                keys = [repr(v) for v in seen]
                groups = [
                    [value for k, value in zip(keys, objective, strict=True) if k == key]
                    for key in sorted(set(keys))
                ]
                coefficient = correlation_ratio(groups) if len(groups) > 1 else None
        shown = "" if coefficient is None else f"{coefficient:.4f}"
        writer.writerow([name, method, shown, len(scored)])
    return out.getvalue()


@dataclass(frozen=True)
class CurveLine:
    """One trial's learning curve as plotted."""

    name: str
    state: TrialState
    points: Curve
    best: bool = False

    @property
    def stopped(self) -> bool:
        return self.state == TrialState.STOPPED


def curve_lines(
    spec: SweepSpec, trials: Sequence[ObservedTrial], best: str | None = None
) -> list[CurveLine]:
    """The objective metric's learning curve of every trial that logged one, in index order;
    `best` names the best trial."""
    metric = spec.objective.metric
    lines = []
    for t in sorted(trials, key=lambda t: t.index):
        points = sorted(p for p in t.curves.get(metric, []) if math.isfinite(p.value))
        if points:
            lines.append(CurveLine(t.name, t.state, points, best=t.name == best))
    return lines


def learning_curves_png(
    spec: SweepSpec, trials: Sequence[ObservedTrial], best: str | None = None
) -> bytes:
    """Every trial's learning curve; stopped trials dashed, with an x where they
    stopped; the best trial in red."""
    lines = curve_lines(spec, trials, best)
    figure = _figure(8, 5)
    axes = figure.subplots()
    labelled: set[str] = set()

    def label(kind: str) -> str | None:
        first = kind not in labelled
        labelled.add(kind)
        return kind if first else None

    for line in lines:
        steps = [p.step for p in line.points]
        values = [p.value for p in line.points]
        if line.best:
            axes.plot(steps, values, color="tab:red", lw=2, label=f"best: {line.name}", zorder=3)
        elif line.stopped:
            axes.plot(steps, values, color="tab:gray", ls="--", lw=1, label=label("stopped"))
            axes.plot(steps[-1:], values[-1:], "x", color="tab:gray", ms=7)
        elif line.state.active:
            axes.plot(steps, values, color="tab:green", lw=1, alpha=0.7, label=label("running"))
        else:
            axes.plot(steps, values, color="tab:blue", lw=1, alpha=0.6, label=label(line.state))
    if lines:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no learning curve yet", ha="center", va="center")
    axes.set_xlabel("step")
    axes.set_ylabel(f"{spec.objective.metric} ({spec.objective.goal})")
    axes.set_title("learning curves")
    return _png(figure)

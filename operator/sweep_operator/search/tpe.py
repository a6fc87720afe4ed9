"""TPE search through optuna, rebuilt from the observed trials on every call.

The operator keeps no study between reconciles: `build_study` recreates an in-memory optuna
study from the trials in the cluster (sorted by index, so the order they were observed in does
not matter), and `suggest` asks it for one new trial. The sampler's seed is derived from
(algorithm.seed, trial index), so the same seed and the same history give the same
parameters, before or after an operator restart.

Trials still running are added as RUNNING; with `constant_liar` TPE treats them as bad
results, so trials asked for in parallel do not all land on the same point.

Algorithm bohb (bohb.py) is the same sampler fitted on other values: each trial's objective
at one rung of the early-stopping schedule, so that the many trials Hyperband stops early
teach the model as much as the few it trains in full.

Past HISTORY_LIMIT trials TPE learns from a bounded selection (`learnt_from`): every active
trial, the BEST_KEPT best scored ones and the most recent others. optuna's TPE models the good
region from at most its 25 best trials and weights older trials less, so the trials left out
(old, not among the best) change little of the model, while each of them would add to the
cost of rebuilding the study and of every ask: at 10,000 trials that cost was seconds per
proposal. The selection is a function of the history alone, so a restart proposes the same.

Infeasible configurations teach TPE where not to go, through optuna's constraints (a trial
with a positive constraint value is infeasible and ranked below every feasible one): trials
that ran out of GPU memory, and points it proposes whose estimated memory exceeds
spec.constraints.maxGpuMemoryGiB, which are refused and asked again.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, create_trial

from sweep_operator.api import ParameterSpec, SweepSpec
from sweep_operator.constraints import (
    MAX_DRAWS,
    NoFeasibleConfiguration,
    drawn_parameters,
    estimate_for,
    memory_limit,
    too_big,
)
from sweep_operator.early_stopping import arrival
from sweep_operator.objective import Scorer, minimizing, objective_values, scorer
from sweep_operator.search.base import Suggester
from sweep_operator.space import SIGNIFICANT_DIGITS, in_space, searched, with_derived
from sweep_operator.trials import ObservedTrial, TrialState

# optuna logs every trial added to a study at INFO; the operator adds them on every reconcile.
optuna.logging.set_verbosity(optuna.logging.WARNING)

HISTORY_LIMIT = 1000
BEST_KEPT = 100

# The optuna constraint of GPU memory: GiB over spec.constraints.maxGpuMemoryGiB for a refused
# point, 1 for a trial that ran out of memory (by how much is unknown).
MEMORY_CONSTRAINT = "gpu_memory"
OUT_OF_MEMORY = 1.0


def distribution(spec: ParameterSpec) -> BaseDistribution:
    """The optuna distribution of one searched parameter."""
    if spec.values is not None:
        return CategoricalDistribution(spec.values)
    assert spec.min is not None and spec.max is not None  # ParameterSpec validated it
    if spec.type == "int":
        return IntDistribution(int(spec.min), int(spec.max), step=spec.step or 1)
    return FloatDistribution(spec.min, spec.max, log=spec.type == "log_uniform")


def distributions(spec: SweepSpec) -> dict[str, BaseDistribution]:
    return {name: distribution(p) for name, p in sorted(searched(spec.parameters).items())}


def _directions(spec: SweepSpec) -> list[str]:
    if spec.objective.mode == "pareto" and spec.objective.metrics:
        return [m.goal for m in spec.objective.metrics]
    return [spec.objective.goal]


def _at_budget(
    trial: ObservedTrial, budget: int, params: dict[str, Any], dists: Any, score: Scorer
) -> FrozenTrial | None:
    """The trial as what it scored at step `budget`; running below it, or nothing when it
    stopped short of it."""
    point = arrival(score.curve(trial), budget)
    if point is not None and math.isfinite(point.value):
        return create_trial(values=[point.value], params=params, distributions=dists)
    if trial.state.active:
        return create_trial(
            state=optuna.trial.TrialState.RUNNING, params=params, distributions=dists
        )
    return None


def _frozen(
    spec: SweepSpec,
    trial: ObservedTrial,
    dists: dict[str, BaseDistribution],
    budget: int | None,
    score: Scorer,
) -> FrozenTrial | None:
    """The trial as optuna history, None when it teaches TPE nothing (failed, unscored)."""
    if in_space(spec.parameters, trial.parameters) is not None:
        return None
    params = {name: trial.parameters[name] for name in dists}
    if trial.state == TrialState.INFEASIBLE:  # whatever the budget: it never fits
        return create_trial(
            state=optuna.trial.TrialState.PRUNED,
            params=params,
            distributions=dists,
            constraints={MEMORY_CONSTRAINT: OUT_OF_MEMORY},
        )
    if budget is not None:
        return _at_budget(trial, budget, params, dists, score)
    pareto = len(_directions(spec)) > 1
    if trial.state.active:
        return create_trial(
            state=optuna.trial.TrialState.RUNNING, params=params, distributions=dists
        )
    if trial.state == TrialState.SUCCEEDED:
        if pareto:
            values = objective_values(spec, trial)
            scores = list(values.values()) if values else None
        else:
            value = score.value(trial)
            scores = None if value is None else [value]
        if scores is None:
            return None
        return create_trial(values=scores, params=params, distributions=dists)
    if trial.state == TrialState.STOPPED and not pareto:
        # TPE ranks pruned trials by how far they got and their last intermediate value.
        curve = score.curve(trial)
        return create_trial(
            state=optuna.trial.TrialState.PRUNED,
            params=params,
            distributions=dists,
            intermediate_values={p.step: p.value for p in curve if math.isfinite(p.value)},
        )
    return None


def build_study(
    spec: SweepSpec, trials: Sequence[ObservedTrial], budget: int | None = None
) -> optuna.Study:
    """An in-memory study holding the trials' history (sampler: a plain seeded TPE); with a
    `budget`, each trial as what it scored at that step."""
    return _study(spec, trials, _sampler(spec, 0), budget=budget)


def _sampler(spec: SweepSpec, index: int) -> optuna.samplers.TPESampler:
    # One seed per trial index: trial i's draw does not depend on how many asks came before.
    digest = hashlib.sha256(f"{spec.algorithm.seed}:{index}".encode()).digest()
    with warnings.catch_warnings():
        # multivariate and constant_liar are flagged experimental; both are stable enough
        # and multivariate TPE models the interactions between LoRA rank and learning rate.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=int.from_bytes(digest[:4], "big"),
            n_startup_trials=spec.algorithm.startup_trials,
            multivariate=True,
            constant_liar=True,
        )


def learnt_from(
    spec: SweepSpec, trials: Sequence[ObservedTrial], score: Scorer
) -> list[ObservedTrial]:
    """The trials TPE learns from, in index order: all of them up to HISTORY_LIMIT; beyond,
    the active ones, the BEST_KEPT best scored ones and the most recent (highest index) others."""
    ordered = sorted(trials, key=lambda t: t.index)
    if len(ordered) <= HISTORY_LIMIT:
        return ordered
    sign = 1.0 if minimizing(spec) else -1.0
    scored = [
        (v, t.index) for t in ordered if (v := score.value(t)) is not None and math.isfinite(v)
    ]
    kept = {index for _, index in sorted((sign * v, i) for v, i in scored)[:BEST_KEPT]}
    kept |= {t.index for t in ordered if t.state.active}
    for trial in reversed(ordered):
        if len(kept) >= HISTORY_LIMIT:
            break
        kept.add(trial.index)
    return [t for t in ordered if t.index in kept]


def _study(
    spec: SweepSpec,
    trials: Sequence[ObservedTrial],
    sampler: optuna.samplers.BaseSampler,
    prior: Sequence[ObservedTrial] = (),
    budget: int | None = None,
) -> optuna.Study:
    """The study of the sweep's trials (by index), after `prior`: earlier sweeps' trials of a
    warm start, in their given order, scored with the sweep's own (one objective scale)."""
    dists = distributions(spec)
    study = optuna.create_study(directions=_directions(spec), sampler=sampler)
    score = scorer(spec, [*prior, *trials])
    ordered = [*prior, *learnt_from(spec, trials, score)]
    history = [_frozen(spec, t, dists, budget, score) for t in ordered]
    study.add_trials([t for t in history if t is not None])
    return study


def _round(value: Any, dist: BaseDistribution) -> Any:
    # Same precision as random search: short on a command line and in MLflow's params.
    if isinstance(dist, FloatDistribution):
        rounded = float(f"{value:.{SIGNIFICANT_DIGITS}g}")
        return min(max(rounded, dist.low), dist.high) if math.isfinite(rounded) else value
    return value


def suggest(
    spec: SweepSpec,
    trials: Sequence[ObservedTrial],
    index: int,
    prior: Sequence[ObservedTrial] = (),
    budget: int | None = None,
) -> dict[str, Any]:
    """Parameters of new trial `index` given every trial so far (derived parameters included).

    `trials` holds the finished trials (their results teach the model) and the active ones
    (treated as running, so that parallel asks spread out); `prior` the warm-start trials of
    earlier sweeps, learnt from first; `budget` the step whose values the model is fitted on
    (None: final values). With a memory limit, a point over it is told to the study as
    infeasible and the model asked again.
    """
    study = _study(spec, trials, _sampler(spec, index), prior, budget)
    dists = distributions(spec)
    limit = memory_limit(spec)
    smallest: tuple[float, dict[str, Any]] | None = None
    for _ in range(MAX_DRAWS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            asked = study.ask(dists)
        point = with_derived(
            spec, {name: _round(asked.params[name], dists[name]) for name in dists}
        )
        if limit is None:
            return point
        gib = estimate_for(spec, point).gib
        if gib <= limit:
            return point
        if smallest is None or gib < smallest[0]:
            smallest = (gib, point)
        asked.set_constraint(MEMORY_CONSTRAINT, gib - limit)
        study.tell(asked, state=optuna.trial.TrialState.PRUNED)
    raise NoFeasibleConfiguration(
        too_big(spec, smallest, f"none of the {MAX_DRAWS} points TPE proposed for trial {index}")
    )


def startup_trials(spec: SweepSpec, warm_trials: int) -> int:
    """Random trials before TPE guides: startupTrials, less one per warm-start trial."""
    return max(0, spec.algorithm.startup_trials - warm_trials)


class TpeSearch(Suggester):
    """startupTrials random draws (fewer by a warm start's trials), then TPE's proposals."""

    def fixed(self, index: int) -> dict[str, Any] | None:
        if index < startup_trials(self.spec, self.warm_trials):
            return drawn_parameters(self.spec, index)
        return None

    def budget(self, trials: Sequence[ObservedTrial]) -> int | None:
        """The step whose objective values the model is fitted on; None: final values."""
        return None

    def propose(
        self,
        index: int,
        history: Sequence[ObservedTrial],
        prior: Sequence[ObservedTrial] = (),
    ) -> dict[str, Any]:
        parameters = self.fixed(index)
        if parameters is not None:
            return parameters
        return suggest(self.spec, history, index, prior, self.budget(history))

    def mismatch(self, trial: ObservedTrial) -> str | None:
        # A warm-started sweep has fewer random trials, fewer by the size of its warm-start
        # history, which a deleted earlier sweep changes: any of its trials may be TPE's.
        if self.spec.algorithm.warm_start is None and self.fixed(trial.index) is not None:
            return super().mismatch(trial)
        # TPE's trials depend on the results at the time they were created: only check that
        # they are a point of the space and that the derived parameters follow from it.
        problem = in_space(self.spec.parameters, trial.parameters)
        if problem:
            return f"which are not in the current search space ({problem})"
        point = {name: trial.parameters[name] for name in searched(self.spec.parameters)}
        expected = with_derived(self.spec, point)
        if expected != trial.parameters:
            return f"but the current search space gives {expected} for index {trial.index}"
        return None

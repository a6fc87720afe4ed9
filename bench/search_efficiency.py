"""Search efficiency: trial-steps to a near-optimal configuration, per search strategy.

Every strategy runs through the operator's own trial planner
(`sweep_operator.trial_plan.plan_trials`) with a fake clock, exactly as the operator would:
every reconcile, each running trial has trained RECONCILE_STEPS more steps and logged its eval
loss at the surface's eval cadence, and the planner decides what to create and what to stop.
Two surfaces:

- recorded: real learning curves of the bundled trainer, one per configuration of a grid
  (`bench/data/lora_curves.json.gz`, written by `bench/record_curves.py`). The sweep searches
  that grid (categorical parameters), and a trial replays the recorded curve of its
  configuration.
- synthetic: a formula with a known optimum, noise, plateaus and late divergence, searched
  over continuous ranges.

The target is near the optimum: the best 1% of the surface's configurations (recorded: of the
grid; synthetic: of 20,000 random draws). Cost is counted in trial-steps (the sum of the steps
all trials trained, i.e. GPU time) until the sweep's own bestTrial is a configuration whose
true final loss meets the target; a run that never gets there counts everything it spent,
and its hit rate says how often that happened. Every sweep then runs to its end, and the final
regret is the true final loss of its bestTrial minus the best of the surface.

    .venv/bin/python bench/search_efficiency.py [--seeds 50] [--case recorded|synthetic]

Prints one JSON line: per case and strategy, the median and interquartile range of the
trial-steps to the target, the hit rate, the median final regret, and the ratio of the median
trial-steps to random search's.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from sweep_operator.api import SweepSpec  # noqa: E402
from sweep_operator.trial_plan import plan_trials  # noqa: E402
from sweep_operator.trials import ObservedTrial, Point, TrialState  # noqa: E402

RECORDING = REPO / "bench" / "data" / "lora_curves.json.gz"
T0 = datetime(2025, 1, 1, tzinfo=UTC)
TARGET_QUANTILE = 0.01


@dataclass(frozen=True)
class Surface:
    """What a benchmark sweep searches: its space, its curves and the truth about them."""

    name: str
    parameters: dict[str, Any]  # spec.parameters of the sweep
    max_steps: int
    eval_every: int
    # (parameters, seed) -> the points a trial logs, in step order, made as it trains
    curve: Callable[[dict[str, Any], int], Iterator[tuple[int, float]]]
    final: Callable[[dict[str, Any]], float]  # the true final loss of a configuration
    optimum: float
    target: float
    max_trials: int
    parallelism: int


@functools.cache
def recorded_surface(path: Path = RECORDING) -> Surface:
    data = json.loads(gzip.decompress(path.read_bytes()))
    grid: dict[str, list[Any]] = data["meta"]["grid"]
    names = sorted(grid)

    def key(parameters: dict[str, Any]) -> tuple:
        return tuple(parameters[name] for name in names)

    table = {key(c["parameters"]): c for c in data["configs"]}

    def final(parameters: dict[str, Any]) -> float:
        value = table[key(parameters)]["final"]
        return math.inf if value is None else value

    def curve(parameters: dict[str, Any], seed: int) -> Iterator[tuple[int, float]]:
        for step, value in table[key(parameters)]["curve"]:
            yield step, math.nan if value is None else value

    finals = sorted(final(c["parameters"]) for c in data["configs"])
    return Surface(
        name="recorded",
        parameters={name: {"values": values} for name, values in grid.items()},
        max_steps=data["meta"]["max_steps"],
        eval_every=data["meta"]["eval_every"],
        curve=curve,
        final=final,
        optimum=finals[0],
        target=finals[max(0, math.ceil(TARGET_QUANTILE * len(finals)) - 1)],
        max_trials=len(finals),
        parallelism=8,
    )


SYNTHETIC_RANGES = {
    "learning_rate": {"type": "log_uniform", "min": 1e-5, "max": 3e-3},
    "lora_rank": {"type": "int", "min": 4, "max": 64, "step": 4},
    "lora_dropout": {"type": "uniform", "min": 0.0, "max": 0.2},
}
SYNTHETIC_STEPS = 810
SYNTHETIC_EVAL_EVERY = 10
SYNTHETIC_NOISE = 0.01


def synthetic_final(p: dict[str, Any]) -> float:
    """The noise-free loss a trial ends at; minimal (0.9) at lr 4e-4, rank ~23, dropout 0.08."""
    return (
        0.9
        + 0.35 * (math.log10(p["learning_rate"]) - math.log10(4e-4)) ** 2
        + 0.02 * (math.log2(p["lora_rank"]) - 4.5) ** 2
        + 0.4 * (p["lora_dropout"] - 0.08) ** 2
    )


def synthetic_loss(p: dict[str, Any], step: int) -> float:
    """The noise-free eval loss at `step`: plateau, exponential decay, late divergence."""
    lr, rank = p["learning_rate"], p["lora_rank"]
    plateau = 30 + 150 * (1e-5 / lr) ** 0.5  # small learning rates stay flat for longer
    tau = 100 * (1e-3 / lr) ** 0.15 * (16 / rank) ** 0.1
    start, end = 2.5, synthetic_final(p)
    if step <= plateau:
        loss = start - 0.05 * step / plateau
    else:
        loss = end + (start - 0.05 - end) * math.exp(-(step - plateau) / tau)
    if lr > 1.5e-3:  # instability: the loss creeps up again late in training
        loss += 0.3 * (lr / 3e-3) * max(0.0, step - 0.6 * SYNTHETIC_STEPS) / SYNTHETIC_STEPS
    return loss


@functools.cache
def synthetic_surface(path: Path = RECORDING) -> Surface:  # path: the signature of a Surface
    from sweep_operator.space import random_point

    spec = SweepSpec.model_validate(sweep_raw(SYNTHETIC_RANGES, "random", 0, 1, 1, None))
    draws = sorted(synthetic_final(random_point(spec.parameters, 12345, i)) for i in range(20_000))

    def curve(parameters: dict[str, Any], seed: int) -> Iterator[tuple[int, float]]:
        noise = random.Random(seed)
        for step in range(SYNTHETIC_EVAL_EVERY, SYNTHETIC_STEPS + 1, SYNTHETIC_EVAL_EVERY):
            yield step, synthetic_loss(parameters, step) + noise.gauss(0, SYNTHETIC_NOISE)

    return Surface(
        name="synthetic",
        parameters=SYNTHETIC_RANGES,
        max_steps=SYNTHETIC_STEPS,
        eval_every=SYNTHETIC_EVAL_EVERY,
        curve=curve,
        final=synthetic_final,
        optimum=0.9,
        target=draws[int(TARGET_QUANTILE * len(draws))],
        max_trials=150,
        parallelism=8,
    )


def early_stopping(kind: str, surface: Surface) -> dict[str, Any] | None:
    """The earlyStopping of each arm, scaled to the surface's trial length: first rung at
    1/27 of the budget (the first eval of the recording), a third of the trials on."""
    first = max(surface.eval_every, surface.max_steps // 27)
    if kind == "median":
        return {"algorithm": "median", "minSteps": surface.max_steps // 9, "minTrials": 3}
    if kind == "asha":
        return {"algorithm": "asha", "minSteps": first, "reductionFactor": 3, "minTrials": 2}
    if kind == "hyperband":
        return {
            "algorithm": "hyperband",
            "minSteps": first,
            "maxSteps": surface.max_steps,
            "reductionFactor": 3,
            "minTrials": 2,
        }
    return None


STRATEGIES = [
    "random",
    "random+median",
    "random+asha",
    "random+hyperband",
    "tpe",
    "tpe+median",
    "tpe+asha",
    "tpe+hyperband",
    "bohb+hyperband",
]
# Run by default: every stopping rule once with random proposals, and TPE alone, with its best
# stopping rule and as bohb (the TPE arms cost the most time to replay).
DEFAULT_STRATEGIES = [
    "random",
    "random+median",
    "random+asha",
    "random+hyperband",
    "tpe",
    "tpe+asha",
    "bohb+hyperband",
]


def sweep_raw(
    parameters: dict[str, Any],
    algorithm: str,
    seed: int,
    max_trials: int,
    parallelism: int,
    stopping: dict[str, Any] | None,
) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "algorithm": {"name": algorithm, "seed": seed, "startupTrials": 10},
        "parameters": parameters,
        "maxTrials": max_trials,
        "parallelism": parallelism,
        "trainer": {"image": "bench", "command": ["true"]},
    }
    if stopping:
        raw["earlyStopping"] = stopping
    return raw


@dataclass
class SimTrial:
    name: str
    index: int
    parameters: dict[str, Any]
    curve: Iterator[tuple[int, float]]  # what it logs as it trains
    state: TrialState = TrialState.RUNNING
    steps: int = 0
    logged: list[Point] = field(default_factory=list)
    pending: tuple[float, float] | None = None  # the next point of `curve`, once drawn
    cached: ObservedTrial | None = None

    def observed(self) -> ObservedTrial:
        # Finished trials do not change: their observation is built once.
        if (
            self.cached is None
            or self.state == TrialState.RUNNING
            or self.cached.state != self.state
        ):
            self.cached = ObservedTrial(
                name=self.name,
                index=self.index,
                parameters=self.parameters,
                state=self.state,
                value=self.logged[-1].value if self.state == TrialState.SUCCEEDED else None,
                curves={"eval_loss": list(self.logged)},
            )
        return self.cached


@dataclass(frozen=True)
class Run:
    steps_to_target: int | None  # None: never met the target
    spent: int  # trial-steps of the whole sweep
    regret: float  # true final loss of the sweep's best trial minus the surface's best


def simulate(surface: Surface, strategy: str, seed: int) -> Run:
    algorithm, _, stopping = strategy.partition("+")
    spec = SweepSpec.model_validate(
        sweep_raw(
            surface.parameters,
            algorithm,
            seed,
            surface.max_trials,
            surface.parallelism,
            early_stopping(stopping, surface),
        )
    )
    trials: dict[str, SimTrial] = {}
    spent, tick, hit_at = 0, 0, None
    reconcile_steps = surface.eval_every  # a reconcile per eval, as the operator is woken
    while True:
        now = T0 + timedelta(seconds=tick)
        result = plan_trials(spec, [t.observed() for t in trials.values()], now, sweep_name="bench")
        for name in result.stop:
            trials[name].state = TrialState.STOPPED
        for new in result.create:
            curve = surface.curve(new.parameters, seed * 100_003 + new.index)
            trials[new.name] = SimTrial(new.name, new.index, new.parameters, curve)
        best = result.status.best_trial
        if hit_at is None and best is not None and surface.final(best.parameters) <= surface.target:
            hit_at = spent
        if result.status.phase in ("Succeeded", "Failed"):
            regret = surface.final(best.parameters) - surface.optimum if best else math.inf
            return Run(hit_at, spent, regret)
        tick += 1
        for trial in trials.values():
            if trial.state != TrialState.RUNNING:
                continue
            before = trial.steps
            trial.steps = min(surface.max_steps, trial.steps + reconcile_steps)
            spent += trial.steps - before
            # Points logged within one reconcile interval get times in step order.
            while trial.pending is None or trial.pending[0] <= trial.steps:
                if trial.pending is not None:
                    step, value = trial.pending
                    trial.logged.append(
                        Point(step, value, tick - 1 + (step - before) / reconcile_steps)
                    )
                trial.pending = next(trial.curve, (math.inf, math.nan))
            if trial.steps >= surface.max_steps:
                trial.state = TrialState.SUCCEEDED


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarize(surface: Surface, runs: dict[str, list[Run]]) -> dict[str, Any]:
    cost = {
        s: [r.steps_to_target if r.steps_to_target is not None else r.spent for r in rs]
        for s, rs in runs.items()
    }
    median = {s: quartiles(c)[1] for s, c in cost.items()}
    return {
        "max_trials": surface.max_trials,
        "max_steps": surface.max_steps,
        "parallelism": surface.parallelism,
        "optimum_loss": round(surface.optimum, 5),
        "target_loss": round(surface.target, 5),
        "median_trial_steps_to_target": median,
        "iqr_trial_steps_to_target": {
            s: [round(q[0]), round(q[2])] for s, c in cost.items() if (q := quartiles(c))
        },
        "hit_rate": {
            s: sum(r.steps_to_target is not None for r in rs) / len(rs) for s, rs in runs.items()
        },
        "median_final_regret": {
            s: round(statistics.median(r.regret for r in rs), 5) for s, rs in runs.items()
        },
        "median_trial_steps_spent": {
            s: statistics.median(r.spent for r in rs) for s, rs in runs.items()
        },
        "ratio_to_random": {
            s: round(m / median["random"], 3) for s, m in median.items() if "random" in median
        },
    }


def _one(case: str, recording: Path, strategy: str, seed: int) -> Run:
    return simulate(SURFACES[case](recording), strategy, seed)


SURFACES: dict[str, Callable[[Path], Surface]] = {
    "recorded": recorded_surface,
    "synthetic": synthetic_surface,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50, help="seeds per strategy (default 50)")
    parser.add_argument("--case", choices=sorted(SURFACES), action="append")
    parser.add_argument("--strategy", choices=STRATEGIES, action="append")
    parser.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--recording", type=Path, default=RECORDING, help="recorded curves")
    args = parser.parse_args()
    cases = args.case or sorted(SURFACES)
    strategies = args.strategy or DEFAULT_STRATEGIES
    began = time.perf_counter()
    figures: dict[str, Any] = {"benchmark": "search_efficiency", "seeds": args.seeds}
    with ProcessPoolExecutor(args.jobs) as pool:
        for case in cases:
            surface = SURFACES[case](args.recording)
            work = {
                s: [pool.submit(_one, case, args.recording, s, seed) for seed in range(args.seeds)]
                for s in strategies
            }
            runs = {s: [f.result() for f in futures] for s, futures in work.items()}
            figures[case] = summarize(surface, runs)
    figures["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

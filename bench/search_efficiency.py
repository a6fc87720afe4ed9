"""Search efficiency: GPU time to get within 1% of the full grid's best, per search strategy.

A benchmark objective with realistic LoRA learning curves is simulated in-process through the
operator's own planner (`sweep_operator.plan.plan`), with a fake clock: every tick each running
trial trains EVAL_EVERY more steps and logs its eval loss, then the planner is called again,
exactly as the operator would on a reconcile. Strategies: grid, random, tpe, tpe + median
stopping, tpe + ASHA. All have the same trial budget (the grid's size) and parallelism.

Cost is counted in trial-steps (the sum of the steps all trials trained, i.e. GPU time; at
STEPS_PER_GPU_HOUR this is also given in GPU-hours), until the sweep's own bestTrial has a true
(noise-free) final loss within 1% of the best grid point's. A run that never gets there counts
all the trial-steps it spent, and the hit rate says how often that happened.

The objective (defined here, known optimum): final eval loss
    0.9 + 0.35 (log10 lr - log10 4e-4)^2 + 0.02 (log2 rank - 4.5)^2 + 0.4 (dropout - 0.08)^2,
minimal (0.9) at lr 4e-4, rank ~23, dropout 0.08. Curves start at 2.5 and, after a warm-up
plateau, decay towards the final loss at a speed that grows with the learning rate; too large
a learning rate diverges late in training; every eval has Gaussian noise.

    .venv/bin/python bench/search_efficiency.py [--seeds 20]

Prints one JSON line: the median trial-steps and GPU-hours per strategy, their ratios against
the grid, and hit rates.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from sweep_operator.api import SweepSpec  # noqa: E402
from sweep_operator.plan import plan  # noqa: E402
from sweep_operator.trials import ObservedTrial, TrialState  # noqa: E402

MAX_STEPS = 1000
EVAL_EVERY = 50
STEPS_PER_GPU_HOUR = 1000  # one trial of the benchmark is one GPU-hour
PARALLELISM = 4
EVAL_NOISE = 0.01
WITHIN = 0.01  # 1% of the grid's best
T0 = datetime(2025, 1, 1, tzinfo=UTC)

GRID = {
    "learning_rate": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
    "lora_rank": [4, 8, 16, 32, 64],
    "lora_dropout": [0.0, 0.1, 0.2],
}
RANGES = {
    "learning_rate": {"type": "log_uniform", "min": 1e-5, "max": 3e-3},
    "lora_rank": {"type": "int", "min": 4, "max": 64, "step": 4},
    "lora_dropout": {"type": "uniform", "min": 0.0, "max": 0.2},
}
EARLY_STOPPING = {
    "tpe+median": {"algorithm": "median", "minSteps": 200, "minTrials": 3},
    "tpe+asha": {"algorithm": "asha", "minSteps": 200, "reductionFactor": 3, "minTrials": 2},
}
STRATEGIES = ["grid", "random", "tpe", "tpe+median", "tpe+asha"]


def final_loss(p: dict[str, Any]) -> float:
    """The noise-free loss a trial ends at."""
    return (
        0.9
        + 0.35 * (math.log10(p["learning_rate"]) - math.log10(4e-4)) ** 2
        + 0.02 * (math.log2(p["lora_rank"]) - 4.5) ** 2
        + 0.4 * (p["lora_dropout"] - 0.08) ** 2
    )


def true_curve(p: dict[str, Any], step: int) -> float:
    """The noise-free eval loss at `step`: plateau, exponential decay, late divergence."""
    lr, rank = p["learning_rate"], p["lora_rank"]
    plateau = 30 + 150 * (1e-5 / lr) ** 0.5  # small learning rates stay flat for longer
    tau = 100 * (1e-3 / lr) ** 0.15 * (16 / rank) ** 0.1
    start, end = 2.5, final_loss(p)
    if step <= plateau:
        loss = start - 0.05 * step / plateau
    else:
        loss = end + (start - 0.05 - end) * math.exp(-(step - plateau) / tau)
    if lr > 1.5e-3:  # instability: the loss creeps up again late in training
        loss += 0.3 * (lr / 3e-3) * max(0.0, step - 600) / 400
    return loss


@dataclass
class SimTrial:
    name: str
    index: int
    parameters: dict[str, Any]
    state: TrialState = TrialState.RUNNING
    steps: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)
    value: float | None = None

    def observed(self) -> ObservedTrial:
        return ObservedTrial(
            name=self.name,
            index=self.index,
            parameters=self.parameters,
            state=self.state,
            value=self.value,
            curves={"eval_loss": list(self.curve)},
        )


def make_spec(strategy: str, seed: int) -> SweepSpec:
    algorithm = strategy.split("+")[0]
    grid_size = math.prod(len(v) for v in GRID.values())
    raw: dict[str, Any] = {
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "algorithm": {"name": algorithm, "seed": seed},
        "parameters": {n: {"values": v} for n, v in GRID.items()}
        if algorithm == "grid"
        else RANGES,
        "maxTrials": grid_size,
        "parallelism": PARALLELISM,
        "trainer": {"image": "bench", "command": ["true"]},
    }
    if strategy in EARLY_STOPPING:
        raw["earlyStopping"] = EARLY_STOPPING[strategy]
    return SweepSpec.model_validate(raw)


def simulate(strategy: str, seed: int, target: float) -> tuple[int, bool]:
    """(trial-steps spent until bestTrial's true loss <= target, whether it got there)."""
    spec = make_spec(strategy, seed)
    noise = random.Random(f"noise:{seed}")
    trials: dict[int, SimTrial] = {}
    spent = 0
    tick = 0
    while True:
        now = T0 + timedelta(seconds=tick * EVAL_EVERY)
        result = plan(spec, [t.observed() for t in trials.values()], now, sweep_name="bench")
        for name in result.delete:
            stopped = next(t for t in trials.values() if t.name == name)
            stopped.state = TrialState.PRUNED
        for new in result.create:
            trials[new.index] = SimTrial(new.name, new.index, new.parameters)
        best = result.status.best_trial
        if best is not None and final_loss(best.parameters) <= target:
            return spent, True
        if result.status.phase in ("Succeeded", "Failed"):
            return spent, False
        for trial in trials.values():
            if trial.state != TrialState.RUNNING:
                continue
            trial.steps += EVAL_EVERY
            spent += EVAL_EVERY
            value = true_curve(trial.parameters, trial.steps) + noise.gauss(0, EVAL_NOISE)
            trial.curve.append((trial.steps, value))
            if trial.steps >= MAX_STEPS:
                trial.state, trial.value = TrialState.SUCCEEDED, value
        tick += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeds per strategy (default 20)")
    args = parser.parse_args()

    grid_best = min(
        final_loss({"learning_rate": lr, "lora_rank": r, "lora_dropout": d})
        for lr in GRID["learning_rate"]
        for r in GRID["lora_rank"]
        for d in GRID["lora_dropout"]
    )
    target = grid_best * (1 + WITHIN)
    began = time.perf_counter()
    costs: dict[str, list[int]] = {}
    hits: dict[str, int] = {}
    for strategy in STRATEGIES:
        runs = [simulate(strategy, seed, target) for seed in range(args.seeds)]
        costs[strategy] = [spent for spent, _ in runs]
        hits[strategy] = sum(hit for _, hit in runs)
    medians = {s: statistics.median(c) for s, c in costs.items()}
    figures = {
        "benchmark": "search_efficiency",
        "seeds": args.seeds,
        "grid_points": math.prod(len(v) for v in GRID.values()),
        "optimum_loss": 0.9,
        "grid_best_loss": round(grid_best, 5),
        "target_loss": round(target, 5),
        "median_trial_steps": medians,
        "median_gpu_hours": {s: m / STEPS_PER_GPU_HOUR for s, m in medians.items()},
        "ratio_vs_grid": {s: round(m / medians["grid"], 3) for s, m in medians.items()},
        "hit_rate": {s: hits[s] / args.seeds for s in STRATEGIES},
        "seconds": round(time.perf_counter() - began, 1),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

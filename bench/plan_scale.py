"""The cost of one plan() as a sweep grows: 1k, 5k and 10k finished trials, one slot free.

Each reconcile of a running sweep calls plan() once, so its time bounds how fast a sweep of
that size can react. For grid, random and TPE, the history is that many succeeded trials
(with a final value and a short learning curve) and one running; plan() proposes the next
trial. The baseline, measured in the same run, is the same plan() with no trial to propose
(parallelism 1, taken by the running trial): what planning costs without search.

Early stopping: the same finished trials and 1,000 running ones, each with a curve, every
slot taken; plan() with the median rule and with ASHA, against the same plan() without early
stopping (the baseline). Prints one JSON line.

    .venv/bin/python bench/plan_scale.py [--sizes 1000,5000,10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweep_operator.api import SweepSpec  # noqa: E402
from sweep_operator.naming import trial_name  # noqa: E402
from sweep_operator.observation import Observation  # noqa: E402
from sweep_operator.plan import plan  # noqa: E402
from sweep_operator.trials import ObservedTrial, Point, TrialState  # noqa: E402
from tests.unit.sweep_helpers import trial_parameters  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ALGORITHMS = ("grid", "random", "tpe")


def spec_for(algorithm: str, trials: int) -> SweepSpec:
    if algorithm == "grid":
        # A grid of at least `trials` points over three parameters.
        side = math.ceil((trials + 2) ** (1 / 3))
        parameters = {
            "lora_rank": {"values": list(range(1, side + 1))},
            "lora_alpha": {"values": list(range(1, side + 1))},
            "warmup_steps": {"values": list(range(side))},
        }
    else:
        parameters = {
            "learning_rate": {"type": "log_uniform", "min": 1e-5, "max": 1e-3},
            "lora_rank": {"values": [4, 8, 16, 32, 64]},
            "lora_dropout": {"type": "uniform", "min": 0.0, "max": 0.2},
        }
    return SweepSpec.model_validate(
        {
            "objective": {"metric": "eval_loss", "goal": "minimize"},
            "algorithm": {"name": algorithm, "seed": 7},
            "parameters": parameters,
            "maxTrials": trials + 10,
            "parallelism": 2,
            "trainer": {"image": "bench", "model": "/models/m", "data": {"train": "/d.jsonl"}},
        }
    )


RUNNING = 1000  # running trials, in the early-stopping measurement


def history(spec: SweepSpec, finished: int, running: int = 1) -> list[ObservedTrial]:
    """`finished` succeeded trials with a value and a 4-point curve, then `running` ones."""
    rng = random.Random(finished)
    trials = []
    for index in range(finished + running):
        value = rng.uniform(0.5, 2.0)
        done = index < finished
        trials.append(
            ObservedTrial(
                name=trial_name("scale", index),
                index=index,
                parameters=trial_parameters(spec, index),
                state=TrialState.SUCCEEDED if done else TrialState.RUNNING,
                value=value if done else None,
                start_time=T0 + timedelta(seconds=index),
                finish_time=T0 + timedelta(seconds=index + 60) if done else None,
                curves={"eval_loss": [Point(step, value + 1 / step, 0.0) for step in (1, 2, 4, 8)]},
            )
        )
    return trials


def seconds_per_plan(spec: SweepSpec, trials: list[ObservedTrial], repeats: int) -> float:
    now = T0 + timedelta(days=1)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = plan(spec, Observation(sweep="scale", generation=None, trials=trials), None, now)
        times.append(time.perf_counter() - started)
    assert result.status.trials.total >= len(trials)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result: dict[str, object] = {"bench": "plan_scale"}
    for size in (int(s) for s in args.sizes.split(",")):
        for algorithm in ALGORITHMS:
            spec = spec_for(algorithm, size)
            trials = history(spec, size)
            proposing = seconds_per_plan(spec, trials, args.repeats)
            busy = spec.model_copy(update={"parallelism": 1})  # the running trial fills it
            baseline = seconds_per_plan(busy, trials, args.repeats)
            result[f"{algorithm}_{size}_seconds"] = round(proposing, 3)
            result[f"{algorithm}_{size}_no_proposal_seconds"] = round(baseline, 3)
        spec = spec_for("random", size + RUNNING).model_copy(update={"parallelism": RUNNING})
        trials = history(spec, size, RUNNING)
        baseline = seconds_per_plan(spec, trials, args.repeats)
        result[f"no_early_stopping_{size}_{RUNNING}_running_seconds"] = round(baseline, 3)
        for rule in ({"algorithm": "median"}, {"algorithm": "asha", "minSteps": 1}):
            stopping = SweepSpec.model_validate(
                {**spec.model_dump(by_alias=True, exclude_none=True), "earlyStopping": rule}
            )
            seconds = seconds_per_plan(stopping, trials, args.repeats)
            result[f"{rule['algorithm']}_{size}_{RUNNING}_running_seconds"] = round(seconds, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""The report files: best_config.yaml, trials_summary.csv, the plot, parameter importance."""

from __future__ import annotations

import csv
import io
import math
from datetime import timedelta

import yaml

from sweep_operator.plan import best_trial
from sweep_operator.report import (
    best_config_yaml,
    best_so_far,
    optimization_plot_png,
    parameter_importance,
    trials_summary_csv,
)
from sweep_operator.space import trial_parameters
from sweep_operator.trials import ObservedTrial, TrialState
from tests.unit.sweep_helpers import T0, make_spec, observed_trial

S = TrialState
SPEC = make_spec(maxTrials=None)  # the 3 x 2 grid of lora_rank and learning_rate


def trial(index: int, state: TrialState, value: float | None = None) -> ObservedTrial:
    finish = None if state.active else T0 + timedelta(minutes=10 + index)
    return observed_trial(SPEC, index, state, value, finish_time=finish)


TRIALS = [
    trial(0, S.SUCCEEDED, 0.5),
    trial(1, S.SUCCEEDED, 0.7),
    trial(2, S.FAILED),
    trial(3, S.SUCCEEDED, 0.3),
    trial(4, S.PRUNED),
    trial(5, S.RUNNING),
]


def test_best_config_is_the_fixed_config_with_the_best_parameters():
    text = best_config_yaml(SPEC, best_trial(SPEC, TRIALS), sweep_name="sw")
    document = yaml.safe_load(text)
    assert document["best_trial"] == {
        "name": "sw-0003",
        "index": 3,
        "value": 0.3,
        "mlflow_run_id": None,
    }
    assert document["parameters"] == {"learning_rate": 2e-4, "lora_rank": 8}
    assert document["config"] == {
        "learning_rate": 2e-4,
        "lora_rank": 8,
        "model_name_or_path": "/models/tiny",
        "num_train_epochs": 1,
    }
    assert yaml.safe_load(best_config_yaml(SPEC, None, sweep_name="sw"))["best_trial"] is None


def test_trials_summary_has_one_row_per_trial():
    rows = list(csv.reader(io.StringIO(trials_summary_csv(SPEC, reversed(TRIALS)))))
    assert rows[0] == [
        "index",
        "name",
        "state",
        "learning_rate",
        "lora_rank",
        "objective",
        "duration_s",
    ]
    assert rows[1] == ["0", "sw-0000", "succeeded", "0.0001", "8", "0.5", "600"]
    assert rows[3] == ["2", "sw-0002", "failed", "0.0001", "32", "", "720"]
    assert rows[6] == ["5", "sw-0005", "running", "0.0002", "32", "", ""]
    assert len(rows) == 7


def test_best_so_far_follows_the_goal():
    assert best_so_far(SPEC, TRIALS) == [(0, 0.5, 0.5), (1, 0.7, 0.5), (3, 0.3, 0.3)]
    maximize = make_spec(maxTrials=None, objective={"metric": "accuracy", "goal": "maximize"})
    assert [b for _, _, b in best_so_far(maximize, TRIALS)] == [0.5, 0.7, 0.7]


def test_the_plot_is_a_png():
    png = optimization_plot_png(SPEC, TRIALS)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    empty = optimization_plot_png(SPEC, [])
    assert empty.startswith(b"\x89PNG") and empty != png


def test_parameter_importance_finds_the_parameter_that_matters():
    spec = make_spec(
        algorithm={"name": "random", "seed": 0},
        maxTrials=40,
        parameters={
            "learning_rate": {"type": "log_uniform", "min": 1e-5, "max": 1e-2},
            "lora_dropout": {"type": "uniform", "min": 0.0, "max": 0.3},
        },
    )
    trials = [
        ObservedTrial(
            name=f"t{i}",
            index=i,
            parameters=(p := trial_parameters(spec, i)),
            state=S.SUCCEEDED,
            value=(math.log10(p["learning_rate"]) + 3.5) ** 2 + 0.01 * p["lora_dropout"],
        )
        for i in range(40)
    ]
    importance = parameter_importance(spec, trials)
    assert set(importance) == {"learning_rate", "lora_dropout"}
    assert importance["learning_rate"] > 0.9 > importance["lora_dropout"]
    assert parameter_importance(spec, trials) == importance  # seeded
    assert parameter_importance(spec, trials[:1]) == {}

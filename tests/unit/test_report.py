"""The report files: best config, trials summary, importance, sensitivity, correlations, plots."""

from __future__ import annotations

import csv
import io
import math
import random
import statistics
from datetime import timedelta

import pytest
import yaml

from lora_trainer.config import load_config
from sweep_operator.api import SweepSpec
from sweep_operator.importance import IMPORTANCE_MIN_TRIALS, parameter_importance
from sweep_operator.report import (
    best_config_yaml,
    best_so_far,
    correlation_ratio,
    correlations_csv,
    curve_lines,
    importance_csv,
    learning_curves_png,
    optimization_plot_png,
    sensitivity_csv,
    spearman,
    trials_summary_csv,
)
from sweep_operator.trial_plan import best_trial
from sweep_operator.trials import ObservedTrial, Point, TrialState
from tests.unit.sweep_helpers import T0, make_spec, observed_trial, trial_parameters

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
    trial(4, S.STOPPED),
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
        "eval_file": "/data/val.jsonl",
        "learning_rate": 2e-4,
        "lora_rank": 8,
        "model_name_or_path": "/models/tiny",
        "num_train_epochs": 1,
        "train_file": "/data/train.jsonl",
    }
    assert yaml.safe_load(best_config_yaml(SPEC, None, sweep_name="sw"))["best_trial"] is None


def test_the_best_config_trains_the_winner_again_with_the_trainer(tmp_path):
    document = yaml.safe_load(best_config_yaml(SPEC, best_trial(SPEC, TRIALS), sweep_name="sw"))
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(document["config"]))
    config = load_config(path, environ={})
    assert (config.model_name_or_path, config.train_file) == ("/models/tiny", "/data/train.jsonl")
    assert (config.lora_rank, config.learning_rate) == (8, 2e-4)


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


def test_trials_summary_has_a_column_per_additional_metric():
    spec = make_spec(
        maxTrials=None,
        objective={"metric": "eval_loss", "additionalMetrics": ["train_loss", "accuracy"]},
    )
    trials = [
        observed_trial(spec, 0, S.SUCCEEDED, 0.5, metrics={"train_loss": 0.4, "epoch": 1.0}),
        observed_trial(spec, 1, S.RUNNING),
    ]
    rows = list(csv.reader(io.StringIO(trials_summary_csv(spec, trials))))
    assert rows[0][-4:] == ["objective", "train_loss", "accuracy", "duration_s"]
    assert rows[1][-4:-1] == ["0.5", "0.4", ""]
    assert rows[2][-4:-1] == ["", "", ""]


def test_best_so_far_follows_the_goal():
    assert best_so_far(SPEC, TRIALS) == [(0, 0.5, 0.5), (1, 0.7, 0.5), (3, 0.3, 0.3)]
    maximize = make_spec(maxTrials=None, objective={"metric": "accuracy", "goal": "maximize"})
    assert [b for _, _, b in best_so_far(maximize, TRIALS)] == [0.5, 0.7, 0.7]


def test_the_plot_is_a_png():
    png = optimization_plot_png(SPEC, TRIALS)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    empty = optimization_plot_png(SPEC, [])
    assert empty.startswith(b"\x89PNG") and empty != png


RANGES = {
    "learning_rate": {"type": "log_uniform", "min": 1e-5, "max": 1e-2},
    "lora_dropout": {"type": "uniform", "min": 0.0, "max": 0.3},
}


def random_trials(count: int, objective, parameters=RANGES) -> tuple[SweepSpec, list]:
    spec = make_spec(
        algorithm={"name": "random", "seed": 0}, maxTrials=count, parameters=parameters
    )
    trials = [
        ObservedTrial(
            name=f"t{i}",
            index=i,
            parameters=(p := trial_parameters(spec, i)),
            state=S.SUCCEEDED,
            value=objective(i, p),
        )
        for i in range(count)
    ]
    return spec, trials


def test_importance_names_the_parameter_that_matters_in_percent_with_a_spread():
    spec, trials = random_trials(
        30, lambda i, p: (math.log10(p["learning_rate"]) + 3.5) ** 2 + 0.01 * p["lora_dropout"]
    )
    importance = parameter_importance(spec, trials)
    assert importance.trials == 30
    lr, dropout = importance.parameters
    assert (lr.name, dropout.name) == ("learning_rate", "lora_dropout")
    assert 80 < lr.min <= lr.percent <= lr.max <= 100
    assert lr.signal and not dropout.signal
    assert importance.reference.max < lr.min
    assert importance.message.startswith("fANOVA on 10 bootstrap resamples of 30 of the 30 ")
    assert parameter_importance(spec, trials) == importance  # seeded
    ref = importance.reference
    assert importance_csv(importance).splitlines() == [
        "parameter,percent,min_percent,max_percent,signal",
        f"learning_rate,{lr.percent:g},{lr.min:g},{lr.max:g},true",
        f"lora_dropout,{dropout.percent:g},{dropout.min:g},{dropout.max:g},false",
        f"(random reference),{ref.percent:g},{ref.min:g},{ref.max:g},",
    ]


def test_importance_on_noise_names_no_parameter():
    rng = random.Random(5)
    spec, trials = random_trials(30, lambda i, p: rng.gauss(0, 1))
    importance = parameter_importance(spec, trials)
    # One fANOVA fit on these trials names lora_dropout, at 84% whatever its seed.
    assert [p.signal for p in importance.parameters] == [False, False]


def test_importance_waits_for_enough_scored_trials():
    spec, trials = random_trials(IMPORTANCE_MIN_TRIALS, lambda i, p: p["lora_dropout"])
    trials[0] = trials[0].model_copy(update={"state": S.FAILED, "value": None})
    early = parameter_importance(spec, trials)
    assert (early.trials, early.parameters, early.reference) == (14, [], None)
    assert early.message == (
        "computed from 15 scored trials on; 14 so far (with fewer, fANOVA's ranking changes "
        "with its seed)"
    )
    assert importance_csv(early) == importance_csv(None)
    assert importance_csv(None) == "parameter,percent,min_percent,max_percent,signal\n"


def test_sensitivity_tables_the_objective_per_value_and_per_bin():
    rows = list(csv.DictReader(io.StringIO(sensitivity_csv(SPEC, TRIALS))))
    by_value = {(r["parameter"], r["value"]): r for r in rows}
    # Scored: 0 (8, 1e-4) 0.5; 1 (16, 1e-4) 0.7; 3 (8, 2e-4) 0.3.
    assert by_value[("lora_rank", "8")] == {
        "parameter": "lora_rank",
        "value": "8",
        "mean": "0.4",
        "std": f"{statistics.stdev([0.5, 0.3]):.6g}",
        "count": "2",
    }
    assert by_value[("lora_rank", "32")]["count"] == "0"  # listed, never scored
    assert by_value[("learning_rate", "0.0001")]["mean"] == "0.6"
    assert [r["value"] for r in rows if r["parameter"] == "lora_rank"] == ["8", "16", "32"]
    spec, trials = random_trials(40, lambda i, p: p["learning_rate"])
    rows = list(csv.DictReader(io.StringIO(sensitivity_csv(spec, trials))))
    bins = [r for r in rows if r["parameter"] == "learning_rate"]
    assert [r["value"] for r in bins] == [
        "[1e-05, 3.981e-05)",
        "[3.981e-05, 0.0001585)",
        "[0.0001585, 0.000631)",
        "[0.000631, 0.002512)",
        "[0.002512, 0.01]",
    ]
    assert sum(int(r["count"]) for r in bins) == 40
    means = [float(r["mean"]) for r in bins]
    assert means == sorted(means)


def test_correlations_say_which_way_each_parameter_pulls():
    parameters = {**RANGES, "lora_target": {"values": ["all", "q_proj,v_proj"]}}
    spec, trials = random_trials(
        40,
        lambda i, p: -math.log(p["learning_rate"]) + (1.0 if p["lora_target"] == "all" else 0.0),
        parameters,
    )
    rows = {r["parameter"]: r for r in csv.DictReader(io.StringIO(correlations_csv(spec, trials)))}
    assert rows["learning_rate"]["method"] == "spearman"
    assert float(rows["learning_rate"]["correlation"]) < -0.9
    assert abs(float(rows["lora_dropout"]["correlation"])) < 0.4
    assert rows["lora_target"]["method"] == "eta"
    assert 0 < float(rows["lora_target"]["correlation"]) <= 1
    assert rows["lora_target"]["count"] == "40"
    few = list(csv.DictReader(io.StringIO(correlations_csv(spec, trials[:2]))))
    assert {r["correlation"] for r in few} == {""}


def test_rank_correlation_and_correlation_ratio():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 2, 3], [4, 3, 3, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert correlation_ratio([[1.0, 1.0], [3.0, 3.0]]) == pytest.approx(1.0)
    assert correlation_ratio([[1.0, 3.0], [1.0, 3.0]]) == pytest.approx(0.0)


def test_learning_curves_of_all_trials_with_the_stopped_ones_marked():
    curves = {
        0: [Point(1, 2.0), Point(2, 1.0)],
        1: [Point(2, 2.0), Point(1, 2.5), Point(3, math.nan)],
        4: [Point(1, 3.0)],  # pruned after step 1
        5: [Point(1, 2.2)],  # running
    }
    trials = [
        t.model_copy(update={"curves": {"eval_loss": curves[t.index]}}) if t.index in curves else t
        for t in TRIALS
    ]
    lines = curve_lines(SPEC, trials, best="sw-0000")
    assert [(line.name, line.stopped, line.best) for line in lines] == [
        ("sw-0000", False, True),
        ("sw-0001", False, False),
        ("sw-0004", True, False),
        ("sw-0005", False, False),
    ]
    assert lines[1].points == [Point(1, 2.5), Point(2, 2.0)]  # in step order, finite
    assert lines[2].points == [Point(1, 3.0)]
    png = learning_curves_png(SPEC, trials, best="sw-0000")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert learning_curves_png(SPEC, TRIALS) != png  # no curves: says so

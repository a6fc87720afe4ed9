"""spec.constraints: configurations over maxGpuMemoryGiB never start; out-of-memory trials are
infeasible, not failed."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import pytest

from sweep_operator.api import SweepSpec
from sweep_operator.constraints import (
    MAX_DRAWS,
    estimate_for,
)
from sweep_operator.naming import trial_name
from sweep_operator.observe import job_summary, observe_trial, pod_summary
from sweep_operator.render import SweepRef
from sweep_operator.search import suggester
from sweep_operator.search.tpe import MEMORY_CONSTRAINT, build_study, suggest
from sweep_operator.semantic import SweepInvalid, parse_spec, validate_sweep
from sweep_operator.space import grid_point
from sweep_operator.trial_plan import plan_trials
from sweep_operator.trials import ObservedTrial, TrialState
from tests.unit.sweep_helpers import T0, raw_spec, trial_parameters

S = TrialState
SWEEP = SweepRef(name="sw", namespace="ns", uid="uid-1")
# Llama 3.1 8B's config.json.
LLAMA_8B = {
    "hiddenSize": 4096,
    "numHiddenLayers": 32,
    "intermediateSize": 14336,
    "numAttentionHeads": 32,
    "numKeyValueHeads": 8,
    "vocabSize": 128256,
    "dtype": "bfloat16",
}
QLORA = {
    "quantization_bit": 4,
    "gradient_checkpointing": True,
    "cutoff_len": 1024,
    "per_device_eval_batch_size": 1,
}
# With QLoRA at cutoff_len 1024 the 8B model needs about 10.6 GiB at batch 1 and rank 8,
# 14.8 at batch 2 and rank 64, 16.7 at batch 4 and rank 8: 16 GiB fits batches 1 and 2.
GRID = {
    "learning_rate": {"values": [1e-4, 2e-4]},
    "lora_rank": {"values": [8, 64]},
    "per_device_train_batch_size": {"values": [1, 2, 4, 8]},
}


def constrained(limit: float = 16, **changes: Any) -> dict[str, Any]:
    spec = raw_spec(**{"parameters": GRID, "maxTrials": None, **changes})
    spec["trainer"]["config"] = {**spec["trainer"]["config"], **QLORA}
    spec["constraints"] = {"maxGpuMemoryGiB": limit, "model": LLAMA_8B}
    return spec


def spec_of(raw: dict[str, Any]) -> SweepSpec:
    return validate_sweep(raw, SWEEP)


def fits(spec: SweepSpec, parameters: dict[str, Any]) -> bool:
    return estimate_for(spec, parameters).gib <= 16


def trial(spec: SweepSpec, index: int, state: TrialState, **fields: Any) -> ObservedTrial:
    return ObservedTrial(
        name=trial_name("sw", index),
        index=index,
        parameters=suggester(spec).fixed(index),
        state=state,
        start_time=T0,
        finish_time=None if state.active else T0 + timedelta(minutes=10),
        **fields,
    )


def test_a_grid_runs_only_the_points_that_fit_under_their_own_index():
    spec = spec_of(constrained())
    run = suggester(spec).indices()
    assert list(run.indices) == [0, 1, 4, 5, 8, 9, 12, 13]
    assert run.skipped == 8
    for index in range(16):
        assert (index in run.indices) == fits(spec, grid_point(spec.parameters, index))
    # maxTrials takes the first points that fit; the ones passed over are the skipped ones.
    capped = suggester(spec_of(constrained(maxTrials=3))).indices()
    assert (list(capped.indices), capped.skipped) == ([0, 1, 4], 2)


def test_the_grid_walk_equals_checking_every_point():
    raw = constrained(limit=15)
    raw["parameters"] = {
        "cutoff_len": {"values": [512, 1024, 2048]},
        "learning_rate": {"values": [1e-4, 2e-4, 3e-4]},
        "lora_rank": {"values": [8, 32, 64]},
        "per_device_train_batch_size": {"values": [1, 2, 4]},
        "lora_alpha": {"expr": "2 * lora_rank"},
    }
    del raw["trainer"]["config"]["cutoff_len"]
    spec = spec_of(raw)
    every = [i for i in range(81) if estimate_for(spec, trial_parameters(spec, i)).gib <= 15]
    assert 0 < len(every) < 81
    assert list(suggester(spec).indices().indices) == every


def test_the_planner_creates_only_fitting_trials_and_counts_the_rest_infeasible():
    spec = spec_of(constrained(parallelism=8))
    first = plan_trials(spec, [], T0, sweep_name="sw")
    assert [t.index for t in first.create] == [0, 1, 4, 5, 8, 9, 12, 13]
    assert all(fits(spec, t.parameters) for t in first.create)
    counts = first.status.trials
    assert (counts.target, counts.infeasible, counts.pending) == (8, 8, 8)
    assert "8 infeasible" in first.status.message

    done = [trial(spec, t.index, S.SUCCEEDED, value=1.0 + t.index) for t in first.create]
    last = plan_trials(spec, done, T0 + timedelta(hours=1), sweep_name="sw")
    assert last.create == []
    assert last.status.phase == "Succeeded"
    assert last.status.message.startswith("8/8 trials succeeded, 8 infeasible; best eval_loss=1")


def test_a_trial_out_of_gpu_memory_is_infeasible_not_failed():
    raw = raw_spec(maxFailedTrials=0)
    spec = spec_of(raw)
    seen = [
        trial(spec, 0, S.INFEASIBLE, message="out of GPU memory with ..."),
        trial(spec, 1, S.RUNNING),
    ]
    p = plan_trials(spec, seen, T0, sweep_name="sw")
    assert p.status.phase == "Running"  # the failure budget of 0 is untouched
    assert [t.index for t in p.create] == [2]
    counts = p.status.trials
    assert (counts.infeasible, counts.failed, counts.total) == (1, 0, 3)
    assert "1 infeasible" in p.status.message


def test_random_trials_draw_again_until_they_fit_the_same_way_every_time():
    raw = constrained(algorithm={"name": "random", "seed": 5}, maxTrials=30)
    raw["parameters"] = {
        "learning_rate": {"type": "log_uniform", "min": 1e-5, "max": 1e-3},
        "per_device_train_batch_size": {"type": "int", "min": 1, "max": 8},
    }
    spec = spec_of(raw)
    unconstrained = spec.model_copy(update={"constraints": None})
    redrawn = 0
    for index in range(30):
        chosen = suggester(spec).fixed(index)
        assert fits(spec, chosen)
        assert suggester(spec).fixed(index) == chosen  # a restart plans the same
        first = trial_parameters(unconstrained, index)
        if fits(spec, first):
            assert chosen == first  # a draw that fits is the sweep's usual one
        else:
            redrawn += 1
    assert redrawn > 5


def test_a_sweep_where_nothing_fits_is_refused_before_any_job():
    with pytest.raises(SweepInvalid) as error:
        validate_sweep(constrained(limit=8), SWEEP)
    [problem] = error.value.problems
    assert problem.field == "spec.constraints.maxGpuMemoryGiB"
    assert "no point of the grid fits maxGpuMemoryGiB=8" in problem.message
    assert "the smallest estimate was 10.6 GiB" in problem.message

    draws = constrained(limit=8, algorithm={"name": "random"}, maxTrials=4)
    with pytest.raises(SweepInvalid) as error:
        validate_sweep(draws, SWEEP)
    assert f"none of {MAX_DRAWS} draws for trial 0" in str(error.value)


def test_a_memory_limit_without_the_model_shape_says_what_to_add():
    raw = constrained()
    del raw["constraints"]["model"]
    with pytest.raises(SweepInvalid) as error:
        parse_spec(raw)
    [problem] = error.value.problems
    assert problem.field == "spec.constraints"
    assert "needs spec.constraints.model" in problem.message
    assert "hiddenSize, numHiddenLayers" in problem.message
    assert "lorasweep model-shape" in problem.message


def test_a_setting_the_estimate_cannot_read_is_refused_at_its_field():
    raw = constrained()
    raw["parameters"]["lora_target"] = {"values": ["all", "c_attn"]}
    with pytest.raises(SweepInvalid) as error:
        validate_sweep(raw, SWEEP)
    [problem] = error.value.problems
    assert problem.field == "spec.parameters.lora_target"
    assert "c_attn is not one" in problem.message


def tpe_raw(limit: float = 16) -> dict[str, Any]:
    raw = constrained(limit, algorithm={"name": "tpe", "seed": 1, "startupTrials": 4})
    raw["maxTrials"] = 20
    raw["parameters"] = {
        "lora_rank": {"type": "int", "min": 8, "max": 64, "step": 8},
        "per_device_train_batch_size": {"type": "int", "min": 1, "max": 8},
    }
    return raw


def test_tpe_proposes_only_points_that_fit():
    spec = spec_of(tpe_raw())
    history = [
        trial(spec, i, S.SUCCEEDED, value=float(suggester(spec).fixed(i)["lora_rank"]))
        for i in range(4)
    ]
    for index in range(4, 10):
        chosen = suggest(spec, history, index)
        assert fits(spec, chosen)
        assert suggest(spec, history, index) == chosen  # restart-safe
        history.append(
            ObservedTrial(
                name=trial_name("sw", index),
                index=index,
                parameters=chosen,
                state=S.SUCCEEDED,
                value=float(chosen["lora_rank"]),
            )
        )


def test_tpe_learns_to_avoid_where_trials_ran_out_of_memory():
    raw = tpe_raw()
    del raw["constraints"]  # no estimate: only what the trials reported
    spec = spec_of(raw)

    def history(oom: TrialState) -> list[ObservedTrial]:
        trials = []
        for index, (rank, batch) in enumerate(itertools.product([8, 32, 64], [1, 4, 8])):
            big = batch == 8
            trials.append(
                ObservedTrial(
                    name=trial_name("sw", index),
                    index=index,
                    parameters={"lora_rank": rank, "per_device_train_batch_size": batch},
                    # Larger batches score better, until they do not fit.
                    state=oom if big else S.SUCCEEDED,
                    value=None if big else 1.0 / batch,
                )
            )
        return trials

    study = build_study(spec, history(S.INFEASIBLE))
    constrained_trials = [t for t in study.trials if t.constraints]
    assert len(constrained_trials) == 3
    assert all(t.constraints[MEMORY_CONSTRAINT] > 0 for t in constrained_trials)

    def big_batches(oom: TrialState) -> int:
        chosen = [suggest(spec, history(oom), index) for index in range(9, 29)]
        return sum(p["per_device_train_batch_size"] >= 7 for p in chosen)

    # Told that batch 8 ran out of memory, TPE proposes such batches far less often than when
    # those trials just failed (which teaches it nothing).
    assert big_batches(S.INFEASIBLE) < big_batches(S.FAILED) / 2


def failed_job() -> dict[str, Any]:
    return {
        "metadata": {
            "name": "sw-0000",
            "uid": "u0",
            "annotations": {"lorasweep.io/trial-index": "0", "lorasweep.io/parameters": "{}"},
        },
        "spec": {},
        "status": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "message": "Container trainer for pod ns/sw-0000-x failed with exit code 4",
                    "lastTransitionTime": "2025-01-01T12:10:00Z",
                }
            ]
        },
    }


def pod(phase: str, exit_code: int | None = None) -> dict[str, Any]:
    state = {"running": {}}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "message": '{"error": "out of GPU memory"}'}}
    return {
        "metadata": {"name": "sw-0000-x", "labels": {"lorasweep.io/trial": "sw-0000"}},
        "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]},
    }


@pytest.mark.parametrize(
    ("pods", "state"),
    [
        ([pod("Failed", 4)], S.INFEASIBLE),
        ([pod("Failed", 3)], S.FAILED),
        # The pod watch lags the Job's: until the pod's end is seen, its exit code is unknown.
        ([pod("Running")], S.RUNNING),
        ([], S.FAILED),
    ],
)
def test_exit_code_4_makes_a_failed_trial_infeasible(pods, state):
    observed = observe_trial(job_summary(failed_job()), [pod_summary(p) for p in pods], "loss")
    assert observed.state == state
    if state == S.INFEASIBLE:
        assert observed.message.endswith('failed with exit code 4: {"error": "out of GPU memory"}')


def test_a_trial_out_of_memory_stays_infeasible_once_its_pod_is_gone():
    """PodGC deletes terminated pods past a threshold, and users delete them: the Job's
    condition still says which exit code its podFailurePolicy failed it on."""
    job = failed_job()
    [condition] = job["status"]["conditions"]
    condition["reason"] = "PodFailurePolicy"
    condition["message"] = (
        "Container trainer for pod ns/sw-0000-x failed with exit code 4 matching FailJob rule at "
        "index 1"
    )
    assert observe_trial(job_summary(job), [], "loss").state == S.INFEASIBLE
    condition["message"] = condition["message"].replace("code 4", "code 3")
    assert observe_trial(job_summary(job), [], "loss").state == S.FAILED

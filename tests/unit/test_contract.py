"""The trial contract: the operator's rendered Job and the trainer agree on it, its names and
JSON stay what running trials and recorded MLflow runs already use, and it costs its
importers no dependency."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator, Mapping

import pytest

from lora_trainer import contract
from lora_trainer.config import load_config
from lora_trainer.contract import (
    RESULT_LIMIT_BYTES,
    ResultError,
    TrialResult,
    result_path,
)
from lora_trainer.tracking import TrialRun
from sweep_operator.observe import parse_result
from sweep_operator.render import SweepRef, render_trial_job
from sweep_operator.trials import NewTrial
from tests.unit.sweep_helpers import make_spec, raw_spec

SWEEP = SweepRef(name="rank-lr", namespace="team-a", uid="1234-uid")
TRIAL = NewTrial(index=3, name="rank-lr-0003", parameters={"learning_rate": 2e-4, "lora_rank": 16})
CONTRACT_ENV = {value for name, value in vars(contract).items() if name.startswith("ENV_")}


class Reads(Mapping[str, str]):
    """An environment that remembers every variable looked up in it, set or not."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.names: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.names.add(name)
        return self.env[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.env)

    def __len__(self) -> int:
        return len(self.env)


def test_the_trainer_reads_only_the_contract_and_the_rendered_job_sets_all_it_reads():
    raw = raw_spec()
    raw["trainer"].update(
        model="org/tiny",
        modelCache={"claimName": "models"},
        checkpoints={"claimName": "ckpt", "intervalSteps": 50},
    )
    job = render_trial_job(
        SWEEP, make_spec(**raw), TRIAL, tracking_uri="http://mlflow:5000", parent_run_id="p-1"
    )
    [container] = job["spec"]["template"]["spec"]["containers"]
    rendered = {e["name"]: e["value"] for e in container["env"]}
    assert set(rendered) <= CONTRACT_ENV

    # What the trainer reads of its environment, through its own readers, in the rendered Job.
    env = Reads(rendered)
    cfg = load_config(None, container["args"][1::2], env)
    run = TrialRun(env)
    path = result_path(env)
    assert env.names <= CONTRACT_ENV
    assert env.names <= set(rendered), "the trainer reads a variable the operator does not set"

    assert (cfg.learning_rate, cfg.lora_rank) == (2e-4, 16)
    assert cfg.output_dir == "/tmp/lorasweep/team-a/rank-lr-0003"
    assert (cfg.checkpoint_dir, cfg.save_steps) == ("/checkpoints", 50)
    assert str(path) == container["terminationMessagePath"]
    assert (run.sweep, run.trial) == ("rank-lr", "rank-lr-0003")
    assert (run.tracking_uri, run.experiment_name, run.parent_run_id) == (
        "http://mlflow:5000",
        "team-a/rank-lr",
        "p-1",
    )


def test_the_names_on_the_wire_are_those_running_trials_and_recorded_runs_use():
    env = {
        contract.ENV_SWEEP: "LORASWEEP_SWEEP",
        contract.ENV_NAMESPACE: "LORASWEEP_NAMESPACE",
        contract.ENV_TRIAL: "LORASWEEP_TRIAL",
        contract.ENV_TRIAL_INDEX: "LORASWEEP_TRIAL_INDEX",
        contract.ENV_PARAMS: "LORASWEEP_PARAMS",
        contract.ENV_OBJECTIVE: "LORASWEEP_OBJECTIVE",
        contract.ENV_RESULT_PATH: "LORASWEEP_RESULT_PATH",
        contract.ENV_NNODES: "LORASWEEP_NNODES",
        contract.ENV_NPROC_PER_NODE: "LORASWEEP_NPROC_PER_NODE",
        contract.ENV_MASTER_ADDR: "LORASWEEP_MASTER_ADDR",
        contract.ENV_MASTER_PORT: "LORASWEEP_MASTER_PORT",
        contract.ENV_CHECKPOINT_DIR: "LORASWEEP_CHECKPOINT_DIR",
        contract.ENV_CHECKPOINT_STEPS: "LORASWEEP_CHECKPOINT_STEPS",
        contract.ENV_MODEL_PATH: "LORASWEEP_MODEL_PATH",
        contract.ENV_MLFLOW_TRACKING_URI: "MLFLOW_TRACKING_URI",
        contract.ENV_MLFLOW_EXPERIMENT_NAME: "MLFLOW_EXPERIMENT_NAME",
        contract.ENV_MLFLOW_PARENT_RUN_ID: "MLFLOW_PARENT_RUN_ID",
    }
    assert {name: wire for name, wire in env.items() if name != wire} == {}
    assert len(env) == len(CONTRACT_ENV)
    tags = {
        contract.TAG_SWEEP: "lorasweep.sweep",
        contract.TAG_TRIAL: "lorasweep.trial",
        contract.TAG_PARENT_RUN_ID: "mlflow.parentRunId",
        contract.TAG_ADAPTER: "lorasweep.adapter_artifact",
        contract.TAG_STOPPED: "lorasweep.stopped_reason",
        contract.TAG_NAMESPACE: "lorasweep.namespace",
        contract.TAG_SWEEP_UID: "lorasweep.sweep_uid",
        contract.TAG_ROLE: "lorasweep.role",
        contract.ROLE_PARENT: "parent",
        contract.TAG_BEST_TRIAL: "lorasweep.best_trial",
    }
    assert {name: wire for name, wire in tags.items() if name != wire} == {}
    assert contract.RESULT_PATH == "/dev/termination-log"
    assert contract.EXIT_OUT_OF_MEMORY == 4


@pytest.mark.parametrize(
    ("message", "metrics", "error"),
    [
        # As the trainer has always written it, compact, with an error on a stopped trial.
        (
            '{"metrics":{"eval_loss":0.25,"train_steps":40.0}}',
            {"eval_loss": 0.25, "train_steps": 40},
            None,
        ),
        (
            '{"metrics":{"eval_loss":0.5},"error":"stopped by signal 15"}',
            {"eval_loss": 0.5},
            "stopped by signal 15",
        ),
        # As a program of its own writes it (the README's example), with anything beside it.
        (
            '{"metrics": {"eval_loss": 1, "note": "x", "ok": true, "nan": NaN}, "extra": 1}',
            {"eval_loss": 1.0},
            None,
        ),
        ('{"metrics": {}, "error": null}', {}, None),
    ],
)
def test_results_of_every_writer_are_read(message, metrics, error):
    result = TrialResult.from_json(message)
    assert (result.metrics, result.error) == (metrics, error)
    assert parse_result(message) == metrics


def test_a_result_reads_back_as_written_and_fits_a_termination_message():
    result = TrialResult({"eval_loss": 0.125, "steps": 7, "diverged": float("nan")}, "boom")
    assert TrialResult.from_json(result.to_json()) == TrialResult(
        {"eval_loss": 0.125, "steps": 7.0}, "boom"
    )

    many = {f"metric_{i:03d}": i / 7 for i in range(300)}
    text = TrialResult(many, "x" * 10_000).to_json()
    assert len(text.encode()) <= RESULT_LIMIT_BYTES
    kept = TrialResult.from_json(text)
    assert kept.metrics and kept.metrics == {k: many[k] for k in kept.metrics}
    assert kept.error == "x" * contract.ERROR_LIMIT_CHARS


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("Traceback (most recent call last): ...", "a trial result is JSON"),
        ("[0.5]", 'a JSON object {"metrics": {...}}, not a list'),
        (
            '{"error": "out of GPU memory"}',
            '"metrics", a JSON object of numbers; this one has none',
        ),
        ('{"metrics": [0.5]}', "this one has a list"),
    ],
)
def test_a_message_that_is_no_result_says_why_and_gives_the_operator_no_metrics(message, reason):
    with pytest.raises(ResultError, match=re.escape(reason)):
        TrialResult.from_json(message)
    assert parse_result(message) == {}


def test_a_trial_writes_its_result_where_the_operator_said_or_to_the_termination_message():
    assert str(result_path({"LORASWEEP_RESULT_PATH": "/tmp/result"})) == "/tmp/result"
    assert str(result_path({})) == "/dev/termination-log"


def test_importing_the_contract_pulls_in_nothing_beyond_the_standard_library():
    code = (
        "import sys; before = set(sys.modules); import lora_trainer.contract; "
        "print(*sorted({m.split('.')[0] for m in set(sys.modules) - before}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "lora_trainer" in loaded
    assert set(loaded) - set(sys.stdlib_module_names) == {"lora_trainer"}

"""Whole trainer runs on the tiny model: learning, the MLflow record, SIGTERM, outages."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lora_trainer.__main__ import run
from lora_trainer.stopping import StopFlag
from tests.support import free_port
from tests.trainer.helpers import cli, runs_of, start_until_step


def trial_run(client: MlflowClient, experiment: str, trial: str):
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"tags.`lorasweep.trial` = '{trial}'",
    )
    assert len(found) == 1
    return found[0]


def test_training_learns_and_leaves_a_complete_mlflow_record(
    mlflow_uri: str, base_settings: list[str], trial_env: dict[str, str], toy_data: dict[str, Path]
) -> None:
    client = MlflowClient(mlflow_uri)
    experiment = f"trainer-{uuid.uuid4().hex[:8]}"
    parent = client.create_run(client.create_experiment(experiment), run_name="sweep parent")
    env = trial_env | {
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MLFLOW_EXPERIMENT_NAME": experiment,
        "MLFLOW_PARENT_RUN_ID": parent.info.run_id,
    }
    done = subprocess.run(cli(base_settings), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads(Path(env["LORASWEEP_RESULT_PATH"]).read_text())
    metrics = result["metrics"]
    assert metrics["train_steps"] == 60
    assert metrics["train_tokens"] > 0 and metrics["eval_tokens"] > 0

    run_ = trial_run(client, experiment, "toy-sweep-0001")
    assert run_.info.status == "FINISHED"
    tags = run_.data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert tags["lorasweep.sweep"] == "toy-sweep"
    assert tags["env.torch"].startswith("2.")
    assert tags["data.train_sha256"] == hashlib.sha256(toy_data["train"].read_bytes()).hexdigest()
    assert tags["data.train_examples"] == "240" and tags["data.eval_examples"] == "32"
    # The model's shape, for a sweep's spec.constraints.model: tags, and a line to copy.
    assert tags["lorasweep.model.hidden_size"] == "64"
    assert tags["lorasweep.model.num_hidden_layers"] == "2"
    base = int(tags["model.parameters"]) - int(tags["model.trainable_parameters"])
    assert tags["lorasweep.model.parameters"] == str(base)
    assert "model shape for spec.constraints.model: {hiddenSize: 64, " in done.stderr
    params = run_.data.params
    assert params["lora_rank"] == "8" and params["lora_alpha"] == "16"
    assert float(params["learning_rate"]) == pytest.approx(1e-2)
    assert params["train_file"] == str(toy_data["train"])

    evals = [m.value for m in client.get_metric_history(run_.info.run_id, "eval_loss")]
    losses = client.get_metric_history(run_.info.run_id, "loss")
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "eval_loss")] == [
        20,
        40,
        60,
    ]
    assert [m.step for m in losses] == [1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60]
    # The counting task is learnable: eval loss falls well below where training started.
    assert losses[0].value - evals[-1] > 1.0
    assert evals[-1] < evals[0]
    assert metrics["eval_loss"] == pytest.approx(evals[-1])
    assert run_.data.metrics["tokens_per_second"] > 0
    assert run_.data.metrics["train_tokens_per_second"] > 0
    assert "grad_norm" in run_.data.metrics and "learning_rate" in run_.data.metrics

    adapter = Path(base_settings[3].split("=", 1)[1]) / "adapter" / "adapter_config.json"
    assert json.loads(adapter.read_text())["r"] == 8


def test_sigterm_stops_at_the_next_step_and_marks_the_run_killed(
    mlflow_uri: str, base_settings: list[str], trial_env: dict[str, str], tmp_path: Path
) -> None:
    experiment = f"trainer-{uuid.uuid4().hex[:8]}"
    env = trial_env | {"MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_EXPERIMENT_NAME": experiment}
    settings = [*base_settings, "max_steps=100000", "logging_steps=1"]
    process, _ = start_until_step(settings, env, 3)
    try:
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 143
        stopped_within = time.monotonic() - sent
    finally:
        process.kill()
    assert stopped_within < 30

    client = MlflowClient(mlflow_uri)
    run_ = trial_run(client, experiment, "toy-sweep-0001")
    assert run_.info.status == "KILLED"
    steps = [m.step for m in client.get_metric_history(run_.info.run_id, "loss")]
    assert 3 <= max(steps) < 100000
    result = json.loads(Path(env["LORASWEEP_RESULT_PATH"]).read_text())
    assert "stopped by signal" in result["error"]
    assert result["metrics"]["train_steps"] >= 3
    assert not (tmp_path / "out" / "adapter").exists()


def test_training_completes_when_mlflow_is_unreachable(
    base_settings: list[str], trial_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    env = trial_env | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        code = run(None, [*base_settings, "max_steps=10", "save_adapter=false"], env, StopFlag())
    assert code == 0
    assert time.monotonic() - started < 90
    assert "unreachable" in caplog.text
    result = json.loads(Path(env["LORASWEEP_RESULT_PATH"]).read_text())
    assert set(result) == {"metrics"}
    assert result["metrics"]["train_steps"] == 10
    assert result["metrics"]["eval_loss"] > 0


def test_bad_data_fails_with_file_line_and_exit_code_3(
    base_settings: list[str], trial_env: dict[str, str], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    code = run(None, [*base_settings, f"train_file={broken}"], trial_env, StopFlag())
    assert code == 3
    error = json.loads(Path(trial_env["LORASWEEP_RESULT_PATH"]).read_text())["error"]
    assert error == f"{broken}:2: missing key 'output' (alpaca form needs 'instruction' and " + (
        "'output', chat form needs 'messages')"
    )


def test_missing_model_is_a_configuration_error(
    base_settings: list[str], trial_env: dict[str, str], tmp_path: Path
) -> None:
    code = run(
        None, [*base_settings, f"model_name_or_path={tmp_path / 'nope'}"], trial_env, StopFlag()
    )
    assert code == 2
    error = json.loads(Path(trial_env["LORASWEEP_RESULT_PATH"]).read_text())["error"]
    assert error.startswith(f"model_name_or_path='{tmp_path / 'nope'}': cannot load the tokenizer")


def test_a_lora_target_the_model_lacks_is_refused_naming_what_exists(
    base_settings: list[str], trial_env: dict[str, str]
) -> None:
    settings = [*base_settings, "lora_target=q_proj,nonexistent"]
    assert run(None, settings, trial_env, StopFlag()) == 2
    error = json.loads(Path(trial_env["LORASWEEP_RESULT_PATH"]).read_text())["error"]
    assert error == (
        "lora_target='q_proj,nonexistent': the model has no module named nonexistent; its "
        "linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, "
        "v_proj (or use `all`)"
    )


def test_the_effective_batch_is_logged(
    base_settings: list[str], tracked_env: dict[str, str]
) -> None:
    settings = [*base_settings, "max_steps=1", "gradient_accumulation_steps=3"]
    assert run(None, settings, tracked_env, StopFlag()) == 0
    [run_] = runs_of(tracked_env["MLFLOW_TRACKING_URI"])
    assert run_.data.params["effective_batch_size"] == "24"  # 8 per device x 3 x 1 process
    assert run_.data.params["bf16"] == "False"  # unset: off on this CPU


def test_early_stopping_ends_a_run_whose_eval_loss_stalls(
    base_settings: list[str], trial_env: dict[str, str]
) -> None:
    settings = [
        *base_settings,
        "learning_rate=1e-12",  # eval loss cannot improve
        "eval_steps=5",
        "early_stopping_patience=2",
        "save_adapter=false",
    ]
    assert run(None, settings, trial_env, StopFlag()) == 0
    metrics = json.loads(Path(trial_env["LORASWEEP_RESULT_PATH"]).read_text())["metrics"]
    # First eval sets the best; the next two do not beat it.
    assert metrics["train_steps"] == 15


def test_eval_loss_does_not_depend_on_batching(
    base_settings: list[str], trial_env: dict[str, str]
) -> None:
    """Trials that differ in batch size or packing are still compared on the same eval loss."""
    losses = []
    for batching in (["per_device_eval_batch_size=1", "packing=false"], ["packing=true"]):
        settings = [*base_settings, "learning_rate=1e-12", "max_steps=1", "save_adapter=false"]
        assert run(None, [*settings, *batching], trial_env, StopFlag()) == 0
        result = json.loads(Path(trial_env["LORASWEEP_RESULT_PATH"]).read_text())
        losses.append(result["metrics"]["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)

"""Several training processes for one trial under torchrun (gloo on CPU): process 0 reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_trainer.__main__ import run
from lora_trainer.config import load_config
from lora_trainer.stopping import StopFlag
from lora_trainer.train import evaluate_adapter
from tests.trainer.helpers import runs_of, steps


def test_torchrun_trains_on_two_processes_into_one_run_and_one_result(
    base_settings: list[str], tracked_env: dict[str, str], tmp_path: Path
) -> None:
    settings = [
        *base_settings,
        "max_steps=10",
        "eval_steps=5",
        "per_device_train_batch_size=4",
        "per_device_eval_batch_size=5",  # 7 batches: one process gets a batch more
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "lora_trainer",
        *(arg for setting in settings for arg in ("--set", setting)),
    ]
    done = subprocess.run(command, env=tracked_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    metrics = json.loads(Path(tracked_env["LORASWEEP_RESULT_PATH"]).read_text())["metrics"]
    assert metrics["train_steps"] == 10
    [run_] = runs_of(tracked_env["MLFLOW_TRACKING_URI"])
    assert run_.info.status == "FINISHED"
    assert run_.data.tags["env.world_size"] == "2"
    assert steps(tracked_env["MLFLOW_TRACKING_URI"], run_.info.run_id, "loss") == [1, 5, 10]
    assert run_.data.metrics["eval_loss"] == pytest.approx(metrics["eval_loss"])
    # The two processes shared the eval set, each example counted once: the saved adapter,
    # evaluated in one process, gives the same loss.
    assert metrics["eval_tokens"] == int(run_.data.tags["data.eval_tokens"])
    cfg = load_config(None, settings, {})
    adapter = evaluate_adapter(cfg, tmp_path / "out" / "adapter")
    assert adapter == pytest.approx(metrics["eval_loss"], abs=1e-4)


def test_processes_other_than_the_first_neither_track_nor_report(
    base_settings: list[str], trial_env: dict[str, str], tmp_path: Path
) -> None:
    env = trial_env | {"RANK": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    settings = [*base_settings, "max_steps=2", "save_adapter=false"]
    assert run(None, settings, env, StopFlag()) == 0
    assert not Path(env["LORASWEEP_RESULT_PATH"]).exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_every_process_reports_a_configuration_error(
    trial_env: dict[str, str], tmp_path: Path
) -> None:
    """The first process to find it exits, and torchrun ends the others, rank 0 included,
    perhaps before it wrote: so any rank writes a configuration error to the result."""
    env = trial_env | {"RANK": "1"}
    assert run(None, ["lora_rnak=8"], env, StopFlag()) == 2
    assert "lora_rnak" in Path(env["LORASWEEP_RESULT_PATH"]).read_text()

"""Checkpoints on the trial's volume: a killed trial resumes where its last complete one was."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from transformers import TrainerControl, TrainerState

from lora_trainer.checkpoints import latest_complete
from lora_trainer.tracking import TrialRun
from lora_trainer.train import RunCallback
from tests.trainer.helpers import cli, runs_of, steps

SAVED = {
    "adapter_model.safetensors": "weights",
    "optimizer.pt": "optimizer",
    "scheduler.pt": "scheduler",
    "rng_state.pth": "rng",
}


def fake_checkpoint(directory: Path, step: int, *, without: str = "") -> Path:
    path = directory / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name, text in SAVED.items():
        if name != without:
            (path / name).write_text(text)
    if without != "trainer_state.json":
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


@pytest.mark.parametrize("missing", [*SAVED, "trainer_state.json"])
def test_a_checkpoint_the_process_was_killed_while_saving_is_skipped(
    tmp_path: Path, missing: str
) -> None:
    complete = fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, without=missing)
    assert latest_complete(tmp_path) == complete


def test_a_truncated_trainer_state_is_incomplete(tmp_path: Path) -> None:
    complete = fake_checkpoint(tmp_path, 100)
    (fake_checkpoint(tmp_path, 200) / "trainer_state.json").write_text('{"global_st')
    assert latest_complete(tmp_path) == complete


def test_the_latest_complete_checkpoint_wins_by_step_not_by_name(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 9)
    latest = fake_checkpoint(tmp_path, 10)
    (tmp_path / "checkpoint-final").mkdir()
    assert latest_complete(tmp_path) == latest
    assert latest_complete(tmp_path / "absent") is None


def test_a_killed_trial_resumes_from_its_last_complete_checkpoint_as_if_never_stopped(
    base_settings: list[str], tracked_env: dict[str, str], tmp_path: Path
) -> None:
    def trial(name: str) -> dict[str, str]:
        return tracked_env | {
            "LORASWEEP_TRIAL": name,
            "LORASWEEP_CHECKPOINT_DIR": str(tmp_path / name / "checkpoints"),
            "LORASWEEP_CHECKPOINT_STEPS": "10",
            "LORASWEEP_RESULT_PATH": str(tmp_path / name / "result.json"),
        }

    settings = [*base_settings, "save_adapter=false"]  # 60 steps, logging every 5
    killed = trial("killed")
    process = subprocess.Popen(cli(settings), env=killed, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        for line in process.stderr:
            # The checkpoint of step 10 is complete, and the run has logged beyond it.
            if " step 15/60 " in line:
                process.send_signal(signal.SIGKILL)
                break
        assert process.wait(60) == -signal.SIGKILL
    finally:
        process.kill()
    checkpoints = Path(killed["LORASWEEP_CHECKPOINT_DIR"])
    # As if it had also been killed while writing the next checkpoint.
    shutil.copytree(checkpoints / "checkpoint-10", checkpoints / "checkpoint-20")
    (checkpoints / "checkpoint-20" / "trainer_state.json").unlink()

    resumed = subprocess.run(cli(settings), env=killed, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoints / 'checkpoint-10'}" in resumed.stderr
    uninterrupted = trial("uninterrupted")
    done = subprocess.run(cli(settings), env=uninterrupted, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = {
        run_.data.tags["lorasweep.trial"]: run_
        for run_ in runs_of(tracked_env["MLFLOW_TRACKING_URI"])
    }
    assert len(runs) == 2  # the resumed trial continued its run
    run_, reference = runs["killed"], runs["uninterrupted"]
    assert run_.info.status == "FINISHED"
    assert run_.data.tags["lorasweep.resumes"] == "1"
    assert run_.data.tags["lorasweep.resumed_from_step"] == "10"
    uri = tracked_env["MLFLOW_TRACKING_URI"]
    assert steps(uri, run_.info.run_id, "loss") == [1, *range(5, 61, 5)]
    assert steps(uri, run_.info.run_id, "eval_loss") == [20, 40, 60]

    # Weights, optimizer, schedule, random generators and data position all came back: on CPU
    # the resumed run computes the uninterrupted one's numbers exactly (measured difference 0).
    client = MlflowClient(uri)
    for metric in ("loss", "eval_loss"):
        values = [m.value for m in client.get_metric_history(run_.info.run_id, metric)]
        expected = [m.value for m in client.get_metric_history(reference.info.run_id, metric)]
        assert values == pytest.approx(expected, abs=1e-5)
    result = json.loads(Path(killed["LORASWEEP_RESULT_PATH"]).read_text())["metrics"]
    expected = json.loads(Path(uninterrupted["LORASWEEP_RESULT_PATH"]).read_text())["metrics"]
    assert result["train_steps"] == expected["train_steps"] == 60
    assert result["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)
    # The last two checkpoints are kept; none of the finished training (it is never resumed).
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint-40", "checkpoint-50"]


def test_early_stopping_patience_continues_from_the_checkpoints_evaluations() -> None:
    callback = RunCallback(trainer=None, trial_run=TrialRun({}), patience=2)  # type: ignore[arg-type]
    resumed = TrainerState(log_history=[{"eval_loss": 1.0, "step": 10}, {"eval_loss": 1.1}])
    control = callback.on_train_begin(None, resumed, TrainerControl())
    assert not control.should_training_stop
    control = callback.on_evaluate(None, resumed, control, metrics={"eval_loss": 1.05})
    assert control.should_training_stop  # the second evaluation in a row without a new best

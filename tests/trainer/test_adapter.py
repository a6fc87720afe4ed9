"""The trained adapter is kept in MLflow, and evaluating it gives the run's eval_loss back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch

from lora_trainer.__main__ import run
from lora_trainer.config import load_config
from lora_trainer.stopping import StopFlag
from lora_trainer.train import evaluate_adapter
from tests.trainer.helpers import cli, runs_of


def test_the_adapter_is_uploaded_and_reproduces_the_runs_eval_loss(
    base_settings: list[str], tracked_env: dict[str, str], tmp_path: Path
) -> None:
    # With dropout, a loss computed in training mode would not be reproduced.
    settings = [*base_settings, "max_steps=20", "lora_dropout=0.1"]
    done = subprocess.run(cli(settings), env=tracked_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(Path(tracked_env["LORASWEEP_RESULT_PATH"]).read_text())["metrics"]

    [run_] = runs_of(tracked_env["MLFLOW_TRACKING_URI"])
    assert run_.data.tags["lorasweep.adapter_artifact"] == "adapter"
    adapter = mlflow.artifacts.download_artifacts(
        run_id=run_.info.run_id,
        artifact_path="adapter",
        dst_path=str(tmp_path / "downloaded"),
        tracking_uri=tracked_env["MLFLOW_TRACKING_URI"],
    )
    files = {path.name for path in Path(adapter).iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files

    eval_loss = evaluate_adapter(load_config(None, settings, {}), adapter)
    assert eval_loss == pytest.approx(metrics["eval_loss"], abs=1e-4)
    assert metrics["eval_loss"] < 5.5  # trained: the random model starts near 6.7


def test_without_a_successful_upload_the_run_does_not_claim_an_adapter(
    base_settings: list[str], tracked_env: dict[str, str], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the artifact store expects a folder")
    client = MlflowClient(tracked_env["MLFLOW_TRACKING_URI"])
    client.create_experiment("blocked", artifact_location=blocked.as_uri())
    env = tracked_env | {"MLFLOW_EXPERIMENT_NAME": "blocked"}
    done = subprocess.run(cli([*base_settings, "max_steps=2"]), env=env, capture_output=True)
    assert done.returncode == 0

    [run_] = client.search_runs([client.get_experiment_by_name("blocked").experiment_id])
    assert run_.info.status == "FINISHED"
    assert "lorasweep.adapter_artifact" not in run_.data.tags
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_qlora_with_dora_rslora_and_gradient_checkpointing_trains_and_reevaluates(
    base_settings: list[str],
    trial_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bitsandbytes also runs on CPU, slowly; the trainer refuses that, so this test lets it."""
    if not torch.cuda.is_available():
        monkeypatch.setattr("lora_trainer.train.check_this_machine", lambda cfg: cfg)
    settings = [
        *base_settings,
        "max_steps=20",
        "quantization_bit=4",
        "use_dora=true",
        "use_rslora=true",
        "gradient_checkpointing=true",
    ]
    assert run(None, settings, trial_env, StopFlag()) == 0
    metrics = json.loads(Path(trial_env["LORASWEEP_RESULT_PATH"]).read_text())["metrics"]
    assert metrics["eval_loss"] < 5.5

    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]
    eval_loss = evaluate_adapter(load_config(None, settings, {}), adapter)
    assert eval_loss == pytest.approx(metrics["eval_loss"], abs=1e-4)


def test_quantization_on_a_machine_without_cuda_is_refused_before_loading_anything(
    base_settings: list[str], trial_env: dict[str, str], tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    missing = tmp_path / "no-such-model"  # loading it would fail with another message
    settings = [*base_settings, f"model_name_or_path={missing}", "quantization_bit=4"]
    assert run(None, settings, trial_env, StopFlag()) == 2
    error = json.loads(Path(trial_env["LORASWEEP_RESULT_PATH"]).read_text())["error"]
    assert error.startswith("quantization_bit=4 needs a CUDA GPU (bitsandbytes); this machine")

"""Trainer fixtures: a tiny random Llama-style model and a learnable toy dataset, built here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lora_trainer import tiny
from tests.trainer.helpers import EXPERIMENT


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    return {
        "train": tiny.write_jsonl(folder / "train.jsonl", tiny.toy_dataset(240, seed=0)),
        "eval": tiny.write_jsonl(folder / "eval.jsonl", tiny.toy_dataset(32, seed=1)),
    }


@pytest.fixture
def base_settings(tiny_model: Path, toy_data: dict[str, Path], tmp_path: Path) -> list[str]:
    """--set arguments for a short, learnable run."""
    return [
        f"model_name_or_path={tiny_model}",
        f"train_file={toy_data['train']}",
        f"eval_file={toy_data['eval']}",
        f"output_dir={tmp_path / 'out'}",
        "learning_rate=1e-2",
        "per_device_train_batch_size=8",
        "max_steps=60",
        "eval_steps=20",
        "logging_steps=5",
    ]


@pytest.fixture
def trial_env(tmp_path: Path) -> dict[str, str]:
    """The process environment as the operator sets it, minus MLflow (tests add that)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LORASWEEP_"))}
    env |= {
        "LORASWEEP_SWEEP": "toy-sweep",
        "LORASWEEP_TRIAL": "toy-sweep-0001",
        "LORASWEEP_PARAMS": json.dumps({"learning_rate": 0.01}),
        "LORASWEEP_RESULT_PATH": str(tmp_path / "termination-log"),
    }
    return env


@pytest.fixture
def tracked_env(trial_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """trial_env with an MLflow store of this test's own: sqlite, artifacts under tmp_path."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(
        EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri()
    )
    return trial_env | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}

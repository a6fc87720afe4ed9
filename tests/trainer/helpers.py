"""Running the trainer as the operator does, and reading what it left in MLflow."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

EXPERIMENT = "trials"


def cli(settings: list[str]) -> list[str]:
    return [sys.executable, "-m", "lora_trainer", *(a for s in settings for a in ("--set", s))]


def runs_of(tracking_uri: str) -> list[Any]:
    """Every run of the test's experiment (see the tracked_env fixture)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])


def steps(tracking_uri: str, run_id: str, metric: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [point.step for point in MlflowClient(tracking_uri).get_metric_history(run_id, metric)]


def start_until_step(
    settings: list[str], env: dict[str, str], step: int
) -> tuple[subprocess.Popen[str], list[str]]:
    """The trainer as a process, once it has logged `step` (of max_steps=100000); and its
    stderr lines, still being read."""
    process = subprocess.Popen(cli(settings), env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reached = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if f" step {step}/100000 " in line:
                reached.set()

    threading.Thread(target=read, daemon=True).start()
    if not reached.wait(120):
        process.kill()
        raise AssertionError("".join(lines[-30:]))
    return process, lines

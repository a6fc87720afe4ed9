"""The trainer's torchrun keeps the trainer's exit code, which the trial Job's
podFailurePolicy reads to fail hopeless trials at once."""

from __future__ import annotations

import subprocess
import sys

from lora_trainer.launch import worker_exit_code


def test_the_first_failed_workers_code_is_the_launchers():
    assert worker_exit_code([0, 2]) == 2
    assert worker_exit_code([4, 1]) == 4
    assert worker_exit_code([-15]) == 143  # killed by SIGTERM, as a shell reports it
    # torchrun SIGTERMs rank 0 because rank 1 failed: rank 1's code is the cause
    assert worker_exit_code([-15, 2]) == 2


def test_a_configuration_error_under_two_processes_exits_2(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_trainer.launch",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "lora_trainer",
            "--set",
            "lora_rnak=8",
        ],
        capture_output=True,
        text=True,
        env={"LORASWEEP_RESULT_PATH": str(tmp_path / "result"), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "lora_rnak" in (tmp_path / "result").read_text()

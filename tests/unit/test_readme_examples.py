"""README's examples: the args templating and the program of "Bring your own training program",
the warm start of "Coarse, refined, final"."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from sweep_operator.cli import render_sweep
from sweep_operator.observe import parse_result
from tests.unit.sweep_helpers import EXAMPLE, make_spec

README = Path(__file__).resolve().parents[2] / "README.md"
SPACE = {"learning_rate": {"type": "log_uniform", "min": 1e-5, "max": 1e-2}}


def readme_blocks(section: str, language: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(rf"```{language}\n(.*?)```", text[start:end], re.S)


def test_a_custom_trainer_gets_its_args_rendered_per_trial() -> None:
    (snippet,) = readme_blocks("Bring your own training program", "yaml")
    sweep = yaml.safe_load(EXAMPLE.read_text())
    sweep["spec"]["trainer"] = yaml.safe_load(snippet)["trainer"]
    jobs = render_sweep(sweep).objects
    container = jobs[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/my-trainer:1.0"
    assert container["command"] == ["python", "train.py"]
    # Grid order: parameters alphabetically, the last (lora_rank) varying fastest.
    assert container["args"] == ["--rank=8", "--lr=0.0001", "--run=rank-lr-0000"]
    assert jobs[1]["spec"]["template"]["spec"]["containers"][0]["args"][0] == "--rank=16"


def test_the_smallest_program_reports_a_result_the_operator_reads(tmp_path: Path) -> None:
    (program,) = readme_blocks("Bring your own training program", "python")
    result = tmp_path / "termination-log"
    env = {
        **os.environ,
        "LORASWEEP_PARAMS": json.dumps({"learning_rate": 2e-4, "lora_rank": 16}),
        "LORASWEEP_RESULT_PATH": str(result),
    }
    subprocess.run([sys.executable, "-c", program], env=env, check=True)
    assert parse_result(result.read_text()) == {"eval_loss": 1.0 / 16 + 2e-4}


def test_the_warm_start_example_is_a_valid_algorithm() -> None:
    (snippet,) = readme_blocks("Coarse, refined, final: warm start and `lorasweep refine`", "yaml")
    spec = make_spec(**yaml.safe_load(snippet), maxTrials=10, parameters=SPACE)
    assert spec.algorithm.warm_start.sweeps == ["coarse"]

"""Trials that share a /tmp (local processes on one machine) each write to a folder of their own."""

from __future__ import annotations

from lora_trainer.config import DEFAULT_OUTPUT_DIR, load_config

REQUIRED = ["model_name_or_path=/models/tiny", "train_file=/data/train.jsonl"]
TRIAL = {"LORASWEEP_NAMESPACE": "llm-training", "LORASWEEP_TRIAL": "rank-lr-0003"}


def test_a_trial_gets_an_output_dir_of_its_own() -> None:
    first = load_config(None, REQUIRED, TRIAL).output_dir
    second = load_config(None, REQUIRED, {**TRIAL, "LORASWEEP_TRIAL": "rank-lr-0004"}).output_dir
    assert first == "/tmp/lorasweep/llm-training/rank-lr-0003"
    assert second != first


def test_outside_a_sweep_the_default_stays() -> None:
    assert load_config(None, REQUIRED, {}).output_dir == DEFAULT_OUTPUT_DIR


def test_an_explicit_output_dir_wins() -> None:
    cfg = load_config(None, [*REQUIRED, "output_dir=/scratch/out"], TRIAL)
    assert cfg.output_dir == "/scratch/out"


def test_odd_names_cannot_escape_tmp() -> None:
    def output_dir(environ: dict[str, str]) -> str:
        return load_config(None, REQUIRED, environ).output_dir

    assert output_dir({"LORASWEEP_TRIAL": "../../etc"}) == "/tmp/lorasweep/_.._etc"
    assert output_dir({"LORASWEEP_NAMESPACE": "..", "LORASWEEP_TRIAL": "t"}) == DEFAULT_OUTPUT_DIR

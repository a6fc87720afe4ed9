"""The trainer's settings: typed parsing, precedence, and errors that say what to fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_trainer.config import ConfigError, TrainConfig, check_hardware, load_config

REQUIRED = ["model_name_or_path=/models/tiny", "train_file=/data/train.jsonl"]


def configure(*overrides: str, path: Path | None = None, params: dict | None = None) -> TrainConfig:
    environ = {"LORASWEEP_PARAMS": json.dumps(params)} if params else {}
    return load_config(path, [*REQUIRED, *overrides], environ)


def test_set_values_are_typed_like_yaml_and_numbers_in_e_notation_are_floats() -> None:
    cfg = configure(
        "lora_rank=16",
        "learning_rate=2e-4",
        "packing=false",
        "eval_steps=null",
        "lora_target=q_proj,v_proj",
    )
    assert cfg.lora_rank == 16
    assert cfg.learning_rate == pytest.approx(2e-4)
    assert isinstance(cfg.learning_rate, float)
    assert cfg.packing is False
    assert cfg.eval_steps is None
    assert cfg.lora_target_modules() == ["q_proj", "v_proj"]


def test_lora_alpha_follows_the_rank_unless_set() -> None:
    assert configure("lora_rank=16").lora_alpha == 32
    assert configure("lora_rank=16", "lora_alpha=8").lora_alpha == 8
    assert configure().lora_target_modules() == "all-linear"


def test_file_then_trial_params_then_set_win_in_that_order(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("lora_rank: 4\nlearning_rate: 1e-3\nlora_dropout: 0.05\ncutoff_len: 256\n")
    cfg = configure(
        "learning_rate=3e-4",
        path=path,
        params={"learning_rate": 2e-4, "lora_rank": 32},
    )
    assert (cfg.lora_rank, cfg.learning_rate, cfg.lora_dropout, cfg.cutoff_len) == (
        32,
        pytest.approx(3e-4),
        0.05,
        256,
    )


def test_unknown_keys_are_errors_that_suggest_the_real_name(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"--set: unknown setting 'lora_rnk'; did you mean lora_rank"
    ):
        configure("lora_rnk=16")
    path = tmp_path / "config.yaml"
    path.write_text("learning_rat: 0.001\n")
    with pytest.raises(
        ConfigError, match=rf"{path}: unknown setting 'learning_rat'.*learning_rate"
    ):
        configure(path=path)
    with pytest.raises(ConfigError, match="LORASWEEP_PARAMS: unknown setting 'rank'"):
        configure(params={"rank": 8})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("template=llama", r"template='llama' \(from --set\): Input should be 'auto', 'alpaca'"),
        ("lora_dropout=1.5", r"lora_dropout=1.5 \(from --set\): Input should be less than 1"),
        ("lora_rank=0", r"lora_rank=0 \(from --set\): Input should be greater than 0"),
        (
            "learning_rate=fast",
            r"learning_rate='fast' \(from --set\): Input should be a valid number",
        ),
        ("val_size=2.5", r"val_size=2.5 must be a share below 1 or a whole number"),
        ("lora_target=q_proj,,v_proj", r"lora_target='q_proj,,v_proj': expected `all` or a comma"),
        ("quantization_bit=3", r"quantization_bit=3 \(from --set\): Input should be 4 or 8"),
        ("bnb_4bit_quant_type=int4", r"bnb_4bit_quant_type='int4' .*'nf4' or 'fp4'"),
        (
            "fsdp=full_shard autowrap",
            r"fsdp='full_shard autowrap': unknown option 'autowrap'; expected space-separated "
            r"options from full_shard, .*auto_wrap",
        ),
    ],
)
def test_bad_values_name_the_field_and_what_is_accepted(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        configure(override)


def test_bf16_and_fp16_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="bf16 and fp16 are exclusive"):
        configure("bf16=true", "fp16=true")


def test_fsdp_and_quantization_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="fsdp='full_shard' and quantization_bit=4 cannot be"):
        configure("fsdp=full_shard", "quantization_bit=4")


CPU = {"cuda": False, "bf16_supported": False, "flash_attn": False}
OLD_GPU = {"cuda": True, "bf16_supported": False, "flash_attn": False}  # a T4 or V100
GPU = {"cuda": True, "bf16_supported": True, "flash_attn": False}
GPU_WITH_FLASH_ATTN = GPU | {"flash_attn": True}


@pytest.mark.parametrize(
    ("settings", "machine", "expected"),
    [
        (
            ["quantization_bit=4"],
            CPU,
            r"quantization_bit=4 needs a CUDA GPU \(bitsandbytes\); this",
        ),
        (["quantization_bit=8"], CPU, r"quantization_bit=8 needs a CUDA GPU"),
        (["fp16=true"], CPU, r"fp16=true needs a CUDA GPU"),
        (["fsdp=full_shard auto_wrap"], CPU, r"fsdp='full_shard auto_wrap' needs CUDA GPUs"),
        (["bf16=true"], OLD_GPU, r"bf16=true: this GPU does not support bfloat16; use fp16=true"),
        (
            ["attn_implementation=flash_attention_2"],
            GPU,
            r"flash_attention_2 needs a CUDA GPU and the flash-attn package \(not installed\)",
        ),
        (["attn_implementation=flash_attention_2"], CPU, r"this machine has no GPU\): use sdpa"),
        (
            ["quantization_bit=4", "fp16=true"],
            OLD_GPU,
            r"bnb_4bit_compute_dtype=bfloat16: this GPU does not support bfloat16; use "
            r"bnb_4bit_compute_dtype=float16",
        ),
    ],
)
def test_settings_this_machine_cannot_run_are_refused(
    settings: list[str], machine: dict[str, bool], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        check_hardware(configure(*settings), **machine)


@pytest.mark.parametrize(
    ("settings", "machine"),
    [
        (["bf16=true"], CPU),
        (["quantization_bit=4", "bf16=true", "use_dora=true", "gradient_checkpointing=true"], GPU),
        (["quantization_bit=4", "fp16=true", "bnb_4bit_compute_dtype=float16"], OLD_GPU),
        (["quantization_bit=8", "fp16=true"], OLD_GPU),
        (["attn_implementation=flash_attention_2", "bf16=true"], GPU_WITH_FLASH_ATTN),
    ],
)
def test_settings_this_machine_can_run_pass(settings: list[str], machine: dict[str, bool]) -> None:
    check_hardware(configure(*settings), **machine)


@pytest.mark.parametrize(
    ("settings", "machine", "bf16"),
    [
        ([], GPU, True),
        ([], OLD_GPU, False),
        ([], CPU, False),
        (["fp16=true"], GPU, False),
        (["bf16=false"], GPU, False),
        (["bf16=true"], CPU, True),
    ],
)
def test_bf16_is_on_by_default_where_the_gpu_supports_it(
    settings: list[str], machine: dict[str, bool], bf16: bool
) -> None:
    assert check_hardware(configure(*settings), **machine).bf16 is bf16


def test_defaults_follow_the_tuning_guides() -> None:
    cfg = configure()
    assert cfg.warmup_ratio == 0.05
    assert cfg.bf16 is None  # settled per machine by check_hardware


@pytest.mark.parametrize(("ratio", "steps"), [(0.0, 0), (0.05, 5), (0.5, 48), (1.0, 95)])
def test_warmup_ratio_is_a_fraction_of_the_steps_up_to_all_of_them(
    ratio: float, steps: int, tmp_path: Path
) -> None:
    from lora_trainer.train import hf_arguments

    args = hf_arguments(configure(f"warmup_ratio={ratio}", f"output_dir={tmp_path}"), False)
    assert args.get_warmup_steps(95) == steps


def test_checkpoints_default_to_the_trials_volume_from_the_environment() -> None:
    environ = {"LORASWEEP_CHECKPOINT_DIR": "/checkpoints/t-1", "LORASWEEP_CHECKPOINT_STEPS": "50"}
    cfg = load_config(None, REQUIRED, environ)
    assert (cfg.checkpoint_dir, cfg.save_steps) == ("/checkpoints/t-1", 50)
    cfg = load_config(None, [*REQUIRED, "save_steps=10", "checkpoint_dir=/scratch"], environ)
    assert (cfg.checkpoint_dir, cfg.save_steps) == ("/scratch", 10)
    assert (configure().checkpoint_dir, configure().save_steps) == (None, None)


def test_bad_checkpoint_settings_name_their_source() -> None:
    with pytest.raises(
        ConfigError, match=r"save_steps='often' \(from LORASWEEP_CHECKPOINT_STEPS\): Input should"
    ):
        load_config(None, REQUIRED, {"LORASWEEP_CHECKPOINT_STEPS": "often"})
    with pytest.raises(ConfigError, match=r"checkpoint_dir='/ckpt' needs save_steps \(or LORA"):
        configure("checkpoint_dir=/ckpt")


def test_missing_required_settings_are_named() -> None:
    with pytest.raises(ConfigError, match=r"model_name_or_path: required") as error:
        load_config(None, [], {})
    assert "train_file: required" in str(error.value)


def test_yaml_syntax_errors_point_at_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("lora_rank: 8\nlearning_rate: [1e-4\n")
    with pytest.raises(ConfigError, match=rf"{path}:3:\d+: invalid YAML"):
        configure(path=path)
    with pytest.raises(ConfigError, match="expected key=value"):
        configure("lora_rank")


def test_every_setting_is_described() -> None:
    undocumented = [n for n, f in TrainConfig.model_fields.items() if not f.description]
    assert undocumented == []


# Settings and data files are checked before the trainer pays for importing torch (seconds),
# and the operator reads the config model without having torch at all.
@pytest.mark.parametrize("module", ["lora_trainer.config", "lora_trainer.data"])
def test_config_and_data_import_neither_torch_nor_transformers(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_cli_rejects_a_bad_setting_before_loading_anything(tmp_path: Path) -> None:
    result_file = tmp_path / "termination-log"
    settings = [arg for setting in [*REQUIRED, "lora_rnk=8"] for arg in ("--set", setting)]
    result = subprocess.run(
        [sys.executable, "-m", "lora_trainer", *settings],
        capture_output=True,
        text=True,
        timeout=60,
        env={"LORASWEEP_RESULT_PATH": str(result_file), "PATH": ""},
    )
    assert result.returncode == 2
    assert "unknown setting 'lora_rnk'; did you mean lora_rank" in result.stderr
    assert "lora_rnk" in json.loads(result_file.read_text())["error"]


def test_help_config_lists_every_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lora_trainer", "--help-config"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    listed = {line.split(" ")[0] for line in result.stdout.splitlines() if not line.startswith(" ")}
    assert listed == set(TrainConfig.model_fields)

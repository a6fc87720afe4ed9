"""The trainer's configuration: one flat, typed `TrainConfig` built from argument groups.

This module must stay importable without torch or transformers: the operator imports
`TrainConfig` to check that a sweep's parameter names are real trainer fields.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lora_trainer.contract import (
    ENV_CHECKPOINT_DIR,
    ENV_CHECKPOINT_STEPS,
    ENV_NAMESPACE,
    ENV_PARAMS,
    ENV_TRIAL,
)

DEFAULT_OUTPUT_DIR = "/tmp/lorasweep/output"
# The words transformers accepts in its `fsdp` training argument.
FSDP_OPTIONS = (
    "full_shard",
    "shard_grad_op",
    "no_shard",
    "hybrid_shard",
    "hybrid_shard_zero2",
    "offload",
    "auto_wrap",
)


class ConfigError(ValueError):
    """A configuration the trainer cannot run with; the message is meant for the user."""


class _Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelArguments(_Arguments):
    model_name_or_path: str = Field(
        description="Local directory or hub id of the base model (a causal language model)."
    )
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype to load the base model weights in; `auto` keeps the checkpoint's.",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; unset lets transformers choose (usually `sdpa`)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model repository to run its own Python code. Off by default."
    )


class QuantizationArguments(_Arguments):
    quantization_bit: Literal[4, 8] | None = Field(
        None,
        description="QLoRA: load the base model quantized to 4 or 8 bits with bitsandbytes "
        "(needs a CUDA GPU); unset loads it unquantized.",
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: `nf4` (NormalFloat, as in QLoRA) or `fp4`."
    )
    bnb_4bit_use_double_quant: bool = Field(
        True,
        description="4-bit: quantize the quantization constants too (~0.4 bit less per weight).",
    )
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="4-bit: dtype the quantized layers compute in."
    )


class LoraArguments(_Arguments):
    lora_rank: int = Field(8, gt=0, description="Rank r of the LoRA update matrices.")
    lora_alpha: int | None = Field(
        None, gt=0, description="LoRA scaling numerator alpha; defaults to 2 x lora_rank."
    )
    lora_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input, in [0, 1)."
    )
    lora_target: str = Field(
        "all",
        description="Modules to adapt: `all` (every linear layer but the output head) or a "
        "comma-separated list of module names such as `q_proj,v_proj`.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")

    def lora_target_modules(self) -> str | list[str]:
        """The value for peft's `target_modules`."""
        if self.lora_target.strip() == "all":
            return "all-linear"
        return [name.strip() for name in self.lora_target.split(",")]


class TrainingArguments(_Arguments):
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of the optimizer.")
    num_train_epochs: float = Field(
        3.0, gt=0, description="Passes over the training data (ignored when max_steps > 0)."
    )
    max_steps: int = Field(
        -1, ge=-1, description="Total optimizer steps; -1 trains for num_train_epochs instead."
    )
    per_device_train_batch_size: int = Field(4, gt=0, description="Examples per step and device.")
    per_device_eval_batch_size: int = Field(
        8,
        gt=0,
        description="Examples per evaluation batch. Eval loss is a token-weighted mean over the "
        "whole eval set, so it does not depend on this value.",
    )
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Batches accumulated into one optimizer step."
    )
    warmup_ratio: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Fraction of steps with linear learning-rate warmup. 5% by default, as "
        "LoRA tuning guides advise (5-10%): a fresh adapter's first updates at the full "
        "learning rate can overshoot.",
    )
    lr_scheduler_type: Literal[
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
    ] = Field("cosine", description="Learning-rate schedule after warmup.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay (AdamW).")
    max_grad_norm: float = Field(
        1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping."
    )
    optim: Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"] = (
        Field("adamw_torch", description="Optimizer, by its transformers name.")
    )
    bf16: bool | None = Field(
        None,
        description="Mixed precision with bfloat16. Unset: on where the GPU supports it "
        "(Ampere and later), off on CPU and older GPUs.",
    )
    fp16: bool = Field(False, description="Mixed precision with float16 (needs a CUDA GPU).")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass instead of keeping them: "
        "activation memory falls from one copy per layer to about one layer's, for about 30% "
        "more compute. Turn it on when a batch runs out of GPU memory (long cutoff_len, big "
        "models, QLoRA) before lowering the batch size.",
    )
    seed: int = Field(42, ge=0, description="Seed for weight init of the adapter and shuffling.")
    eval_steps: int | None = Field(
        None,
        gt=0,
        description="Evaluate every this many steps; unset evaluates at the end of each epoch. "
        "The run always ends with an evaluation.",
    )
    logging_steps: int = Field(10, gt=0, description="Log training metrics every this many steps.")
    save_steps: int | None = Field(
        None,
        gt=0,
        description="Save a checkpoint every this many steps; unset: LORASWEEP_CHECKPOINT_STEPS, "
        "else no checkpoints.",
    )
    early_stopping_patience: int | None = Field(
        None,
        gt=0,
        description="Stop after this many evaluations without a lower eval_loss (lower by more "
        "than one part in a million: float noise is no improvement); unset: never.",
    )
    fsdp: str = Field(
        "",
        description="Shard the model over the processes of a torchrun launch with PyTorch FSDP, "
        "for models that do not fit one GPU (CUDA only, not with quantization_bit): "
        "space-separated transformers options, e.g. `full_shard auto_wrap`. Empty: every "
        "process holds the whole model (DDP).",
    )

    @model_validator(mode="after")
    def _fsdp_options_are_known(self) -> Self:
        unknown = [word for word in self.fsdp.split() if word not in FSDP_OPTIONS]
        if unknown:
            raise ValueError(
                f"fsdp={self.fsdp!r}: unknown option {unknown[0]!r}; expected space-separated "
                f"options from {', '.join(FSDP_OPTIONS)}"
            )
        return self


class DataArguments(_Arguments):
    train_file: str = Field(
        description="JSONL training data: one object per line, alpaca form (instruction, input, "
        "output) or chat form (messages: [{role, content}, ...])."
    )
    eval_file: str | None = Field(
        None, description="JSONL evaluation data in the same forms; unset splits off val_size."
    )
    val_size: float = Field(
        0.1,
        ge=0.0,
        description="Without eval_file: the share of train examples held out for evaluation "
        "(below 1), or their number (1 and above). The split depends only on the examples' "
        "content, so every trial of a sweep evaluates on the same examples.",
    )
    max_samples: int | None = Field(
        None, gt=0, description="Use at most this many examples of each file (for quick runs)."
    )
    cutoff_len: int = Field(
        1024, gt=0, description="Maximum tokens per example; longer examples are truncated."
    )
    template: Literal["auto", "alpaca", "plain", "chat"] = Field(
        "auto",
        description="Prompt format: `alpaca`, `plain` (prompt and response concatenated), `chat` "
        "(the tokenizer's chat template), or `auto` (chat when the tokenizer has a chat "
        "template, else alpaca).",
    )
    packing: bool = Field(
        True,
        description="Pack each batch's examples into shared rows, with position ids restarting "
        "per example so attention never crosses examples: one padding-free row with "
        "flash_attention_2, else rows no longer than the batch's longest example. Off: pad "
        "every example to the longest.",
    )

    @model_validator(mode="after")
    def _val_size_is_a_count_or_share(self) -> Self:
        if self.val_size >= 1 and not self.val_size.is_integer():
            raise ValueError(
                f"val_size={self.val_size} must be a share below 1 or a whole number of examples"
            )
        return self


class OutputArguments(_Arguments):
    output_dir: str = Field(
        DEFAULT_OUTPUT_DIR,
        description="Directory for checkpoints and the adapter (must be writable). Unset in a "
        "sweep's trial: /tmp/lorasweep/<namespace>/<trial>.",
    )
    save_adapter: bool = Field(True, description="Save the trained adapter to output_dir/adapter.")
    log_adapter: bool = Field(
        True,
        description="Upload the saved adapter (see save_adapter) to the MLflow run as artifacts "
        "under `adapter`; the run is tagged lorasweep.adapter_artifact=adapter once it is there.",
    )
    checkpoint_dir: str | None = Field(
        None,
        description="Directory for checkpoints that outlive the process (a volume of the trial): "
        "every save_steps steps, the last 2 kept; a run that finds a complete checkpoint there "
        "resumes from the latest. Unset: LORASWEEP_CHECKPOINT_DIR, else output_dir/checkpoints "
        "and no resuming.",
    )


# pydantic lists inherited fields from the last base to the first: model settings come first.
class TrainConfig(
    OutputArguments,
    DataArguments,
    TrainingArguments,
    LoraArguments,
    QuantizationArguments,
    ModelArguments,
):
    """Everything one training run needs. Field names are flat, so `--set lora_rank=16` works."""

    @model_validator(mode="after")
    def _defaults_and_cross_checks(self) -> Self:
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are exclusive: enable at most one")
        if self.fsdp and self.quantization_bit:
            raise ValueError(
                f"fsdp={self.fsdp!r} and quantization_bit={self.quantization_bit} cannot be "
                "combined: unset one of them"
            )
        if self.checkpoint_dir and not self.save_steps:
            raise ValueError(
                f"checkpoint_dir={self.checkpoint_dir!r} needs save_steps (or "
                f"{ENV_CHECKPOINT_STEPS}): how many steps between checkpoints"
            )
        targets = self.lora_target_modules()
        if isinstance(targets, list) and "" in targets:
            raise ValueError(
                f"lora_target={self.lora_target!r}: expected `all` or a comma-separated list of "
                "module names such as `q_proj,v_proj`"
            )
        return self


def field_names() -> list[str]:
    return list(TrainConfig.model_fields)


def _unknown_key_message(key: str, source: str) -> str:
    close = difflib.get_close_matches(key, field_names(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with --help-config to list"
    return f"{source}: unknown setting {key!r}{hint}"


def _parse_scalar(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, dict | list):
        raise ConfigError(f"--set value {text!r} must be a single value, not a list or mapping")
    return value


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one `key=value` override; the value is read as a YAML scalar."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lora_rank=16")
    return key, _parse_scalar(text)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _read_params_env(environ: Mapping[str, str]) -> dict[str, Any]:
    text = environ.get(ENV_PARAMS, "").strip()
    if not text:
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{ENV_PARAMS}: not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{ENV_PARAMS}: expected a JSON object of trial parameters")
    return params


def _describe(error: dict[str, Any], sources: Mapping[str, str]) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "config"
    message = error["msg"]
    if error["type"] == "value_error":
        message = str(error.get("ctx", {}).get("error", message))
    if error["type"] == "missing":
        return f"{field}: required, set it in the config file or with --set {field}=..."
    origin = sources.get(field)
    where = f" (from {origin})" if origin else ""
    if "input" in error and error["type"] != "value_error":
        return f"{field}={error['input']!r}{where}: {message}"
    return f"{field}{where}: {message}" if error["loc"] else message


def default_output_dir(environ: Mapping[str, str]) -> str:
    """Where a run writes when output_dir is unset: a folder per trial.

    Trials that share a /tmp (several trial processes on one machine, or a hostPath) would
    otherwise overwrite each other's checkpoints and adapters.
    """
    parts = [environ.get(name, "").strip() for name in (ENV_NAMESPACE, ENV_TRIAL)]
    # Kubernetes names are safe path components already; anything else must not escape /tmp.
    safe = [re.sub(r"[^A-Za-z0-9._-]", "_", part).lstrip(".") for part in parts if part]
    if not parts[1] or not all(safe):
        return DEFAULT_OUTPUT_DIR
    return str(Path(DEFAULT_OUTPUT_DIR).parent.joinpath(*safe))


def load_config(
    config_path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> TrainConfig:
    """Build the config: YAML file, then the trial's parameters from the environment, then
    `--set` overrides, each later source winning. Raises ConfigError with a readable message."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    layers: list[tuple[str, dict[str, Any]]] = []
    if config_path is not None:
        layers.append((str(config_path), _read_yaml(Path(config_path))))
    layers.append((ENV_PARAMS, _read_params_env(environ)))
    layers.append(("--set", dict(parse_set(item) for item in overrides)))

    known = set(field_names())
    problems = []
    for source, layer in layers:
        for key, value in layer.items():
            if key not in known:
                problems.append(_unknown_key_message(str(key), source))
                continue
            values[key] = value
            sources[key] = source
    if problems:
        raise ConfigError("\n".join(problems))
    values.setdefault("output_dir", default_output_dir(environ))
    # The trial's checkpoint volume, as the operator mounted it, unless the settings name another.
    for key, variable in (
        ("checkpoint_dir", ENV_CHECKPOINT_DIR),
        ("save_steps", ENV_CHECKPOINT_STEPS),
    ):
        if key not in values and environ.get(variable, "").strip():
            values[key] = environ[variable].strip()
            sources[key] = variable

    # YAML 1.1 reads `2e-4` as a string; pydantic's lax mode turns numeric strings into numbers.
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        lines = [_describe(error, sources) for error in exc.errors(include_url=False)]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def check_hardware(
    cfg: TrainConfig, *, cuda: bool, bf16_supported: bool, flash_attn: bool
) -> TrainConfig:
    """Refuse settings this machine cannot run, before anything is loaded, and settle what the
    unset ones mean here (bf16). Takes the facts rather than asking torch, so it can be
    checked without a GPU."""
    if cfg.attn_implementation == "flash_attention_2" and not (cuda and flash_attn):
        raise ConfigError(
            "attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
            f"({'not installed' if cuda else 'this machine has no GPU'}): use sdpa, or unset "
            "attn_implementation"
        )
    if cfg.quantization_bit and not cuda:
        raise ConfigError(
            f"quantization_bit={cfg.quantization_bit} needs a CUDA GPU (bitsandbytes); this "
            "machine has none: unset quantization_bit"
        )
    if cfg.fp16 and not cuda:
        raise ConfigError("fp16=true needs a CUDA GPU; use bf16=true or neither on CPU")
    if cfg.fsdp and not cuda:
        raise ConfigError(f"fsdp={cfg.fsdp!r} needs CUDA GPUs; this machine has none: unset fsdp")
    bf16 = cfg.bf16 if cfg.bf16 is not None else cuda and bf16_supported and not cfg.fp16
    settled = cfg.model_copy(update={"bf16": bf16})
    if not cuda or bf16_supported:
        return settled
    if cfg.bf16:
        raise ConfigError("bf16=true: this GPU does not support bfloat16; use fp16=true instead")
    if cfg.quantization_bit == 4 and cfg.bnb_4bit_compute_dtype == "bfloat16":
        raise ConfigError(
            "bnb_4bit_compute_dtype=bfloat16: this GPU does not support bfloat16; use "
            "bnb_4bit_compute_dtype=float16 (or float32)"
        )
    return settled


def describe_fields() -> str:
    """A plain-text listing of every setting, its default and meaning (for --help-config)."""
    lines = []
    for name, info in TrainConfig.model_fields.items():
        default = "required" if info.is_required() else f"default {info.default!r}"
        lines.append(f"{name} ({default})\n    {info.description}")
    return "\n".join(lines)

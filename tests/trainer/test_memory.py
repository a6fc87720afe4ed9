"""The operator's memory estimate (sweep_operator.memory) against the trainer's real models.

Parameter counts must be exact. Activations are checked by counting what autograd keeps for
the backward: every tensor saved during a forward pass of the trainer's model (its own
load_model: peft adapters, dtype, autocast as in training), parameters excluded. Differences
between a 4- and a 2-layer model give the bytes one layer keeps per token, which is what the
estimate's per-layer formula claims; the layers before the first adapted module keep less,
which makes the estimate of a whole model an upper bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lora_trainer import tiny
from lora_trainer.config import TrainConfig
from lora_trainer.shape import model_shape, read_config, shape_yaml
from lora_trainer.train import load_base_model, load_model
from sweep_operator.api import ModelShape
from sweep_operator.memory import (
    base_parameters,
    estimate,
    linear_parameters,
    lora_parameters,
    trial_settings,
)

BATCH, SEQUENCE = 2, 128


def shape_of(model_dir: Path, parameters: int | None = None) -> ModelShape:
    """The shape as an operator gets it: the trainer's reading of config.json, pasted."""
    return ModelShape.model_validate(model_shape(read_config(model_dir), parameters))


def build(folder: Path, **config: Any) -> Path:
    """A random Llama with the tiny model's tokenizer; `config` overrides LlamaConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {
        "vocab_size": 300,
        "hidden_size": 96,
        "intermediate_size": 200,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    } | config
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memory")
    return {
        "tiny": tiny.build_model(root / "tiny"),
        "gqa": build(root / "gqa"),
        "tied-head-dim": build(
            root / "tied-head-dim", tie_word_embeddings=True, head_dim=24, num_key_value_heads=3
        ),
        "2 layers": tiny.build_model(
            root / "l2", hidden_size=256, num_layers=2, num_heads=8, intermediate_size=688
        ),
        "4 layers": tiny.build_model(
            root / "l4", hidden_size=256, num_layers=4, num_heads=8, intermediate_size=688
        ),
    }


def config(model_dir: Path, **settings: Any) -> TrainConfig:
    return TrainConfig.model_validate(
        {"model_name_or_path": str(model_dir), "train_file": "-", **settings}
    )


@pytest.mark.parametrize("name", ["tiny", "gqa", "tied-head-dim"])
def test_the_weight_count_is_the_models_exact_parameter_count(models, name):
    model = load_base_model(config(models[name]))
    assert base_parameters(shape_of(models[name])) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny", "gqa", "tied-head-dim"])
@pytest.mark.parametrize(
    "settings",
    [
        {"lora_rank": 8},
        {"lora_rank": 16, "lora_target": "q_proj,v_proj"},
        {"lora_rank": 4, "lora_target": "o_proj,down_proj,gate_proj", "use_dora": True},
    ],
)
def test_the_lora_count_is_pefts_trainable_count(models, name, settings):
    trainable, _ = load_model(config(models[name], **settings)).get_nb_trainable_parameters()
    assert lora_parameters(shape_of(models[name]), trial_settings(settings)) == trainable


def test_the_shape_line_a_trial_logs_is_what_the_sweep_takes(models):
    line = shape_yaml(model_shape(read_config(models["gqa"]), 12345))
    import yaml

    shape = ModelShape.model_validate(yaml.safe_load(line))
    assert (shape.hidden_size, shape.num_key_value_heads, shape.parameters) == (96, 2, 12345)


def saved_bytes(model: Any, autocast: bool) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward pass."""
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        kept[storage.data_ptr()] = max(kept.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQUENCE))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        # One logit per row: the head's share is the estimate's logits term, not this one's.
        model(input_ids=ids, logits_to_keep=1)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in kept.items() if pointer not in weights)


CASES = {
    "bf16": {"torch_dtype": "bfloat16", "bf16": True},
    "bf16 q,v": {"torch_dtype": "bfloat16", "bf16": True, "lora_target": "q_proj,v_proj"},
    "bf16 down": {"torch_dtype": "bfloat16", "bf16": True, "lora_target": "down_proj"},
    "bf16 rank 64": {"torch_dtype": "bfloat16", "bf16": True, "lora_rank": 64},
    "bf16 dropout": {"torch_dtype": "bfloat16", "bf16": True, "lora_dropout": 0.1},
    "bf16 dora": {"torch_dtype": "bfloat16", "bf16": True, "use_dora": True},
    "bf16 checkpointing": {"torch_dtype": "bfloat16", "bf16": True, "gradient_checkpointing": True},
    "bf16 weights, no autocast": {"torch_dtype": "bfloat16", "bf16": False},
    "fp32": {"torch_dtype": "float32", "bf16": False},
    "fp32 q,v": {"torch_dtype": "float32", "bf16": False, "lora_target": "q_proj,v_proj"},
    "fp32 dropout": {"torch_dtype": "float32", "bf16": False, "lora_dropout": 0.1},
    "fp32 checkpointing": {"torch_dtype": "float32", "bf16": False, "gradient_checkpointing": True},
    "fp32 weights, bf16 autocast": {"torch_dtype": "float32", "bf16": True},
    "4-bit bf16": {"quantization_bit": 4, "bf16": True},
    "4-bit fp32": {"quantization_bit": 4, "bf16": False},
    "8-bit bf16": {"quantization_bit": 8, "bf16": True},
}


def measured_and_estimated(models: dict[str, Path], layers: int, settings: dict) -> tuple:
    folder = models[f"{layers} layers"]
    cfg = config(folder, per_device_train_batch_size=BATCH, cutoff_len=SEQUENCE, **settings)
    model = load_model(cfg)
    model.train()
    if cfg.gradient_checkpointing:
        # What the Trainer turns on for gradient_checkpointing (activation_checkpointing).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    measured = saved_bytes(model, autocast=bool(cfg.bf16))
    values = {"per_device_train_batch_size": BATCH, "cutoff_len": SEQUENCE, **settings}
    shape = shape_of(folder)
    guess = estimate(shape, trial_settings(values))
    kept = guess.activations
    if settings.get("torch_dtype") == "float32" and settings.get("bf16"):
        # autocast's 16-bit copies of the weights are saved too; the estimate has them with
        # the weights.
        kept += 2 * linear_parameters(shape)
    return measured, kept


@pytest.mark.parametrize("case", CASES)
def test_activations_per_layer_are_what_autograd_keeps(models, case):
    if CASES[case].get("quantization_bit"):
        pytest.importorskip("bitsandbytes")
    small, small_guess = measured_and_estimated(models, 2, CASES[case])
    large, large_guess = measured_and_estimated(models, 4, CASES[case])
    per_layer, per_layer_guess = (large - small) / 2, (large_guess - small_guess) / 2
    # DoRA: the estimate counts a merged copy of every adapted weight; under peft 0.21 autograd
    # keeps 5-8% less than that per layer (it varies between runs), so the estimate stays an
    # upper bound there.
    tolerance = 0.1 if CASES[case].get("use_dora") else 0.04
    assert per_layer_guess == pytest.approx(per_layer, rel=tolerance)
    # The whole model: an upper bound (but for a few bytes a token; for DoRA, by what varies
    # between runs: one CI run measured 1.6% above it), by at most one layer: before the first
    # adapted module nothing needs a gradient, and nothing is kept.
    below = 0.9 if CASES[case].get("use_dora") else 0.99
    assert below * large <= large_guess <= large + 1.05 * per_layer_guess


@pytest.mark.parametrize(
    "settings",
    [
        {"quantization_bit": 4},
        {"quantization_bit": 4, "bnb_4bit_use_double_quant": False},
        {"quantization_bit": 8},
        {"torch_dtype": "bfloat16"},
    ],
)
def test_weights_are_the_bytes_the_loaded_model_holds(models, settings):
    if settings.get("quantization_bit"):
        pytest.importorskip("bitsandbytes")
    folder = models["4 layers"]
    model = load_model(config(folder, bf16=True, **settings))
    held: dict[int, int] = {}

    def hold(tensor: torch.Tensor) -> None:
        held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    for name, parameter in model.named_parameters():
        if "lora_" in name:
            continue  # the adapter's share
        hold(parameter)
        state = getattr(parameter, "quant_state", None)
        if state is not None:  # 4-bit: the block constants, themselves quantized with double
            hold(state.absmax)
            if state.nested:
                hold(state.state2.absmax)
        if getattr(parameter, "SCB", None) is not None:  # 8-bit: a scale per output row
            hold(parameter.SCB)
    guess = estimate(shape_of(folder), trial_settings({"bf16": True, **settings}))
    assert guess.weights == pytest.approx(sum(held.values()), rel=0.01)

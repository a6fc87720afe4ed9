"""The memory estimate's arithmetic, on shapes whose parameter counts are published.

tests/trainer/test_memory.py checks the same formulas against models built with torch; here
they meet well-known models' config.json values.
"""

from __future__ import annotations

import pytest

from sweep_operator.api import ModelShape
from sweep_operator.memory import (
    GIB,
    EstimateError,
    base_parameters,
    estimate,
    lora_parameters,
    trial_settings,
)

# config.json of meta-llama/Llama-3.1-8B and Llama-3.2-1B, mistralai/Mistral-7B-v0.1.
LLAMA_3_8B = ModelShape(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    dtype="bfloat16",
)
LLAMA_3_2_1B = ModelShape(
    hidden_size=2048,
    num_hidden_layers=16,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=True,
    dtype="bfloat16",
)
MISTRAL_7B = ModelShape(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    dtype="bfloat16",
)


@pytest.mark.parametrize(
    ("shape", "count"),
    [(LLAMA_3_8B, 8_030_261_248), (LLAMA_3_2_1B, 1_235_814_400), (MISTRAL_7B, 7_241_732_096)],
)
def test_the_parameter_count_of_published_models(shape, count):
    assert base_parameters(shape) == count
    # An exact count given in the shape (a trial logs it) wins over the formula.
    assert base_parameters(shape.model_copy(update={"parameters": 123})) == 123


def test_lora_parameters_as_peft_prints_them_for_llama_3_8b():
    # "trainable params: 41,943,040" for r=16 on every linear layer but the head.
    assert lora_parameters(LLAMA_3_8B, trial_settings({"lora_rank": 16})) == 41_943_040
    qv = trial_settings({"lora_rank": 8, "lora_target": "q_proj,v_proj"})
    assert lora_parameters(LLAMA_3_8B, qv) == 3_407_872


def test_the_trainers_defaults_fill_what_a_sweep_does_not_set():
    settings = trial_settings({"lora_rank": 32, "unrelated_setting_of_a_custom_program": 1})
    assert settings.config.lora_rank == 32
    assert settings.config.per_device_train_batch_size == 4  # the trainer's default
    assert settings.targets == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert settings.mixed_precision  # bf16 unset: on, as on any GPU with bfloat16


def test_qlora_of_an_8b_model_by_hand():
    settings = trial_settings(
        {
            "quantization_bit": 4,
            "gradient_checkpointing": True,
            "lora_rank": 16,
            "per_device_train_batch_size": 1,
            "per_device_eval_batch_size": 1,
            "cutoff_len": 2048,
        }
    )
    guess = estimate(LLAMA_3_8B, settings)
    linear = 6_979_321_856  # 32 layers of q, k, v, o, gate, up, down
    rest = 8_030_261_248 - linear  # embeddings, head, norms: float32 after k-bit preparation
    assert guess.weights == pytest.approx(linear * (0.5 + 1 / 64 + 4 / 64 / 256) + rest * 4)
    assert guess.adapter == 41_943_040 * 16  # float32 weights, gradients, two AdamW moments
    assert guess.logits == 2048 * 128256 * 12
    assert guess.evaluation == 2048 * 128256 * (2 + 8)
    # Checkpointing keeps one bf16 hidden state per layer and token, plus the final norm's copy.
    assert guess.activations == 2048 * (32 * 2 * 4096 + 4 * 4096)
    assert 12 < guess.gib < 14


def test_what_a_sweep_searches_moves_the_estimate_the_right_way():
    def gib(**values):
        return estimate(LLAMA_3_8B, trial_settings(values)).gib

    base = gib()
    assert gib(lora_rank=64) > base
    assert gib(per_device_train_batch_size=8) > base
    assert gib(cutoff_len=4096) > base
    assert gib(gradient_checkpointing=True) < base
    assert gib(quantization_bit=8) < base
    # A 4-bit layer hands back float32 (its input's dtype after k-bit preparation), so the
    # MLP keeps float32 activations: 4-bit saves memory with checkpointing, not without.
    assert gib(quantization_bit=4, gradient_checkpointing=True) < gib(gradient_checkpointing=True)
    assert gib(quantization_bit=4) > gib(quantization_bit=8)
    assert gib(lora_target="q_proj,v_proj") < base
    assert gib(optim="sgd") < base


def test_an_evaluation_batch_can_be_the_peak():
    small_train = trial_settings({"per_device_train_batch_size": 1, "gradient_checkpointing": True})
    guess = estimate(LLAMA_3_8B, small_train)
    assert guess.evaluation > guess.activations + guess.recomputed + guess.logits
    expected = guess.weights + guess.adapter + guess.evaluation + guess.overhead
    assert guess.peak == pytest.approx(expected)
    assert guess.gib == pytest.approx(guess.peak / GIB)
    assert guess.describe().startswith(f"{guess.gib:.1f} GiB (weights ")


def test_a_lora_target_the_estimate_cannot_size_is_refused_naming_the_modules():
    with pytest.raises(EstimateError) as error:
        trial_settings({"lora_target": "q_proj,c_attn"})
    assert error.value.setting == "lora_target"
    assert "c_attn is not one" in str(error.value) and "gate_proj" in str(error.value)


def test_a_bad_value_is_refused_naming_the_setting():
    with pytest.raises(EstimateError) as error:
        trial_settings({"per_device_train_batch_size": 0})
    assert error.value.setting == "per_device_train_batch_size"
    assert "0 is not valid" in str(error.value)

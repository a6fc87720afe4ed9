"""Packing is used only on models where packed examples cannot see each other."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from lora_trainer import tiny
from lora_trainer.data import encode_all, parse_record
from lora_trainer.isolation import check_isolation
from tests.trainer.helpers import cli, runs_of

CONFIGS = {
    "llama": lambda v: transformers.LlamaConfig(
        vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ),
    "gpt2": lambda v: transformers.GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4),
    "qwen2": lambda v: transformers.Qwen2Config(
        vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ),
    "opt": lambda v: transformers.OPTConfig(
        vocab_size=v, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64,
    ),
    "falcon": lambda v: transformers.FalconConfig(
        vocab_size=v, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        new_decoder_architecture=False,
    ),
    "bloom": lambda v: transformers.BloomConfig(vocab_size=v, hidden_size=64, n_layer=2, n_head=4),
}  # fmt: skip
ISOLATED = {
    "llama": True,
    "gpt2": True,
    "qwen2": True,
    "opt": False,
    "falcon": True,
    "bloom": False,
}


def random_model(architecture: str, tokenizer: Any) -> Any:
    config = CONFIGS[architecture](len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model


@pytest.fixture(scope="module")
def examples(tokenizer: Any) -> list[dict[str, list[int]]]:
    import random

    rng = random.Random(3)
    records = [tiny.toy_example(rng, length=n) for n in (20, 2, 5, 13, 1, 9, 30, 3)]
    conversations = [parse_record(r, f"toy:{i}") for i, r in enumerate(records)]
    return encode_all(conversations, "alpaca", tokenizer, cutoff_len=256).examples


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_the_check_tells_which_models_keep_packed_examples_apart(
    architecture: str, tokenizer: Any, examples: list[dict[str, list[int]]]
) -> None:
    verdict = check_isolation(random_model(architecture, tokenizer), examples)
    assert verdict.isolated == ISOLATED[architecture], verdict.reason


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    folder = tmp_path_factory.mktemp("opt")
    random_model("opt", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_model_that_mixes_packed_examples_trains_padded_and_says_so(
    tiny_opt: Path, base_settings: list[str], tracked_env: dict[str, str], tmp_path: Path
) -> None:
    settings = [
        *(s for s in base_settings if not s.startswith(("model_name_or_path=", "max_steps="))),
        f"model_name_or_path={tiny_opt}",
        "max_steps=10",
        "eval_steps=10",
    ]
    results = {}
    for packing in ("true", "false"):
        done = subprocess.run(
            cli([*settings, f"packing={packing}", f"output_dir={tmp_path / packing}"]),
            env=tracked_env | {"LORASWEEP_TRIAL": f"toy-sweep-packing-{packing}"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results[packing] = json.loads(Path(tracked_env["LORASWEEP_RESULT_PATH"]).read_text())
        if packing == "true":
            assert "packing is off for this model" in done.stderr
    # Asked for packing, it trained exactly as with padding.
    assert results["true"]["metrics"]["eval_loss"] == results["false"]["metrics"]["eval_loss"]
    tags = {
        run.data.params["packing"]: run.data.tags
        for run in runs_of(tracked_env["MLFLOW_TRACKING_URI"])
    }
    assert tags["True"]["lorasweep.packing"].startswith("off: packed examples see each other")

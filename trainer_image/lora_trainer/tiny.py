"""A tiny, randomly initialised Llama-style model, its tokenizer and a learnable toy dataset.

Built on the fly, so tests, the demo and the benchmark need nothing from a model hub:

    python -m lora_trainer.tiny OUTDIR    # OUTDIR/model, OUTDIR/train.jsonl, OUTDIR/eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Every assistant turn ends in <|end|>, and rendering a conversation prefix with a generation
# prompt yields a prefix of the full rendering: what the trainer's response masking relies on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '<|end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

NUMBER_WORDS = [str(n) for n in range(100)]


def toy_example(
    rng: random.Random, max_count: int = 12, length: int | None = None
) -> dict[str, str]:
    """A counting task (modulo 100): its answers follow from the prompt, so a model can learn it."""
    start = rng.randrange(100)
    length = length or rng.randint(1, max_count)
    numbers = " ".join(str((start + i) % 100) for i in range(length))
    return {
        "instruction": f"Count up from {start}.",
        "input": f"Say {length} numbers.",
        "output": numbers,
    }


def toy_dataset(n: int, seed: int = 0, max_count: int = 12) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [toy_example(rng, max_count) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _tokenizer_corpus() -> list[str]:
    rng = random.Random(1)
    texts = [" ".join(NUMBER_WORDS)]
    texts += [json.dumps(toy_example(rng)) for _ in range(200)]
    texts += [
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n### Input:\n### Response:\n",
        "The quick brown fox jumps over the lazy dog. Hello world, what is the answer? Yes, no.",
    ]
    return texts


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on the toy corpus: any text encodes, none is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    initializer_range: float = 0.1,
    seed: int = 0,
) -> Path:
    """Save a random Llama-style causal LM and its tokenizer to `out_dir`; returns the path.

    The weights start wider than Llama's 0.02: with a narrow output head, a tiny model's logits
    stay near zero and LoRA alone cannot make the toy task's loss fall far."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--train-examples", type=int, default=400)
    parser.add_argument("--eval-examples", type=int, default=40)
    args = parser.parse_args(argv)

    model_dir = build_model(
        args.out_dir / "model", hidden_size=args.hidden_size, num_layers=args.layers
    )
    train = write_jsonl(args.out_dir / "train.jsonl", toy_dataset(args.train_examples, seed=0))
    evaluation = write_jsonl(args.out_dir / "eval.jsonl", toy_dataset(args.eval_examples, seed=1))
    print(json.dumps({"model": str(model_dir), "train": str(train), "eval": str(evaluation)}))


if __name__ == "__main__":
    main()

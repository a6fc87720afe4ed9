"""Data: templates, response-only labels, truncation, the eval split and data errors."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from lora_trainer import data
from lora_trainer.data import IGNORE_INDEX, DataError

ALPACA = {"instruction": "Count up from 3.", "input": "Say 3 numbers.", "output": "3 4 5"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Count up from 3."},
        {"role": "assistant", "content": "3 4 5"},
        {"role": "user", "content": "And on?"},
        {"role": "assistant", "content": "6 7"},
    ]
}


def trained_text(example: data.Example, tokenizer: Any) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def masked_text(example: data.Example, tokenizer: Any) -> str:
    ids, labels = example["input_ids"], example["labels"]
    return tokenizer.decode(
        [t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    )


def encode(record: dict, template: data.Template, tokenizer: Any, cutoff_len: int = 512) -> Any:
    conversation = data.parse_record(record, "test:1")
    return data.encode(conversation, template, tokenizer, cutoff_len)


def test_alpaca_trains_on_the_response_and_eos_only(tokenizer: Any) -> None:
    example = encode(ALPACA, "alpaca", tokenizer)
    assert len(example["input_ids"]) == len(example["labels"])
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert trained_text(example, tokenizer) == "3 4 5</s>"
    prompt = masked_text(example, tokenizer)
    assert "### Instruction:\nCount up from 3.\nSay 3 numbers.\n\n### Response:\n" in prompt
    # Labels are the inputs themselves on the response: the model shifts them to predict.
    response = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert response == list(range(response[0], len(example["input_ids"])))
    assert [example["input_ids"][i] for i in response] == [example["labels"][i] for i in response]


def test_chat_template_masks_every_prompt_turn(tokenizer: Any) -> None:
    example = encode(CHAT, "chat", tokenizer)
    assert trained_text(example, tokenizer) == "3 4 5<|end|>\n6 7<|end|>\n"
    prompt = masked_text(example, tokenizer)
    assert "Be brief." in prompt and "Count up from 3." in prompt and "And on?" in prompt
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == full


def test_plain_template_and_multi_turn_alpaca(tokenizer: Any) -> None:
    plain = encode(ALPACA, "plain", tokenizer)
    assert tokenizer.decode(plain["input_ids"]) == "<s>Count up from 3.\nSay 3 numbers.3 4 5</s>"
    assert trained_text(plain, tokenizer) == "3 4 5</s>"
    multi = encode(CHAT, "alpaca", tokenizer)
    assert trained_text(multi, tokenizer) == "3 4 5</s>6 7</s>"
    assert "Be brief." in masked_text(multi, tokenizer)


def test_auto_template_uses_the_tokenizers_chat_template(tokenizer: Any) -> None:
    assert data.resolve_template("auto", tokenizer) == "chat"


def test_cutoff_len_truncates_and_drops_examples_without_response(tokenizer: Any) -> None:
    full = encode(ALPACA, "alpaca", tokenizer)
    short = encode(ALPACA, "alpaca", tokenizer, cutoff_len=len(full["input_ids"]) - 2)
    assert short["input_ids"] == full["input_ids"][:-2]
    assert trained_text(short, tokenizer) == "3 4"
    conversations = [data.parse_record(ALPACA, "test:1")]
    split = data.encode_all(conversations, "alpaca", tokenizer, cutoff_len=10)
    assert (split.examples, split.dropped) == ([], 1)


def test_eval_split_depends_on_content_only() -> None:
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50)]
    lines = [json.dumps(r) for r in records]
    conversations = [
        data.parse_record(r, f"f:{i}", raw=line)
        for i, (r, line) in enumerate(zip(records, lines, strict=True))
    ]
    train, held_out = data.split_by_content(conversations, 0.2)
    assert (len(train), len(held_out)) == (40, 10)
    assert not {c.raw for c in train} & {c.raw for c in held_out}
    shuffled = conversations[:]
    random.Random(7).shuffle(shuffled)
    assert {c.raw for c in data.split_by_content(shuffled, 0.2)[1]} == {c.raw for c in held_out}
    assert len(data.split_by_content(conversations, 3)[1]) == 3
    with pytest.raises(DataError, match="holds out 50 of 50 examples"):
        data.split_by_content(conversations, 50)


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ((json.dumps(ALPACA), '{"instruction": "hi"}'), r"train.jsonl:2: missing key 'output'"),
        (
            (json.dumps(ALPACA), "", '{"instruction": "x", "output": 5}'),
            r":3: 'output' must be a string",
        ),
        (('{"instruction": "x", "output": "y"',), r"train.jsonl:1: not valid JSON \(Expecting"),
        (("[1, 2]",), r"train.jsonl:1: expected a JSON object, got list"),
        (("", "  "), r"train.jsonl: no examples \(the file is empty\)"),
        (
            ('{"messages": [{"role": "assistant", "content": "hi"}]}',),
            r"train.jsonl:1: messages\[0\] has role 'assistant', expected 'user'",
        ),
        (
            ('{"messages": [{"role": "user", "content": "hi"}]}',),
            r"train.jsonl:1: the last message must be from the assistant",
        ),
    ],
)
def test_bad_data_names_file_line_and_problem(
    tmp_path: Path, lines: tuple[str, ...], expected: str
) -> None:
    path = write(tmp_path / "train.jsonl", *lines)
    with pytest.raises(DataError, match=expected):
        data.read_jsonl(path)


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.jsonl: data file not found"):
        data.read_jsonl(tmp_path / "nope.jsonl")


def test_tiny_builder_writes_a_model_and_dataset_the_trainer_reads(tmp_path: Path) -> None:
    import subprocess
    import sys

    from transformers import AutoConfig

    done = subprocess.run(
        [sys.executable, "-m", "lora_trainer.tiny", str(tmp_path), "--train-examples", "20"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    paths = json.loads(done.stdout)
    assert AutoConfig.from_pretrained(paths["model"]).model_type == "llama"
    assert len(data.read_jsonl(paths["train"])) == 20
    assert len(data.read_jsonl(paths["eval"])) == 40

"""Packing: packed rows must compute exactly what the examples do one by one."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_trainer import tiny
from lora_trainer.collate import REAL_TOKENS, PackingCollator, PaddingCollator
from lora_trainer.data import IGNORE_INDEX, encode_all, parse_record

LOSS_TOLERANCE = 1e-5


def examples(tokenizer: Any) -> list[dict[str, list[int]]]:
    """Varied lengths, as in real data: short examples share rows, long ones need their own."""
    rng = random.Random(3)
    records = [tiny.toy_example(rng, length=n) for n in (150, 2, 5, 130, 1, 9, 30, 3)]
    conversations = [parse_record(r, f"toy:{i}") for i, r in enumerate(records)]
    return encode_all(conversations, "alpaca", tokenizer, cutoff_len=512).examples


def load(tiny_model: Path, attention: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention)
    model.config.use_cache = False
    return model.eval()


def one_by_one(
    model: Any, batch: list[dict[str, list[int]]]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Token-weighted mean loss over the examples, each run on its own; and their logits."""
    total, targets, logits = 0.0, 0, []
    for example in batch:
        labels = torch.tensor([example["labels"]])
        out = model(input_ids=torch.tensor([example["input_ids"]]), labels=labels)
        count = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total += out.loss.double() * count
        targets += count
        logits.append(out.logits[0])
    return total / targets, logits


def pack(batch: list[dict[str, list[int]]], one_row: bool) -> dict[str, torch.Tensor]:
    packed = PackingCollator(pad_token_id=0, one_row=one_row)(batch)
    assert int(packed.pop(REAL_TOKENS)) == sum(len(e["input_ids"]) for e in batch)
    return packed


def pieces(packed: dict[str, torch.Tensor], logits: torch.Tensor) -> dict[tuple, torch.Tensor]:
    """Each packed sequence's logits, keyed by its token ids (padding included, under pads)."""
    found = {}
    for row, positions in enumerate(packed["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, end in itertools.pairwise(starts):
            ids = tuple(packed["input_ids"][row, start:end].tolist())
            found[ids] = logits[row, start:end]
    return found


@pytest.mark.parametrize(
    ("attention", "one_row"), [("sdpa", True), ("eager", True), ("sdpa", False), ("eager", False)]
)
def test_packed_batch_equals_examples_one_by_one(
    tiny_model: Path, tokenizer: Any, attention: str, one_row: bool
) -> None:
    model = load(tiny_model, attention)
    batch = examples(tokenizer)
    with torch.no_grad():
        expected_loss, expected_logits = one_by_one(model, batch)
        packed = pack(batch, one_row)
        out = model(**packed)
    assert float(out.loss) == pytest.approx(float(expected_loss), abs=LOSS_TOLERANCE)
    found = pieces(packed, out.logits)
    for example, alone in zip(batch, expected_logits, strict=True):
        torch.testing.assert_close(found[tuple(example["input_ids"])], alone, atol=1e-4, rtol=1e-4)


def test_one_row_has_no_padding_and_rows_are_no_longer_than_the_longest_example(
    tokenizer: Any,
) -> None:
    batch = examples(tokenizer)
    total = sum(len(e["input_ids"]) for e in batch)
    longest = max(len(e["input_ids"]) for e in batch)
    assert pack(batch, one_row=True)["input_ids"].shape == (1, total)
    rows = pack(batch, one_row=False)["input_ids"]
    assert rows.shape[1] == longest
    assert rows.shape[0] < len(batch), "several examples share a row"
    assert rows.numel() < len(batch) * longest, "less padding than the padding collator"


def test_padded_batch_gives_the_same_loss(tiny_model: Path, tokenizer: Any) -> None:
    model = load(tiny_model, "sdpa")
    batch = examples(tokenizer)
    with torch.no_grad():
        padded = PaddingCollator(pad_token_id=tokenizer.pad_token_id)(batch)
        packed = pack(batch, one_row=False)
        assert float(model(**padded).loss) == pytest.approx(
            float(model(**packed).loss), abs=LOSS_TOLERANCE
        )


def test_without_restarting_positions_examples_would_see_each_other(
    tiny_model: Path, tokenizer: Any
) -> None:
    """The equality above is not an accident: a naive concatenation gives another loss."""
    model = load(tiny_model, "sdpa")
    batch = examples(tokenizer)
    packed = pack(batch, one_row=True)
    naive = {"input_ids": packed["input_ids"], "labels": packed["labels"]}
    with torch.no_grad():
        expected_loss, _ = one_by_one(model, batch)
        assert abs(float(model(**naive).loss) - float(expected_loss)) > 1e-3


@pytest.mark.parametrize("one_row", [True, False])
def test_packed_labels_never_ask_one_example_to_predict_the_next(
    tokenizer: Any, one_row: bool
) -> None:
    packed = pack(examples(tokenizer), one_row)
    starts = packed["position_ids"] == 0
    assert bool((packed["labels"][starts] == IGNORE_INDEX).all())
    assert int(starts.sum()) >= len(examples(tokenizer))

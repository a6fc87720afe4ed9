"""Batches for the trainer: packed rows or padded ones, as torch tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_trainer.data import IGNORE_INDEX, Example

# Collators may add this count of non-padding tokens; the trainer pops it before the forward.
REAL_TOKENS = "num_real_tokens"


def _first_fit(features: list[Example], capacity: int) -> list[list[Example]]:
    rows: list[list[Example]] = []
    room: list[int] = []
    for feature in sorted(features, key=lambda f: len(f["input_ids"]), reverse=True):
        length = len(feature["input_ids"])
        for index, free in enumerate(room):
            if length <= free:
                rows[index].append(feature)
                room[index] -= length
                break
        else:
            rows.append([feature])
            room.append(capacity - length)
    return rows


@dataclass
class PackingCollator:
    """Pack a batch's examples into rows with position ids restarting per example. Attention
    kernels read the restarts as sequence boundaries (as with transformers'
    DataCollatorWithFlattening), so no example sees another.

    With `one_row`, the whole batch is one padding-free row: right for flash-attention, whose
    cost grows with the sum of squared example lengths. Kernels that take a dense mask (sdpa,
    eager) pay for the square of the row length instead, so by default examples are packed
    first-fit into rows no longer than the batch's longest example, and only the last bit of
    each row is padding."""

    pad_token_id: int
    one_row: bool = False

    def __call__(self, features: list[Example]) -> dict[str, torch.Tensor]:
        if self.one_row:
            rows = [features]
        else:
            rows = _first_fit(features, max(len(f["input_ids"]) for f in features))
        width = max(sum(len(f["input_ids"]) for f in row) for row in rows)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows:
            input_ids: list[int] = []
            labels: list[int] = []
            position_ids: list[int] = []
            for feature in row:
                input_ids += feature["input_ids"]
                # The first token of an example must not be the target of the previous one's last.
                labels += [IGNORE_INDEX, *feature["labels"][1:]]
                position_ids += range(len(feature["input_ids"]))
            # Padding restarts its positions too: a sequence of its own that no example sees.
            padding = width - len(input_ids)
            batch["input_ids"].append(input_ids + [self.pad_token_id] * padding)
            batch["labels"].append(labels + [IGNORE_INDEX] * padding)
            batch["position_ids"].append(position_ids + list(range(padding)))
        tensors = {key: torch.tensor(value) for key, value in batch.items()}
        tensors[REAL_TOKENS] = torch.tensor(sum(len(f["input_ids"]) for f in features))
        return tensors


@dataclass
class PaddingCollator:
    """Right-pad a batch to its longest example."""

    pad_token_id: int

    def __call__(self, features: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(feature["input_ids"]) for feature in features)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
        for feature in features:
            padding = width - len(feature["input_ids"])
            batch["input_ids"].append(feature["input_ids"] + [self.pad_token_id] * padding)
            batch["labels"].append(feature["labels"] + [IGNORE_INDEX] * padding)
            batch["attention_mask"].append([1] * len(feature["input_ids"]) + [0] * padding)
        return {key: torch.tensor(value) for key, value in batch.items()}

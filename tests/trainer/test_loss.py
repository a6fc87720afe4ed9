"""The output head runs only where a label is, and the loss and gradients stay the model's."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_trainer import tiny
from lora_trainer.collate import REAL_TOKENS, PackingCollator, PaddingCollator
from lora_trainer.config import load_config
from lora_trainer.data import encode_all, parse_record
from lora_trainer.stopping import StopFlag
from lora_trainer.train import LoraTrainer, hf_arguments, load_model


@pytest.mark.parametrize("collator", [PackingCollator(pad_token_id=0), PaddingCollator(0)])
@pytest.mark.parametrize("items", [None, 57])
def test_the_labelled_head_computes_the_models_loss_and_gradients(
    tiny_model: Path, tokenizer: Any, tmp_path: Path, collator: Any, items: int | None
) -> None:
    cfg = load_config(
        None,
        [f"model_name_or_path={tiny_model}", "train_file=/unused", f"output_dir={tmp_path}"],
        {},
    )
    model = load_model(cfg)
    trainer = LoraTrainer(model=model, args=hf_arguments(cfg, has_eval=False), stop_flag=StopFlag())
    assert trainer.labelled_head
    rng = random.Random(5)
    records = [tiny.toy_example(rng, length=n) for n in (12, 3, 30, 7)]
    conversations = [parse_record(r, f"toy:{i}") for i, r in enumerate(records)]
    batch = collator(encode_all(conversations, "alpaca", tokenizer, cutoff_len=256).examples)
    batch.pop(REAL_TOKENS, None)
    num_items = None if items is None else torch.tensor(items)

    def loss_and_grads(labelled: bool) -> tuple[float, list[torch.Tensor]]:
        trainer.labelled_head = labelled
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain_loss, plain_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, rtol=1e-4, atol=1e-6)

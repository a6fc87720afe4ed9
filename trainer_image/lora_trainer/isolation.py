"""Whether packing is safe on a model: a packed batch must compute what its examples compute
one by one.

Packed rows rely on the model reading the restarting position ids as sequence boundaries
(transformers builds a block-diagonal mask from them for Llama-like models, GPT-2 and, since
transformers 5, Falcon). Models that ignore position ids there (OPT, Bloom, ...) let the
examples of a row attend to each other, silently training on a different task; on those the
trainer pads instead."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_trainer.data import Example

# Examples taken from the training data for the check: enough to share a row.
CHECK_EXAMPLES = 8
# Largest difference of the logits, relative to their largest magnitude, that counts as the
# same computation: float32 kernels differ by ~1e-6 between a packed row and separate ones,
# 16-bit ones by up to ~1e-2, while examples that see each other differ by far more.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_PRECISION_TOLERANCE = 5e-2


@dataclass(frozen=True)
class Isolation:
    isolated: bool
    reason: str  # why not, or how close the logits were


def check_isolation(model: Any, examples: Sequence[Example]) -> Isolation:
    """Run a few real examples packed into one row (position ids restarting per example, as
    both packing layouts do) and one by one, and compare each example's logits."""
    sample = list(examples[:CHECK_EXAMPLES])
    if len(sample) < 2:
        return Isolation(True, "fewer than 2 examples: nothing to mix")
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    row = [token for example in sample for token in example["input_ids"]]
    positions = [p for example in sample for p in range(len(example["input_ids"]))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(
                input_ids=torch.tensor([row], device=device),
                position_ids=torch.tensor([positions], device=device),
            ).logits[0]
            separate = torch.cat(
                [
                    model(input_ids=torch.tensor([e["input_ids"]], device=device)).logits[0]
                    for e in sample
                ]
            )
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. no position_ids argument
        return Isolation(False, f"the model cannot run packed rows: {type(exc).__name__}: {exc}")
    finally:
        model.train(was_training)
    scale = float(separate.abs().max().clamp(min=1e-6))
    difference = float((packed.float() - separate.float()).abs().max()) / scale
    if difference > TOLERANCE.get(dtype, HALF_PRECISION_TOLERANCE):
        return Isolation(
            False,
            f"packed examples see each other on this model ({type(model).__name__}): logits "
            f"differ by {difference:.2g} of their scale from the examples run one by one",
        )
    return Isolation(True, f"packed and separate logits agree within {difference:.1e}")

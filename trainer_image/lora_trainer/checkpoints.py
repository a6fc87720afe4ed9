"""Finding the checkpoint to resume from in a directory that outlives the trainer's process."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger("lora_trainer")

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
# What transformers' Trainer writes into a checkpoint (alternatives: FSDP's or older names).
# It writes trainer_state.json last, so a process killed mid-save leaves a folder without it.
REQUIRED_FILES = (
    ("adapter_model.safetensors", "adapter_model.bin"),
    ("optimizer.pt", "optimizer.bin"),
    ("scheduler.pt",),
    ("trainer_state.json",),
)


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match[1]) if match else None


def is_complete(path: Path) -> bool:
    """Whether the checkpoint has everything a resume restores: weights, optimizer, scheduler,
    random number generators and the trainer's state (step, data position, log history)."""
    if not all(any((path / name).is_file() for name in names) for names in REQUIRED_FILES):
        return False
    if not any(path.glob("rng_state*.pth")):
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("global_step") == checkpoint_step(path)


def latest_complete(directory: Path) -> Path | None:
    """The complete checkpoint with the highest step in `directory`; None when there is none."""
    if not directory.is_dir():
        return None
    found = sorted(
        (step, path)
        for path in directory.iterdir()
        if path.is_dir() and (step := checkpoint_step(path)) is not None
    )
    for _, path in reversed(found):
        if is_complete(path):
            return path
        log.warning("skipping %s: incomplete (the process was stopped while saving it)", path)
    return None

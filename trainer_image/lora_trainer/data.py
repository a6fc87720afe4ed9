"""Data: JSONL reading, prompt templates, response-only labels and splitting (no torch: the
batches are built by collate.py)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

IGNORE_INDEX = -100
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
Template = Literal["alpaca", "plain", "chat"]


class DataError(ValueError):
    """Unusable data; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Conversation:
    """One training example: an optional system prompt and (user, assistant) turns."""

    turns: tuple[tuple[str, str], ...]
    system: str | None = None
    source: str = ""  # file:line, for error messages
    raw: str = ""  # the JSONL line, for the content-based split

    def messages(self) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.turns:
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        return messages


Example = dict[str, list[int]]


def _text(record: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise DataError(
            f"{where}: missing key {key!r} (alpaca form needs 'instruction' and 'output', "
            "chat form needs 'messages')"
        )
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _parse_messages(messages: Any, where: str) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    has_system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
    system = _text(messages[0], "content", f"{where}: messages[0]") if has_system else None
    offset = int(has_system)
    contents = []
    for index in range(offset, len(messages)):
        message = messages[index]
        expected = ("user", "assistant")[(index - offset) % 2]
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{index}] must be an object with role and content")
        if message.get("role") != expected:
            raise DataError(
                f"{where}: messages[{index}] has role {message.get('role')!r}, expected "
                f"{expected!r} (an optional system message, then user and assistant alternating)"
            )
        contents.append(_text(message, "content", f"{where}: messages[{index}]"))
    if not contents or len(contents) % 2:
        raise DataError(f"{where}: the last message must be from the assistant")
    turns = list(zip(contents[::2], contents[1::2], strict=True))
    return system, tuple(turns)


def parse_record(record: Any, where: str, raw: str = "") -> Conversation:
    """Read one JSON object in alpaca form or chat form."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        system, turns = _parse_messages(record["messages"], where)
        return Conversation(turns=turns, system=system, source=where, raw=raw)
    instruction = _text(record, "instruction", where)
    extra_input = _text(record, "input", where, required=False)
    output = _text(record, "output", where)
    user = f"{instruction}\n{extra_input}" if extra_input else instruction
    system = _text(record, "system", where, required=False) or None
    return Conversation(turns=((user, output),), system=system, source=where, raw=raw)


def read_jsonl(path: str | Path, max_samples: int | None = None) -> list[Conversation]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read data file: {exc}") from None
    conversations = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        conversations.append(parse_record(record, where, raw=line))
        if max_samples is not None and len(conversations) >= max_samples:
            break
    if not conversations:
        raise DataError(f"{path}: no examples (the file is empty)")
    return conversations


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_by_content(
    conversations: list[Conversation], val_size: float
) -> tuple[list[Conversation], list[Conversation]]:
    """Hold out examples chosen by a hash of their content, not by the seed: every trial of a
    sweep, whatever its seed, evaluates on the same examples."""
    count = round(len(conversations) * val_size) if val_size < 1 else int(val_size)
    if val_size > 0:
        count = max(count, 1)
    if count >= len(conversations):
        raise DataError(
            f"val_size={val_size} holds out {count} of {len(conversations)} examples, "
            "leaving none to train on"
        )
    ranked = sorted(
        range(len(conversations)),
        key=lambda i: hashlib.sha256(conversations[i].raw.encode()).hexdigest(),
    )
    held_out = set(ranked[:count])
    train = [c for i, c in enumerate(conversations) if i not in held_out]
    evaluation = [c for i, c in enumerate(conversations) if i in held_out]
    return train, evaluation


def resolve_template(template: str, tokenizer: Any) -> Template:
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "template=chat, but the tokenizer has no chat template; use template=alpaca or plain"
        )
    return template  # type: ignore[return-value]


def _segments(
    conversation: Conversation, template: Template, tokenizer: Any
) -> list[tuple[str, bool]]:
    """The example as (text, is_response) pieces, in order."""
    if template == "chat":
        return _chat_segments(conversation, tokenizer)
    pieces: list[tuple[str, bool]] = []
    if template == "alpaca":
        pieces.append((f"{conversation.system or ALPACA_SYSTEM}\n\n", False))
        for index, (user, assistant) in enumerate(conversation.turns):
            separator = "\n\n" if index else ""
            pieces.append((f"{separator}### Instruction:\n{user}\n\n### Response:\n", False))
            pieces.append((assistant, True))
    else:
        if conversation.system:
            pieces.append((f"{conversation.system}\n", False))
        for user, assistant in conversation.turns:
            pieces += [(user, False), (assistant, True)]
    return pieces


def _chat_segments(conversation: Conversation, tokenizer: Any) -> list[tuple[str, bool]]:
    # The chat template is opaque text; the response of turn i is what rendering turn i adds
    # after the generation prompt. This needs renderings of prefixes to be prefixes.
    messages = conversation.messages()
    pieces: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(
            messages[:index], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(
                f"{conversation.source}: the tokenizer's chat template does not render a "
                "conversation's beginning as a prefix of the whole, so responses cannot be "
                "masked; use template=alpaca or plain"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def encode(
    conversation: Conversation, template: Template, tokenizer: Any, cutoff_len: int
) -> Example:
    """Token ids and labels; labels are IGNORE_INDEX except on response tokens."""
    input_ids: list[int] = []
    labels: list[int] = []
    # Chat templates write their own special tokens; the others get BOS, and EOS after each
    # response so the model learns to stop.
    if template != "chat" and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, is_response in _segments(conversation, template, tokenizer):
        ids = tokenizer.encode(text, add_special_tokens=False) if text else []
        if is_response and template != "chat" and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        input_ids += ids
        labels += ids if is_response else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids[:cutoff_len], "labels": labels[:cutoff_len]}


@dataclass
class EncodedSplit:
    examples: list[Example]
    dropped: int = 0  # examples with no response token left after truncation

    @property
    def tokens(self) -> int:
        return sum(len(example["input_ids"]) for example in self.examples)


def encode_all(
    conversations: list[Conversation], template: Template, tokenizer: Any, cutoff_len: int
) -> EncodedSplit:
    split = EncodedSplit(examples=[])
    for conversation in conversations:
        example = encode(conversation, template, tokenizer, cutoff_len)
        if all(label == IGNORE_INDEX for label in example["labels"][1:]):
            split.dropped += 1
        else:
            split.examples.append(example)
    return split


@dataclass
class PreparedData:
    train: EncodedSplit
    eval: EncodedSplit | None
    template: Template
    file_hashes: dict[str, str] = field(default_factory=dict)


def prepare(
    *,
    train_file: str,
    eval_file: str | None,
    val_size: float,
    max_samples: int | None,
    cutoff_len: int,
    template: str,
    tokenizer: Any,
) -> PreparedData:
    resolved = resolve_template(template, tokenizer)
    train = read_jsonl(train_file, max_samples)
    hashes = {train_file: file_sha256(train_file)}
    if eval_file:
        evaluation = read_jsonl(eval_file, max_samples)
        hashes[eval_file] = file_sha256(eval_file)
    elif val_size > 0:
        train, evaluation = split_by_content(train, val_size)
    else:
        evaluation = []
    train_split = encode_all(train, resolved, tokenizer, cutoff_len)
    if not train_split.examples:
        raise DataError(
            f"{train_file}: no example keeps a response token within cutoff_len={cutoff_len}; "
            "raise cutoff_len or shorten the prompts"
        )
    eval_split = encode_all(evaluation, resolved, tokenizer, cutoff_len) if evaluation else None
    if eval_split is not None and not eval_split.examples:
        eval_split = None
    return PreparedData(train=train_split, eval=eval_split, template=resolved, file_hashes=hashes)

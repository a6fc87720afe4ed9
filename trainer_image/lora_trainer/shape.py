"""The model's shape from its config.json: what a sweep's spec.constraints.model takes.

No torch here: the operator's `lorasweep model-shape` reads a config.json with it too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# config.json keys, in the order spec.constraints.model lists them (camelCased there).
REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
)
OPTIONAL = ("num_key_value_heads", "head_dim", "tie_word_embeddings")
DTYPES = ("float32", "bfloat16", "float16")
# What the trainer's MLflow tags of the shape are called: lorasweep.model.hidden_size, ...
TAG_PREFIX = "lorasweep.model."


class ShapeError(ValueError):
    """A config.json that does not say what the memory estimate needs."""


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


def model_shape(config: Mapping[str, Any], parameters: int | None = None) -> dict[str, Any]:
    """The shape of a model from its config (config.json as a mapping), with snake_case keys.

    Multimodal configs keep the language model's settings under text_config; that is the part
    a LoRA sweep trains. `parameters` is the exact parameter count, where it is known."""
    text = config.get("text_config")
    source = {**config, **text} if isinstance(text, Mapping) else dict(config)
    missing = [key for key in REQUIRED if not isinstance(source.get(key), int)]
    if missing:
        raise ShapeError(
            f"the model's config has no {', '.join(missing)}: it is not a decoder whose memory "
            "can be estimated"
        )
    shape: dict[str, Any] = {key: source[key] for key in REQUIRED}
    for key in OPTIONAL:
        if source.get(key) is not None:
            shape[key] = source[key]
    # transformers 5 writes dtype; earlier versions torch_dtype.
    dtype = source.get("dtype") or source.get("torch_dtype")
    if dtype in DTYPES:
        shape["dtype"] = dtype
    if parameters is not None:
        shape["parameters"] = parameters
    return shape


def shape_yaml(shape: Mapping[str, Any]) -> str:
    """The shape as the YAML block under spec.constraints.model, in one line."""
    items = ", ".join(f"{_camel(key)}: {json.dumps(value)}" for key, value in shape.items())
    return "{" + items + "}"


def shape_tags(shape: Mapping[str, Any]) -> dict[str, str]:
    return {
        f"{TAG_PREFIX}{key}": value if isinstance(value, str) else json.dumps(value)
        for key, value in shape.items()
    }


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a model: the file, or the one in a model directory."""
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    try:
        config = json.loads(file.read_text())
    except OSError as exc:
        raise ShapeError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ShapeError(f"{file}: not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ShapeError(f"{file}: expected a JSON object")
    return config

"""Jinja2 templates in a bounded sandbox, and the YAML text they write. Pure.

Templates run in Jinja2's immutable sandbox with StrictUndefined: a user template (or an
`args` string) can read what it is given but cannot call into Python internals or mutate the
context, and a misspelt variable is an error instead of an empty string. What one rendering
may build is bounded (ranges, repeated strings and lists, powers, the output), and every error
a template causes is a RenderError naming the field and the template line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import jinja2
import yaml
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

# libyaml's loader resolves scalars exactly like SafeLoader and is ~10x faster, which matters
# when a sweep creates a thousand Jobs at once.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class RenderError(ValueError):
    """A template or an args string did not render a valid trial Job."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def yaml_flow(value: Any) -> str:
    """`value` as single-line YAML that PyYAML and Kubernetes both read back unchanged.

    JSON is YAML, except that PyYAML reads `1e-05` as a string: floats are written with a
    dot (`1.0e-05`), and strings are always double-quoted so that `yes` or `1e-4` stay strings.
    """
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        if "." not in text and "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        return _yaml_string(value)
    if isinstance(value, dict):
        items = (f"{_yaml_string(str(k))}: {yaml_flow(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_flow(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as YAML: {value!r}")


def yaml_scalar(value: Any) -> str:
    """A value for `--set name=value`, read back by the trainer with yaml.safe_load."""
    if isinstance(value, str):
        plain = "\n" not in value and value == value.strip()
        if plain:
            try:
                plain = load_yaml(value) == value
            except yaml.YAMLError:
                plain = False
        return value if plain else _yaml_string(value)
    return yaml_flow(value)


# A JSON escape of a character beyond the BMP (a surrogate pair) that no backslash escapes.
_SURROGATE_PAIR = re.compile(r"(?<!\\)((?:\\\\)*)\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})")


def _yaml_string(value: str) -> str:
    """A double-quoted YAML string: JSON's, except that a character beyond the BMP is written
    as YAML's `\\U` escape (libyaml refuses JSON's surrogate pairs, so an emoji in a value
    would fail the Job)."""

    def code_point(pair: re.Match[str]) -> str:
        high, low = int(pair[2], 16), int(pair[3], 16)
        return f"{pair[1]}\\U{0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00):08x}"

    return _SURROGATE_PAIR.sub(code_point, json.dumps(value))


def params_json(parameters: dict[str, Any]) -> str:
    """Parameters as compact JSON with sorted keys: the same text for the same parameters."""
    return json.dumps(parameters, sort_keys=True, separators=(",", ":"))


# What one rendering may build. A trial Job is a few KiB and the apiserver refuses a request
# over 3 MiB, so a template producing more is a mistake; these bounds refuse it before the
# operator spends its memory and CPU on it.
MAX_OUTPUT_CHARS = 1_000_000
MAX_RANGE = 10_000
MAX_POWER_BITS = 4_096


class TemplateLimitError(jinja2.TemplateRuntimeError):
    """A template asked for more than one rendering may build."""


def _template_range(*args: int) -> range:
    """range() for templates: Jinja's sandbox allows 100,000 items, with a message that names
    its own constant; this says what the template asked for and what it may have."""
    items = range(*args)
    if len(items) > MAX_RANGE:
        raise TemplateLimitError(
            f"range({', '.join(map(str, args))}) has {len(items):,} items; "
            f"a template may ask for at most {MAX_RANGE:,}"
        )
    return items


def _too_big(what: str) -> NoReturn:
    raise TemplateLimitError(
        f"{what} is too big: a template may build at most {MAX_OUTPUT_CHARS:,} characters "
        "(or list items)"
    )


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with `*` and `**` refused where their result would be huge
    (`"x" * 10**10`, `10 ** 1000000000` exhaust memory or CPU in one expression)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if (
                    isinstance(sequence, str | list | tuple)
                    and isinstance(count, int)
                    and len(sequence) * count > MAX_OUTPUT_CHARS
                ):
                    _too_big(f"a {type(sequence).__name__} repeated {count:,} times")
        elif (
            isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and right * left.bit_length() > MAX_POWER_BITS
        ):
            raise TemplateLimitError(
                f"{left} ** {right} has about {right * left.bit_length():,} bits; a template "
                f"may compute integers of at most {MAX_POWER_BITS:,} bits"
            )
        return super().call_binop(context, operator, left, right)


def _environment(yaml_filter: Callable[..., str]) -> _Sandbox:
    env = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.filters["yaml"] = yaml_filter
    env.globals["range"] = _template_range
    # lipsum(n) writes n paragraphs of filler text: nothing a Job needs, and unbounded.
    del env.globals["lipsum"]
    return env


# A value written by `_slot_of` in place of `| yaml`: this prefix and the value's number.
_SLOT = "lorasweep-value-slot-"


@jinja2.pass_context
def _slot_of(context: Context, value: Any) -> str:
    written = yaml_flow(value)  # refuses what it cannot write, as `| yaml` does
    slots = context[_SLOTS]
    slots.append((value, len(written)))
    return f'"{_SLOT}{len(slots) - 1}"'


_SLOTS = "lorasweep_slots"  # the context's list of (value, written length), for _slot_of
_ENV = _environment(yaml_flow)
_SLOT_ENV = _environment(_slot_of)


@functools.lru_cache(maxsize=256)
def _compile(env: _Sandbox, source: str) -> jinja2.Template:
    return env.from_string(source)


def render_text(source: str, field: str, context: dict[str, Any]) -> str:
    """The rendered text; any error the template causes (a syntax error, an undefined name, a
    division by zero, a limit) is a RenderError naming the field and, where known, the line."""
    return _render(_ENV, source, field, context)


def render_yaml(source: str, field: str, context: dict[str, Any]) -> Any:
    """`load_yaml(render_text(source, field, context))`, faster for a template whose every
    value is written by `| yaml` as a whole YAML value, and whose shape depends on what is
    the same for all trials (the built-in template): rendered with a numbered token for each
    value, its text is the same for every trial of a sweep; that text is read as YAML once,
    and each Job is that tree with its values put back as YAML would read them. Reading the
    YAML was 70% of a Job's rendering. A template that writes a value inside a longer string
    or a key, or that is too big, is rendered and read as text."""
    slots: list[tuple[Any, int]] = []
    text = _render(_SLOT_ENV, source, field, {**context, _SLOTS: slots})
    if len(text) + sum(size for _, size in slots) <= MAX_OUTPUT_CHARS:
        with contextlib.suppress(_NotWhole, yaml.YAMLError):
            return _filled(_read_shape(text), [value for value, _ in slots])
    return load_yaml(render_text(source, field, context))


class _NotWhole(Exception):
    """A value written inside a longer string or a key: only its text says what it reads as."""


@functools.lru_cache(maxsize=64)
def _read_shape(text: str) -> Any:
    return load_yaml(text)


def _filled(node: Any, values: list[Any]) -> Any:
    """A copy of `node` (read from a template's text; not changed) with each token replaced
    by its value."""
    if isinstance(node, str):
        number = node.removeprefix(_SLOT)
        if number != node and number.isdigit():
            return _as_read(values[int(number)])
        if _SLOT in node:
            raise _NotWhole
        return node
    if isinstance(node, dict):
        if any(isinstance(key, str) and _SLOT in key for key in node):
            raise _NotWhole
        return {key: _filled(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_filled(item, values) for item in node]
    return node


def _as_read(value: Any) -> Any:
    """What YAML reads back from `yaml_flow(value)`: a fresh copy, keys as strings, tuples as
    lists."""
    if isinstance(value, dict):
        return {str(key): _as_read(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_as_read(item) for item in value]
    return value


def _render(env: _Sandbox, source: str, field: str, context: dict[str, Any]) -> str:
    chunks, size = [], 0
    try:
        for chunk in _compile(env, source).generate(context):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                _too_big("the rendered text")
            chunks.append(chunk)
    except Exception as error:  # whatever the template did, it is the template's error
        line = _template_line(error)
        where = f" (line {line})" if line is not None else ""
        raise RenderError(field, f"{type(error).__name__}: {error}{where}") from error
    return "".join(chunks)


def _template_line(error: Exception) -> int | None:
    """The template line an error comes from: a syntax error's own, or the innermost template
    frame of the traceback (Jinja rewrites it to point at the template's lines)."""
    if isinstance(error, jinja2.TemplateSyntaxError):
        return error.lineno
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(error.__traceback__)
        if frame.filename == "<template>"
    ]
    return lines[-1] if lines else None

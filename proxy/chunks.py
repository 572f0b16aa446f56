"""What an upstream's stream chunks say, read for the relay (:mod:`proxy.relay`): an SSE event's data, its
JSON object, whether a chunk carries generated output or finishes every chat choice, a key outside the
strings of the raw JSON, and the figure put on a finish chunk. These run for every relayed chunk."""

from __future__ import annotations

import re
from typing import Any

import orjson

# Generated output in a streamed choice: a non-empty string of text (chat and completions) or
# reasoning (vLLM, SGLang, DeepSeek, Ollama), a non-empty list of tool calls, a function call.
# The role chunk ("content": "") and the finish chunk ("content": null, "delta": {}) carry none.
_TEXT_KEYS = ("content", "text", "reasoning_content", "reasoning")
# (No lookbehind for escaped quotes in these patterns: it makes a search 20x slower; see has_key.)
USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')
ERROR_KEY = re.compile(rb'"error"\s*:\s*[{"]')
# How the lines of an SSE event start: its data, the spec's other fields, comments.
NO_DATA = (b"event:", b"id:", b"retry:", b":")
_SSE_LINE = (b"data:", *NO_DATA)


def sse_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its ``data:`` lines joined), None when it has none."""
    if event.startswith(b"data: "):  # the usual shape: one data line
        if b"\n" not in event:
            return event[6:]
    elif not event.startswith(_SSE_LINE):
        return None
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def output_and_finish(chunk: dict[str, Any]) -> tuple[bool, bool]:
    """Whether a stream chunk carries generated output (see _TEXT_KEYS: in a chat choice's ``delta``, or
    in a completions choice itself), and whether it finishes every chat choice it has (each has a ``delta``
    and a ``finish_reason``). One pass, as this runs for every chunk relayed."""
    choices = chunk.get("choices")
    if not choices or not isinstance(choices, list):
        return False, False
    output, finishes = False, True
    for choice in choices:
        if not isinstance(choice, dict):
            finishes = False
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            part = delta
            if finishes and choice.get("finish_reason") is None:
                finishes = False
        else:
            part, finishes = choice, False
        if not output:
            output = _part_has_output(part)
    return output, finishes


def _part_has_output(part: dict[str, Any]) -> bool:
    for key in _TEXT_KEYS:
        text = part.get(key)
        if text and isinstance(text, str):
            return True
    calls, call = part.get("tool_calls"), part.get("function_call")
    return (isinstance(calls, list) and any(isinstance(c, dict) for c in calls)) or isinstance(call, dict)


def with_choice_energy(chunk: dict[str, Any], energy: dict[str, Any]) -> dict[str, Any]:
    """The finish ``chunk`` with ``energy`` in each choice's ``delta.provider_specific_fields``."""
    for choice in chunk["choices"]:
        delta = choice["delta"]
        fields = delta.get("provider_specific_fields")
        delta["provider_specific_fields"] = {**(fields if isinstance(fields, dict) else {}), "energy": energy}
    return chunk


def has_key(pattern: re.Pattern[bytes], data: bytes) -> bool:
    """Whether ``pattern`` matches at a key of the JSON in ``data``, not inside a string value,
    where the same characters have their quotes escaped (``\\"content\\": \\"``)."""
    match = pattern.search(data)
    while match is not None and match.start() > 0 and data[match.start() - 1] == 0x5C:  # a backslash
        match = pattern.search(data, match.start() + 1)
    return match is not None


def json_object(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None

"""Fuzzing the POST routes with bodies shaped like OpenAI's requests (hypothesis): the gateway itself
never answers 5xx, every 4xx is in OpenAI's error shape, every stream ends with ``[DONE]``, and no
meter window stays open afterwards."""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

INT = st.integers(-(2**63), 2**64 - 1)  # what orjson writes (the gateway reads bigger ones as floats)
# Any JSON value, small: where the schema has a field, this tries it with every type.
JSON = st.recursive(
    st.none() | st.booleans() | INT | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
# Arrays nested this deep (orjson reads up to 1024 levels and writes up to 254, the body object counted).
DEPTHS = st.one_of(st.integers(1, 1100), st.sampled_from([254, 255, 256, 1000, 1024, 1025]))
NESTED = DEPTHS.map(lambda d: orjson.Fragment(b"[" * d + b"1" + b"]" * d))


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The field's own type most of the time, any JSON value otherwise."""
    return st.one_of(strategy, strategy, strategy, JSON)


CONTENT = st.one_of(
    st.text(max_size=40),
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}), max_size=2),
)
MESSAGE = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "user", "assistant", "tool"]))},
    optional={"content": maybe(CONTENT), "name": maybe(st.text(max_size=8)), "tool_call_id": JSON},
)
COMMON = {
    "model": st.sampled_from(["llama", "remote", "no-such-model", 7, None]),
    "max_tokens": maybe(st.integers(0, 24)),
    "stream": maybe(st.booleans()),
}
OPTIONAL = {
    "stream_options": maybe(st.fixed_dictionaries({}, optional={"include_usage": maybe(st.booleans())})),
    "max_completion_tokens": maybe(st.integers(0, 24)),
    "n": maybe(st.integers(1, 2)),
    "temperature": maybe(st.floats(0, 2)),
    "top_p": maybe(st.floats(0, 1)),
    "stop": maybe(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=2))),
    "seed": maybe(INT),
    "user": maybe(st.text(max_size=10)),
    "metadata": st.one_of(JSON, NESTED, NESTED),
    "tools": maybe(st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": JSON}), max_size=2)),
    "response_format": maybe(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
    "logprobs": maybe(st.booleans()),
    "x_extra": JSON,
}
BODIES = {
    "chat/completions": st.fixed_dictionaries(
        {**COMMON, "messages": maybe(st.lists(MESSAGE, max_size=3))}, optional=OPTIONAL),
    "completions": st.fixed_dictionaries(
        {**COMMON, "prompt": maybe(st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3)))},
        optional=OPTIONAL),
    "embeddings": st.fixed_dictionaries(
        {"model": COMMON["model"], "input": maybe(st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10))))},
        optional={"encoding_format": maybe(st.sampled_from(["float", "base64"])), "x_extra": JSON}),
}


def check(response: httpx.Response, text: str) -> None:
    assert response.status_code < 500, text[:500]
    if response.status_code >= 400:
        err = orjson.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], text[:500]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert text.rstrip().endswith("data: [DONE]"), text[-200:]
    else:
        assert "energy" in orjson.loads(text)


@pytest.mark.parametrize("path", list(BODIES))
def test_fuzzed_requests_get_clean_answers_and_leave_no_window_open(stack, path):
    with httpx.Client(base_url=stack.url, timeout=30) as client:

        @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(BODIES[path])
        def one(body: dict[str, Any]) -> None:
            raw = orjson.dumps(body)
            with client.stream("POST", f"/v1/{path}", content=raw, headers={"content-type": "application/json"}) as r:
                check(r, r.read().decode())

        one()
    deadline = time.monotonic() + 5
    while stack.meter.state()["open_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.meter.state()["open_requests"] == 0

"""Upstreams that speak a little differently: CRLF line ends, comments, odd bodies, nonsense usage counts."""

from __future__ import annotations

import math

import httpx
import openai
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import settled_records
from wattgate.proxy.app import create_app
from wattgate.proxy.serving import ServerThread
from wattgate.proxy.settings import MeterSettings, Model, Settings

CHUNK = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "odd"}


COOKIES_SEEN: list[str | None] = []
LIMITED: list[int] = []


async def chat(request: Request) -> Response:
    body = await request.json()
    COOKIES_SEEN.append(request.headers.get("cookie"))
    if body.get("messages") == [{"role": "user", "content": "busy"}]:  # a remote API's rate limit, then success
        LIMITED.append(1)
        if len(LIMITED) % 2:
            err = {"error": {"message": "Rate limit reached", "type": "requests", "param": None, "code": "rate_limit"}}
            headers = {"retry-after-ms": "50", "x-ratelimit-remaining-requests": "0", "x-request-id": "req_up_1"}
            return Response(orjson.dumps(err), status_code=429, media_type="application/json", headers=headers)
        reply = {"id": "c", "object": "chat.completion", "created": 1, "model": "odd", "choices": [],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        return Response(orjson.dumps(reply), media_type="application/json")
    if body.get("messages") == [{"role": "user", "content": "cookie"}]:  # a load balancer's sticky cookie
        reply = {"id": "c", "object": "chat.completion", "created": 1, "model": "odd", "choices": []}
        return Response(orjson.dumps(reply), media_type="application/json", headers={"set-cookie": "lb=user-a; Path=/"})
    if not body.get("stream"):
        return Response(b"this is not json", media_type="application/json")
    if body.get("messages") == [{"role": "user", "content": "no-blank-line"}]:  # closes right after a "\n"

        async def unterminated():
            for text in ("Hello", " world"):
                c = {**CHUNK, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
                yield b"data: " + orjson.dumps(c) + (b"\n\n" if text == "Hello" else b"\n")

        return StreamingResponse(unterminated(), media_type="text/event-stream")
    if body.get("messages") == [{"role": "user", "content": "cut-short"}]:  # closes in the middle of an event

        async def cut():
            c = {**CHUNK, "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]}
            yield b"data: " + orjson.dumps(c) + b"\n\n"
            yield b"data: " + orjson.dumps(c)[:30]

        return StreamingResponse(cut(), media_type="text/event-stream")
    if body.get("messages") == [{"role": "user", "content": "endless"}]:  # never ends its first event

        async def endless():
            yield b"data: " + b"x" * (1 << 20)
            for _ in range(64):
                yield b"y" * (1 << 20)

        return StreamingResponse(endless(), media_type="text/event-stream")

    garbage = {"bad-json": b"data: {not json\n\n", "raw-bytes": b"\x00\xff\xfe garbage\n\n",
               "bad-utf8": b'data: {"choices": [{"delta": {"content": "\xff\xfe"}}]}\n\n', "not-object": b"data: [1]\n\n"}
    if (text := body["messages"][0]["content"]) in garbage:  # an upstream that sends junk mid-stream

        async def junk():
            c = {**CHUNK, "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]}
            yield b"data: " + orjson.dumps(c) + b"\n\n" + garbage[text] + b"data: " + orjson.dumps(c) + b"\n\n"
            yield b"data: " + orjson.dumps(c) + b"\n\n"

        return StreamingResponse(junk(), media_type="text/event-stream")

    async def events():
        yield b": keep-alive\r\n\r\n"
        for text in ("Hello", " world"):
            c = {**CHUNK, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            yield b"data: " + orjson.dumps(c) + b"\r\n\r\n"
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        # The usage chunk arrives split across two writes.
        raw = b"data: " + orjson.dumps({**CHUNK, "choices": [], "usage": usage}) + b"\r\n\r\n"
        yield raw[:20]
        yield raw[20:]
        yield b"data: [DONE]\r\n\r\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def gateway():
    odd = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with ServerThread(odd) as up:
        settings = Settings(meter=MeterSettings(source="none"), models={"odd": Model(upstream=f"{up.url}/v1")})
        with ServerThread(create_app(settings)) as gw:
            yield gw.url


def test_crlf_stream_with_comments_and_split_usage_chunk(gateway):
    with httpx.stream("POST", f"{gateway}/v1/chat/completions",
                      json={"model": "odd", "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
        text = r.read().decode()
    assert text.startswith(": keep-alive\n\n") and text.endswith("data: [DONE]\n\n")
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="odd", messages=[{"role": "user", "content": "x"}], stream=True))
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == "Hello world"
    energy = chunks[-1].model_extra["energy"]
    assert energy["completion_tokens"] == 2 and energy["prompt_tokens"] == 3 and energy["method"] == "estimate"


def test_a_last_event_without_its_blank_line_is_still_forwarded(gateway):
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "no-blank-line"}]
    chunks = list(client.chat.completions.create(model="odd", messages=msgs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert chunks[-1].model_extra["energy"]["status"] == "ok"


def test_an_event_cut_short_by_the_upstream_becomes_an_error_event(gateway):
    body = {"model": "odd", "messages": [{"role": "user", "content": "cut-short"}], "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body) as r:
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert '"Hello"' in events[0] and "in the middle of an event" in events[1]
    assert '"status":"error"' in events[2] and events[3] == "data: [DONE]" and len(events) == 4


@pytest.mark.parametrize("junk", ["bad-json", "raw-bytes", "bad-utf8", "not-object"])
def test_junk_mid_stream_becomes_an_error_event_and_nothing_unparseable_reaches_the_client(gateway, junk):
    body = {"model": "odd", "messages": [{"role": "user", "content": junk}], "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body) as r:
        events = [e for e in r.read().split(b"\n\n") if e]
    # The event before the junk, an error event in OpenAI's shape, the energy chunk, [DONE]: nothing after the junk.
    assert len(events) == 4 and b'"Hello"' in events[0] and events[3] == b"data: [DONE]"
    error = orjson.loads(events[1].removeprefix(b"data: "))["error"]
    assert error == {"message": "upstream sent an event that is not valid SSE JSON", "type": "upstream_error",
                     "param": None, "code": 502}
    energy = orjson.loads(events[2].removeprefix(b"data: "))["energy"]
    assert energy["status"] == "error" and energy["completion_tokens"] == 1
    # An OpenAI SDK reads it all without a parse error, up to the error it raises for the error event.
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="not valid SSE JSON"):
        list(client.chat.completions.create(model="odd", messages=body["messages"], stream=True))


def test_an_event_that_never_ends_is_cut_off_with_an_error_event(gateway):
    body = {"model": "odd", "messages": [{"role": "user", "content": "endless"}], "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=30) as r:
        text = r.read().decode()
    assert len(text) < 4096 and '"error"' in text and "over 16777216 bytes" in text
    assert text.endswith("data: [DONE]\n\n") and '"status":"error"' in text


def test_upstream_200_that_is_not_json_is_502(gateway):
    r = httpx.post(f"{gateway}/v1/chat/completions", json={"model": "odd", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"


def test_upstream_cookies_are_not_shared_between_callers():
    """One pooled client serves every caller: a cookie an upstream sets for one must not reach the next."""
    odd = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with ServerThread(odd) as up:
        # By name, not IP: cookie jars keep no cookies from IP-address hosts.
        upstream = f"http://localhost:{up.port}/v1"
        settings = Settings(meter=MeterSettings(source="none"), models={"odd": Model(upstream=upstream)})
        with ServerThread(create_app(settings)) as gw:
            msg = {"model": "odd", "messages": [{"role": "user", "content": "cookie"}]}
            for _ in range(2):
                assert httpx.post(f"{gw.url}/v1/chat/completions", json=msg).status_code == 200
    assert COOKIES_SEEN[-2:] == [None, None]


def test_rate_limit_headers_reach_the_client_so_its_retries_follow_them(gateway):
    msg = {"model": "odd", "messages": [{"role": "user", "content": "busy"}]}
    r = httpx.post(f"{gateway}/v1/chat/completions", json=msg)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit"
    assert r.headers["retry-after-ms"] == "50" and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-upstream-request-id"] == "req_up_1" and r.headers["x-request-id"] != "req_up_1"
    LIMITED.clear()  # the SDK's first try is limited, its retry (after the 50 ms asked for) served
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=1)
    resp = client.chat.completions.create(model="odd", messages=msg["messages"])
    assert len(LIMITED) == 2 and resp.model_extra["energy"]["completion_tokens"] == 1


BAD_USAGE = {  # what a buggy or hostile upstream may put in "usage"
    "strings": {"prompt_tokens": "ten", "completion_tokens": "many"},
    "list": ["x"],
    "negative": {"prompt_tokens": -5, "completion_tokens": -7},
    "huge": {"prompt_tokens": 2**62, "completion_tokens": 1e308},
    "bool": {"prompt_tokens": True, "completion_tokens": False},
    "null": None,
}


async def bad_usage(request: Request) -> Response:
    body = await request.json()
    kind = body["messages"][0]["content"]
    usage = BAD_USAGE.get(kind, {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    if not body.get("stream"):
        reply = {"id": "c", "object": "chat.completion", "created": 1, "model": "odd", "usage": usage,
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
        return Response(orjson.dumps(reply), media_type="application/json")

    async def events():
        c = {**CHUNK, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
        yield b"data: " + orjson.dumps(c) + b"\n\n"
        yield b"data: " + orjson.dumps({**CHUNK, "choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.mark.parametrize("stream", [False, True])
def test_nonsense_usage_from_the_upstream_is_served_and_does_not_poison_the_meter(stream):
    """Usage is the upstream's word; a wrong one must neither fail the request nor the meter's later passes."""
    app = Starlette(routes=[Route("/v1/chat/completions", bad_usage, methods=["POST"])])
    with ServerThread(app) as up:
        settings = Settings(meter=MeterSettings(source="simulated", settle_lag_ms=200),
                            models={"odd": Model(upstream=f"{up.url}/v1", gpus=[0])})
        with ServerThread(create_app(settings)) as gw:
            client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
            ids = []
            for kind in [*BAD_USAGE, "fine"]:
                msgs = [{"role": "user", "content": kind}]
                if stream:
                    chunks = list(client.chat.completions.create(model="odd", messages=msgs, stream=True))
                    ids.append(chunks[-1].model_extra["energy"]["request_id"])
                else:
                    reply = client.chat.completions.with_raw_response.create(model="odd", messages=msgs)
                    assert reply.http_response.status_code == 200
                    ids.append(reply.headers["x-request-id"])
            records = settled_records(gw.url, ids)
            meter = httpx.get(f"{gw.url}/readyz").json()["meter"]
    assert len(records) == len(ids), f"unsettled: {set(ids) - set(records)}"
    assert all(r["method"] == "simulated" and math.isfinite(r["joules"]) and r["joules"] >= 0 for r in records.values())
    assert all(isinstance(r["completion_tokens"], int) and r["completion_tokens"] >= 0 for r in records.values())
    assert "internal" not in meter["errors"] and meter["ok"]

"""Token timing whatever the upstream's stream looks like: OpenAI-compatible servers (vLLM, SGLang,
TGI, llama.cpp, Ollama) space, order and frame their SSE chunks differently (issue 12)."""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import SERVED, settled_records
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.app import create_app
from wattgate.proxy.metering import build_meter
from wattgate.proxy.serving import ServerThread
from wattgate.proxy.settings import MeterSettings, Model, Settings
from wattgate.proxy.simulated_upstream import SimulatedUpstream

WORDS = ["Hello", " energy", " world"]
HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {**HEAD, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def _chat(role_in_every_delta: bool = False, **final_extra: Any) -> list[dict[str, Any]]:
    """A role chunk, one chunk per word, a finish chunk (as vLLM, SGLang, TGI and Ollama send them)."""
    role = {"role": "assistant"} if role_in_every_delta else {}
    return [_chunk({"role": "assistant", "content": ""}),
            *(_chunk({**role, "content": w}) for w in WORDS),
            _chunk({**role, "content": ""}, "stop", **final_extra)]


def _sse(events: list[dict[str, Any]], dumps: Callable[[Any], str], prefix: str = "data: ", end: str = "\n\n") -> bytes:
    return "".join(prefix + dumps(e) + end for e in events).encode() + f"{prefix}[DONE]{end}".encode()


def _compact(o: Any) -> str:
    return orjson.dumps(o).decode()


def _llama_cpp() -> bytes:
    """llama.cpp's server: keys sorted, the last chunk with an empty delta, usage and timings."""
    events = [_chunk({"content": w}) for w in WORDS]
    events.append(_chunk({}, "stop", usage={"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
                         timings={"predicted_n": 3, "predicted_ms": 30.0}))
    return _sse(events, lambda o: json.dumps(o, sort_keys=True, separators=(",", ":")))


def _multiline() -> bytes:
    """Pretty-printed JSON over several ``data:`` lines of one event (valid SSE, joined with newlines)."""
    out = ""
    for e in _chat():
        out += "".join(f"data: {line}\n" for line in json.dumps(e, indent=1).splitlines()) + "\n"
    return out.encode() + b"data: [DONE]\n\n"


def _tool_calls() -> bytes:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "grid", "arguments": ""}}
    args = ['{"zone"', ': "FRA"', "}"]
    events = [_chunk({"role": "assistant", "content": None, "tool_calls": [call]}),
              *(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}) for a in args),
              _chunk({}, "tool_calls")]
    return _sse(events, _compact)


def _reasoning() -> bytes:
    events = [_chunk({"role": "assistant", "content": ""}), _chunk({"reasoning_content": "Think"}),
              _chunk({"reasoning_content": " more"}), _chunk({"content": "Answer"}), _chunk({}, "stop")]
    return _sse(events, _compact)


def _completions() -> bytes:
    events = [{"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "text": w, "logprobs": None, "finish_reason": None}]} for w in WORDS]
    events.append({**events[-1], "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]})
    return _sse(events, lambda o: json.dumps(o))


# name -> (the upstream's raw stream, token events the gateway must see)
SHAPES: dict[str, tuple[bytes, int]] = {
    "vllm": (_sse(_chat(), _compact), 3),
    "spaced (Python json.dumps)": (_sse(_chat(), json.dumps), 3),
    "keys reordered": (_sse([dict(reversed(list(e.items()))) for e in _chat()], json.dumps), 3),
    "crlf, data: without a space": (_sse(_chat(), _compact, prefix="data:", end="\r\n\r\n"), 3),
    "multi-line data": (_multiline(), 3),
    "tgi (role in every delta, usage null)": (_sse(_chat(role_in_every_delta=True, usage=None), _compact), 3),
    "ollama (system_fingerprint)": (_sse([{**e, "system_fingerprint": "fp_ollama"} for e in _chat(True)], _compact), 3),
    "llama.cpp (sorted keys, usage and timings)": (_llama_cpp(), 3),
    "tool-call deltas": (_tool_calls(), 4),
    "reasoning deltas": (_reasoning(), 3),
    "completions text": (_completions(), 3),
}


async def _stream(request: Request) -> Response:
    raw, _ = SHAPES[(await request.json())["model"]]

    async def chunks():
        for i in range(0, len(raw), 97):  # events split across writes, as TCP may deliver them
            yield raw[i : i + 97]

    return StreamingResponse(chunks(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def gateway():
    app = Starlette(routes=[Route(f"/v1/{p}", _stream, methods=["POST"]) for p in ("chat/completions", "completions")])
    with ServerThread(app) as up:
        models = {name: Model(upstream=f"{up.url}/v1") for name in SHAPES}
        settings = Settings(meter=MeterSettings(source="none"), models=models)
        with ServerThread(create_app(settings)) as gw:
            yield gw.url


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_token_is_timed_whatever_the_chunk_shape(gateway, shape):
    raw, tokens = SHAPES[shape]
    path, body = ("completions", {"prompt": "hi"}) if "completions" in shape else ("chat/completions", {
        "messages": [{"role": "user", "content": "hi"}]})
    with httpx.stream("POST", f"{gateway}/v1/{path}", json={"model": shape, "stream": True, **body}) as r:
        text = r.read().decode()
    events = [e for e in text.split("\n\n") if e]
    energy = orjson.loads(events[-2].removeprefix("data: "))["energy"]
    # No usage chunk from most of these upstreams: the count is the token events the relay saw.
    assert energy["completion_tokens"] == tokens
    # Each upstream event reaches the client as it was sent (line ends made LF, [DONE] the gateway's own),
    # but for a chat stream's finish chunk: the same JSON, with the figure on its choices' deltas.
    sent = [e for e in raw.decode().replace("\r\n", "\n").split("\n\n") if e and "[DONE]" not in e]
    finishes = [e for e in events if '"finish_reason":"' in e and '"delta"' in e]
    if "completions" in shape:
        assert all(e in text for e in sent if '"usage"' not in e) and not finishes
        return
    assert len(finishes) == 1 and finishes[0] == events[-3]  # just before the energy chunk
    finish = orjson.loads(finishes[0].removeprefix("data: "))
    assert all(c["delta"].pop("provider_specific_fields") == {"energy": energy} for c in finish["choices"])
    assert all(e in text or _event_json(e) == finish for e in sent if '"usage"' not in e)


def _event_json(event: str) -> Any:
    return json.loads("\n".join(line.removeprefix("data:").strip() for line in event.split("\n")))


def test_the_openai_sdk_reads_the_spaced_stream_and_its_energy(gateway):
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="spaced (Python json.dumps)", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(WORDS)
    assert chunks[-1].model_extra["energy"]["completion_tokens"] == 3


@pytest.mark.parametrize("spaced_json", [False, True])
def test_streamed_and_plain_requests_doing_the_same_work_settle_alike_through_the_gateway(spaced_json):
    """Four streams and four plain requests of 48 tokens, sent together. Spaced JSON once cost the
    streams their token timing and half their energy. Quiet, the two kinds come within 1 % of each
    other here (the meter's own test, tests/test_inline.py, holds them to 1 %); with the test suite
    loading the machine they have been 22 % apart once (issue 12's notes), so the bound is loose."""
    gpu = SimulatedGpu()
    upstream = SimulatedUpstream(gpu, served_name=SERVED, spaced_json=spaced_json)
    with ServerThread(upstream) as up:
        settings = Settings(meter=MeterSettings(source="simulated", settle_lag_ms=500, foreign_poll_ms=0),
                            models={"llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])})
        meter, drive = build_meter(settings, simulated_gpus={0: gpu})
        with ServerThread(create_app(settings, meter=meter, drive=drive)) as gw:
            async def send(stream: bool) -> str:
                async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
                    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 48}
                    if not stream:
                        return (await c.post("/v1/chat/completions", json=body)).headers["x-request-id"]
                    async with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                        await r.aread()
                        return r.headers["x-request-id"]

            async def wave() -> list[str]:
                return list(await asyncio.gather(*(send(i % 2 == 0) for i in range(8))))

            ids = asyncio.run(wave())
            records = settled_records(gw.url, ids)
    assert len(records) == 8
    streams = statistics.mean(records[i]["joules"] for i in ids[0::2])
    plain = statistics.mean(records[i]["joules"] for i in ids[1::2])
    assert abs(streams / plain - 1) < 0.3
    assert all(records[i]["completion_tokens"] == 48 for i in ids)

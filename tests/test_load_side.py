"""The bench's load side (tests/load_side.py) speaks what the gateway and the openai SDK expect, and its
client counts what it was sent: otherwise bench.workers' tokens per second would measure nothing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvloop

from tests.conftest import wait_until
from tests.load_side import SERVED, serve_upstream, split, stream_requests
from wattgate.proxy.app import create_app
from wattgate.proxy.serving import ServerThread, free_port
from wattgate.proxy.settings import MeterSettings, Model, Settings


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    loop = uvloop.new_event_loop()
    task: asyncio.Task[None] = loop.create_task(serve_upstream(port, itl_s=0.001))

    def run() -> None:
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=run, name="load-side-upstream", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(f"{url}/v1/models"), what="the load side's upstream")
    yield url
    loop.call_soon_threadsafe(task.cancel)
    thread.join(timeout=5)
    loop.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def gateway(upstream: str) -> Iterator[str]:
    settings = Settings(meter=MeterSettings(source="simulated"),
                        models={"m": Model(served_name=SERVED, upstream=f"{upstream}/v1", gpus=[0])})
    with ServerThread(create_app(settings)) as gw:
        yield gw.url


def test_the_openai_sdk_streams_through_the_gateway_from_the_load_side(gateway: str) -> None:
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Energy per token matters. " * 3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].model_extra is not None and chunks[-1].model_extra["energy"]["joules"] > 0


def test_the_client_counts_every_event_of_every_answer_on_keep_alive_connections(gateway: str) -> None:
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json={
        "model": "m", "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "Tell me."}],
    }) as r:
        per_answer = sum(line.startswith("data: {") for line in r.iter_lines())
    assert per_answer >= 17  # the role chunk and one per token, the energy riding on the last
    port = int(gateway.rsplit(":", 1)[1])
    # 10 answers over 3 connections: 4, 3 and 3 one after another on each.
    got = uvloop.run(stream_requests("127.0.0.1", port, "/v1/chat/completions", ["m"], 3, 10, 16))
    assert got.events == 10 * per_answer
    assert len(got.seconds) == len(got.end_gaps) == 10  # each answer timed
    assert all(0 < gap <= took for gap, took in zip(got.end_gaps, got.seconds, strict=True))


def test_the_client_fails_loudly_on_an_error_answer(gateway: str) -> None:
    port = int(gateway.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match="gateway answered b'HTTP/1.1 404"):
        uvloop.run(stream_requests("127.0.0.1", port, "/v1/chat/completions", ["no-such-model"], 1, 1, 16))


def test_the_load_is_split_into_whole_shares_that_add_up() -> None:
    assert split(512, 3) == [170, 171, 171]
    assert split(2, 4) == [0, 1, 0, 1]
    assert all(sum(split(total, parts)) == total for total in range(50) for parts in range(1, 9))

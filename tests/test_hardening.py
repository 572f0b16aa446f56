"""Failure paths leave nothing behind (issue 13): every request that opened a meter window closes it
and gets one ledger row; every failure is a clean answer in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import SERVED, scenario, wait_until
from wattgate.meter import Meter
from wattgate.meter.sources.simulated import SimulatedGpu, SimulatedSource
from wattgate.proxy.app import create_app
from wattgate.proxy.serving import ServerThread
from wattgate.proxy.settings import GatewaySettings, LedgerSettings, MeterSettings, Model, Settings, Timeouts
from wattgate.proxy.simulated_upstream import SimulatedUpstream

MSG = [{"role": "user", "content": "hi"}]
ROUTES = {
    "chat/completions": {"messages": MSG, "max_tokens": 1},
    "completions": {"prompt": "hi", "max_tokens": 1},
    "embeddings": {"input": "hi"},
}


class SocketUpstream:
    """An upstream on a bare socket, for behaviour no HTTP server library would show: each connection
    accepted is served by ``_serve`` in a thread of its own."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


class DyingUpstream(SocketUpstream):
    """Accepts a connection, reads the request, and closes it without a word."""

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)


class ExpiringUpstream(SocketUpstream):
    """Keeps each connection open after answering, but drops a request that comes on one left idle for
    ``expire_s`` without a word, as a server whose keep-alive ran out closes the socket before reading it
    (vLLM's uvicorn after 5 s)."""

    ANSWER = orjson.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": SERVED,
                           "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                           "choices": [{"index": 0, "finish_reason": "length",
                                        "message": {"role": "assistant", "content": "hi"}}]})

    def __init__(self, expire_s: float) -> None:
        self.expire_s = expire_s
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        answered_at = None
        with conn, conn.makefile("rb") as requests:
            while head := b"".join(iter(requests.readline, b"\r\n")):
                length = int(next((v for k, v in (h.split(b":", 1) for h in head.split(b"\r\n")[1:] if b":" in h)
                                   if k.strip().lower() == b"content-length"), b"0"))
                requests.read(length)
                if answered_at is not None and time.monotonic() - answered_at >= self.expire_s:
                    return  # expired: closed unanswered
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(self.ANSWER), self.ANSWER))
                answered_at = time.monotonic()


def test_an_idle_upstream_connection_is_let_go_before_the_upstreams_keep_alive_ends_it():
    """A pooled connection kept idle longer than the upstream keeps it alive is closed by the upstream as
    the next request goes out on it: that request fails unanswered (aiohttp's default keeps connections
    15 s, vLLM 5 s). ``timeouts.keepalive_s`` lets it go first, so the next request gets a new one."""
    upstream = ExpiringUpstream(expire_s=0.4)
    settings = Settings(meter=MeterSettings(source="simulated"), ledger=LedgerSettings(enabled=False),
                        gateway=GatewaySettings(timeouts=Timeouts(keepalive_s=0.2)),
                        models={"llama": Model(served_name=SERVED, upstream=upstream.url, gpus=[0])})
    body = {"model": "llama", "messages": MSG, "max_tokens": 1}
    with ServerThread(create_app(settings)) as gw:
        for _ in range(2):
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=10)
            assert r.status_code == 200, r.text
            time.sleep(0.6)
    upstream.sock.close()


@dataclass
class Hardened:
    url: str
    gpu: SimulatedGpu
    meter: Meter
    ledger: Path

    def open_requests(self) -> int:
        return self.meter.state()["open_requests"]

    def rows(self) -> int:
        with sqlite3.connect(self.ledger) as db:
            return db.execute("select count(*) from requests").fetchone()[0]

    def settle(self, rows: int, timeout: float = 10.0) -> None:
        """Wait until the ledger has ``rows`` rows and no window is open."""
        wait_until(lambda: (self.rows(), self.open_requests()) == (rows, 0), timeout,
                   what=f"{rows} ledger rows and no window open")


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hardened]:
    gpu = SimulatedGpu()
    dying = DyingUpstream()
    ledger = tmp_path_factory.mktemp("ledger") / "ledger.db"
    with ServerThread(SimulatedUpstream(gpu, served_name=SERVED, scenario=scenario)) as up:
        settings = Settings(
            meter=MeterSettings(source="simulated", settle_lag_ms=200),
            gateway=GatewaySettings(timeouts=Timeouts(read_s=2.0, connect_s=1.0)),
            ledger=LedgerSettings(path=ledger),
            models={
                "llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0]),
                "dying": Model(served_name=SERVED, upstream=dying.url, gpus=[0]),
            },
        )
        meter = Meter(SimulatedSource({0: gpu}), [0], interval_s=0.02, settle_lag_s=0.2)
        with ServerThread(create_app(settings, meter=meter)) as gw:
            yield Hardened(gw.url, gpu, meter, ledger)
    dying.sock.close()


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@pytest.mark.parametrize("depth", [254, 300, 1000, 1100])
@pytest.mark.parametrize("path", list(ROUTES))
def test_deep_nesting_anywhere_in_the_body_is_a_400_that_opens_nothing(hardened, caplog, path, depth):
    caplog.set_level(logging.INFO)
    rows = hardened.rows()
    body = ROUTES[path]
    prompt_field = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input"}[path]
    places = {
        "metadata": f'"metadata": {nested(depth)}',
        "prompt": f'"{prompt_field}": {nested(depth)}',
        "unknown field": f'"x_vendor": {{"a": {nested(depth)}}}',
    }
    for where, field in places.items():
        kept = {"model": "llama", **{k: v for k, v in body.items() if k != prompt_field or where != "prompt"}}
        raw = orjson.dumps(kept)[:-1] + f", {field}}}".encode()
        if depth < 1020:  # what orjson reads: refused for its depth alone, not its syntax
            orjson.loads(raw)
        r = httpx.post(f"{hardened.url}/v1/{path}", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (where, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", where
    hardened.settle(rows)  # no record, no window: the request never got that far
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_that_dies_before_its_headers_is_a_502_with_one_record(hardened, stream):
    rows = hardened.rows()
    body = {"model": "dying", "messages": MSG, "stream": stream}
    r = httpx.post(f"{hardened.url}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    hardened.settle(rows + 1)
    record = httpx.get(f"{hardened.url}/v1/energy/{r.headers['x-request-id']}").json()
    assert record["status"] == "error"


def wait_for_no_running_sequence(gpu: SimulatedGpu, within_s: float) -> float:
    t0 = time.monotonic()
    while gpu.batch and time.monotonic() - t0 < within_s:
        time.sleep(0.01)
    assert gpu.batch == 0, "the upstream still runs the generation"
    return time.monotonic() - t0


@pytest.mark.parametrize("content", ["hi", "fault:very-slow"], ids=["decoding", "in prefill"])
def test_a_plain_request_whose_client_leaves_is_aborted_upstream_and_recorded_client_closed(hardened, content):
    """The README's promise for streams, kept for plain requests: 5 requests of 1,500 tokens whose
    client gives up after 0.5 s stop running upstream at once and are recorded client_closed."""
    rows = hardened.rows()
    ids = [f"left-{content[:5]}-{i}" for i in range(5)]

    def one(rid: str) -> None:
        body = {"model": "llama", "messages": [{"role": "user", "content": content}], "max_tokens": 1500}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{hardened.url}/v1/chat/completions", json=body, headers={"x-request-id": rid}, timeout=0.5)

    threads = [threading.Thread(target=one, args=(rid,)) for rid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wait_for_no_running_sequence(hardened.gpu, within_s=2.0) < 2.0
    hardened.settle(rows + 5)
    for rid in ids:
        record = httpx.get(f"{hardened.url}/v1/energy/{rid}").json()
        assert record["status"] == "client_closed" and record["settled"], record


def test_a_client_that_leaves_at_each_stage_leaves_no_window_open(hardened):
    """Before the upstream's headers (a stream in a long prefill), mid-stream, and during a plain
    request's prefill and decoding: each gets one settled record and no window stays open."""
    rows = hardened.rows()
    cases = [
        ({"messages": [{"role": "user", "content": "fault:very-slow"}], "stream": True}, 0),
        ({"messages": MSG, "stream": True, "max_tokens": 2000}, 3),
        ({"messages": [{"role": "user", "content": "fault:very-slow"}]}, None),
        ({"messages": MSG, "max_tokens": 2000}, None),
    ]
    for body, chunks in cases:
        body = {"model": "llama", **body}
        if chunks is None:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{hardened.url}/v1/chat/completions", json=body, timeout=0.3)
            continue
        with httpx.stream("POST", f"{hardened.url}/v1/chat/completions", json=body) as r:
            it = r.iter_bytes()
            for _ in range(chunks):
                next(it)
    wait_for_no_running_sequence(hardened.gpu, within_s=2.0)
    hardened.settle(rows + len(cases))


def test_every_record_is_held_until_it_settles_whatever_the_cap(tmp_path):
    """recent_records at its minimum (100) and 10x as many requests at once, half streamed: one
    ledger row each, nothing counted as dropped, each readable by its id."""
    gpu = SimulatedGpu()
    ledger = tmp_path / "ledger.db"
    with ServerThread(SimulatedUpstream(gpu, served_name=SERVED, default_max_tokens=4)) as up:
        settings = Settings(
            meter=MeterSettings(source="simulated", settle_lag_ms=200),
            # 1,000 connections opened at once on a loaded 2-core runner: give them time.
            gateway=GatewaySettings(recent_records=100, timeouts=Timeouts(connect_s=60.0, read_s=120.0)),
            ledger=LedgerSettings(path=ledger),
            models={"llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])},
        )
        meter = Meter(SimulatedSource({0: gpu}), [0], interval_s=0.02, settle_lag_s=0.2)
        with ServerThread(create_app(settings, meter=meter)) as gw:
            hub = Hardened(gw.url, gpu, meter, ledger)

            async def burst() -> list[str]:
                limits = httpx.Limits(max_connections=1000)
                async with httpx.AsyncClient(base_url=gw.url, timeout=120, limits=limits) as client:
                    async def one(i: int) -> str:
                        body = {"model": "llama", "messages": MSG, "stream": i % 2 == 0}
                        r = await client.post("/v1/chat/completions", json=body)
                        assert r.status_code == 200
                        return r.headers["x-request-id"]
                    return await asyncio.gather(*(one(i) for i in range(1000)))

            ids = asyncio.run(burst())
            hub.settle(1000, timeout=60)
            assert "wattgate_ledger_dropped_records_total 0.0" in httpx.get(f"{gw.url}/metrics").text
            for rid in ids[:: 50]:
                assert httpx.get(f"{gw.url}/v1/energy/{rid}").json()["settled"]


def test_a_client_that_leaves_while_sending_its_body_is_no_error(caplog):
    """The gateway reads each partial body, sees the client leave, and answers nobody (499: before any
    window is opened), with no traceback."""
    caplog.set_level(logging.INFO)
    settings = Settings(meter=MeterSettings(source="none"), ledger=LedgerSettings(enabled=False),
                        models={"llama": Model(served_name=SERVED, upstream="http://127.0.0.1:9/v1", gpus=[0])})
    app = create_app(settings)
    answered: list[int] = []

    async def observed(scope: Any, receive: Any, send: Any) -> None:  # what the app answers, as uvicorn sees it
        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                answered.append(message["status"])
            await send(message)

        await app(scope, receive, sending)

    with ServerThread(observed) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                             b"content-length: 1000\r\n\r\n{\"model\": \"llama\", ")
        wait_until(lambda: answered == [499] * 3, 5, what="three partial bodies read, their clients seen leaving")
        assert httpx.get(f"{gw.url}/healthz").status_code == 200
    assert "Traceback" not in caplog.text and "unexpected" not in caplog.text


def test_numbers_orjson_cannot_write_back_as_read_are_no_failure(hardened):
    """Integers past 64 bits (read as floats), huge and tiny floats, lone surrogates: each is either
    refused as invalid JSON or forwarded; none leaves a window open."""
    rows = hardened.rows()
    bodies = {
        b'"metadata": {"big": 123456789012345678901234567890, "neg": -9223372036854775809}': 200,
        b'"metadata": {"f": 1.7976931348623157e308, "tiny": 5e-324, "e": 1E+2}': 200,
        b'"metadata": {"inf": 1e400}': 400,
        b'"metadata": {"s": "\\ud800"}': 400,
    }
    for extra, status in bodies.items():
        raw = b'{"model": "llama", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], ' + extra + b"}"
        r = httpx.post(f"{hardened.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, (extra, r.text)
    hardened.settle(rows + 2)

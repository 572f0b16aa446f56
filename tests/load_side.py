"""A load side fast enough to find a many-core gateway's limit: an upstream and a client as bare asyncio protocols.

    python -m tests.load_side upstream --port 8001 [--itl-ms 1]   # what bench.workers starts

Written by hand, for `bench.workers` (tests/test_load_side.py checks it): that bench with aiohttp load
generators and `wattgate simulate-upstream` processes reached about 55k
tokens/s on 13 of the H200 host's 16 cores (2026-11-27), less than two
gateway workers relay, so the curve measured the load side. HTTP load tools
(wrk, oha) are neither on the GPU host nor installable from the package
registries it is sent with. Both ends here cost a few microseconds per chunk:

- ``Upstream``: answers ``POST .../chat/completions`` with a vLLM-shaped SSE
  stream (the same bytes as ``simulate-upstream``'s chunks, chunked transfer
  encoding, a usage chunk when ``stream_options.include_usage`` is set) and
  ``GET .../models``. One ticker per process writes the next token of every
  open stream each ``itl`` seconds, as vLLM emits a batch's tokens together
  after each decode step.
- ``stream_requests``: keep-alive connections, each sending its streamed chat
  requests one after another; counts the ``data: {`` events received, finds
  each response's end by chunked encoding's last chunk, and times each
  response: from its request written to its end, and the gap between its last
  two reads (behind a gateway, how long the end of a stream waited after its
  last token: the inline energy object is in the last chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import uvloop

SERVED = "meta-llama/Llama-3.1-8B-Instruct"
_WORDS = [b"Energy ", b"per ", b"token ", b"matters. "]
_END_CHUNK = b"\r\n0\r\n\r\n"  # the last chunk's CRLF, then the zero-length chunk: SSE payloads hold no CR
_EVENT = b"data: {"
_TAIL = len(_EVENT) - 1  # bytes kept between reads so that a marker split over two reads is found once
assert len(_END_CHUNK) == len(_EVENT)


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class _Stream:
    """One streamed answer, written a token per tick."""

    def __init__(self, transport: asyncio.Transport, rid: int, model: bytes, max_tokens: int, usage: bool) -> None:
        head = b'data: {"id":"chatcmpl-%032x","created":%d,"model":"%s","object":"chat.completion.chunk","choices":[' % (
            rid, int(time.time()), model)
        self.transport = transport
        self.max_tokens = max_tokens
        self.head = head
        self.n = 0
        self.usage = usage
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                        b"transfer-encoding: chunked\r\n\r\n" + _chunk(
                            head + b'{"index":0,"logprobs":null,"finish_reason":null,'
                            b'"delta":{"role":"assistant","content":""}}],"prompt_token_ids":null,"prompt_text":null}\n\n'))

    def tick(self) -> bool:
        """Write the next token; False once the answer is complete."""
        if self.transport.is_closing():
            return False
        self.n += 1
        last = self.n == self.max_tokens
        finish = b'"length"' if last else b"null"
        stop = b',"stop_reason":null' if last else b""
        out = _chunk(self.head + b'{"index":0,"logprobs":null,"finish_reason":%s,"delta":{"content":"%s"}%s,'
                     b'"token_ids":null}]}\n\n' % (finish, _WORDS[(self.n - 1) % len(_WORDS)], stop))
        if not last:
            self.transport.write(out)
            return True
        if self.usage:
            out += _chunk(self.head + b'],"usage":{"prompt_tokens":12,"total_tokens":%d,"completion_tokens":%d}}\n\n'
                          % (12 + self.n, self.n))
        self.transport.write(out + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        return False


class Upstream:
    """The upstream's state in one process: the open streams and the ticker that feeds them."""

    def __init__(self, itl_s: float) -> None:
        self.itl_s = itl_s
        self.streams: list[_Stream] = []
        self.ids = itertools.count()

    async def tick_forever(self) -> None:
        """A tick every ``itl_s`` on a fixed schedule; one that overruns it delays the next, with no burst
        to catch up (as a decode step that takes longer)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due = max(due + self.itl_s, loop.time())
            await asyncio.sleep(due - loop.time())
            self.streams = [s for s in self.streams if s.tick()]

    def protocol(self) -> _UpstreamConnection:
        return _UpstreamConnection(self)


class _UpstreamConnection(asyncio.Protocol):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].decode("latin-1").split("\r\n")
            length = next((int(h.split(":", 1)[1]) for h in head[1:] if h.lower().startswith("content-length:")), 0)
            if len(self.buf) < end + 4 + length:
                return  # the body is still coming
            body, self.buf = self.buf[end + 4:end + 4 + length], self.buf[end + 4 + length:]
            self._answer(head[0].split(" ")[:2], body)

    def _answer(self, method_path: list[str], body: bytes) -> None:
        assert self.transport is not None
        method, path = method_path
        if method == "GET" and path.endswith("/models"):
            payload = orjson.dumps({"object": "list", "data": [{"id": SERVED, "object": "model",
                                                                "max_model_len": 131072}]})
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(payload), payload))
        elif method == "POST" and path.endswith("/chat/completions"):
            req: dict[str, Any] = orjson.loads(body)
            usage = bool((req.get("stream_options") or {}).get("include_usage"))
            stream = _Stream(self.transport, next(self.upstream.ids), req.get("model", SERVED).encode(),
                             int(req.get("max_tokens") or 16), usage)
            self.upstream.streams.append(stream)
        else:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")


async def serve_upstream(port: int, itl_s: float) -> None:
    upstream = Upstream(itl_s)
    server = await asyncio.get_running_loop().create_server(upstream.protocol, "127.0.0.1", port, backlog=4096)
    async with server:
        await upstream.tick_forever()


@dataclass
class Streamed:
    """What ``stream_requests`` received: the data events, and per response its time from request to
    end and the gap between its last two reads (seconds)."""

    events: int = 0
    seconds: list[float] = field(default_factory=list)
    end_gaps: list[float] = field(default_factory=list)

    @classmethod
    def merged(cls, parts: Iterable[Streamed]) -> Streamed:
        out = cls()
        for part in parts:
            out.events += part.events
            out.seconds += part.seconds
            out.end_gaps += part.end_gaps
        return out


class _ClientConnection(asyncio.Protocol):
    """Sends ``requests`` one after another on one connection; counts the events received, times each
    response."""

    def __init__(self, requests: list[bytes], done: asyncio.Future[Streamed]) -> None:
        self.requests = requests
        self.done = done
        self.got = Streamed()
        self.tail = b""
        self.sent_at = self.read_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.transport.write(self.requests.pop())
        self.sent_at = self.read_at = time.monotonic()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        now = time.monotonic()
        seen = self.tail + data
        if seen.startswith(b"HTTP/1.1 ") and not seen.startswith(b"HTTP/1.1 200"):
            self._finish(RuntimeError(f"gateway answered {seen[:200]!r}"))
            return
        self.got.events += seen.count(_EVENT)
        self.tail = seen[-_TAIL:]
        if _END_CHUNK in seen:
            self.tail = b""
            self.got.seconds.append(now - self.sent_at)
            self.got.end_gaps.append(now - self.read_at)
            if self.requests:
                self._send()
                return
            self._finish(None)
        self.read_at = now

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or (RuntimeError("connection closed mid-answer") if self.requests or self.tail else None))

    def _finish(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc) if exc else self.done.set_result(self.got)
        if self.transport is not None:
            self.transport.close()


async def stream_requests(host: str, port: int, path: str, models: list[str], concurrency: int, n: int,
                          max_tokens: int) -> Streamed:
    """``n`` streamed chat requests over ``concurrency`` keep-alive connections: what they received."""
    loop = asyncio.get_running_loop()
    per_connection = [ids for i in range(concurrency) if (ids := list(range(i, n, concurrency)))]
    done = []
    for ids in per_connection:
        requests = []
        for i in ids:
            body = orjson.dumps({"model": models[i % len(models)], "max_tokens": max_tokens, "stream": True,
                                 "messages": [{"role": "user", "content": "Tell me about energy."}]})
            requests.append(b"POST %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n%s" % (path.encode(), host.encode(), port, len(body), body))
        future: asyncio.Future[Streamed] = loop.create_future()
        await loop.create_connection(functools.partial(_ClientConnection, requests, future), host, port)
        done.append(future)
    return Streamed.merged(await asyncio.gather(*done))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["upstream"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--itl-ms", type=float, default=1.0, help="time between two tokens of a stream")
    args = parser.parse_args()
    uvloop.run(serve_upstream(args.port, args.itl_ms / 1000))


if __name__ == "__main__":
    main()


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` nearly equal whole shares (connections and requests among load processes)."""
    return [total * (i + 1) // parts - total * i // parts for i in range(parts)]

"""What relaying a token stream costs at the least, next to the gateway, in one run.

    python -m bench.relay_floor [--concurrency 64] [--requests-per-stream 4]

Same workload and pinning as bench/overhead.py (gateway-like process on core 0,
simulated upstream and load generator on core 1), through four relays:

- ``tcp-pipe``: a uvloop protocol copying bytes between the two sockets, with no
  HTTP at all: the floor for any relay written in Python on this machine;
- ``asgi-aiohttp`` and ``asgi-httpx``: a bare ASGI app under uvicorn that
  forwards the upstream's body chunks as they come, read with each client;
- ``wattgate``: the gateway with its default registry settings.

Reports each one's CPU microseconds per relayed chunk (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from bench.overhead import MODEL, SERVED, _cpu_s, _level, _pinned, _wait
from wattgate.proxy.serving import free_port


def _tcp_pipe(port: int, up_port: int) -> None:
    import uvloop

    class Upstream(asyncio.Protocol):
        def __init__(self, down: asyncio.Transport) -> None:
            self.down = down

        def data_received(self, data: bytes) -> None:
            self.down.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self.down.close()

    class Downstream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.pending: list[bytes] = []
            self.up: Any = None
            asyncio.ensure_future(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            self.up, _ = await loop.create_connection(lambda: Upstream(self.transport), "127.0.0.1", up_port)
            for data in self.pending:
                self.up.write(data)

        def data_received(self, data: bytes) -> None:
            if self.up is None:
                self.pending.append(data)
            else:
                self.up.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.up is not None:
                self.up.close()

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Downstream, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(serve())


def _asgi_relay(client: str, port: int, up_port: int) -> None:
    import uvicorn

    url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
    state: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            state["client"] = _client(client)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] != "/v1/chat/completions":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = orjson.loads(body)
        request["model"] = SERVED
        payload, headers = orjson.dumps(request), {"content-type": "application/json"}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        if client == "aiohttp":
            async with state["client"].post(url, data=payload, headers=headers) as r:
                async for chunk in r.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        else:
            async with state["client"].stream("POST", url, content=payload, headers=headers) as r:
                async for chunk in r.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


RELAYS = ["tcp-pipe", "asgi-aiohttp", "asgi-httpx", "wattgate"]


def _client(kind: str) -> Any:
    if kind == "aiohttp":
        import aiohttp

        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))
    import httpx

    return httpx.AsyncClient(limits=httpx.Limits(max_connections=1000), timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--relays", nargs="+", default=RELAYS, choices=RELAYS, help="which relays to run")
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "PORT", "UPSTREAM_PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        kind, port, up_port = args.serve[0], int(args.serve[1]), int(args.serve[2])
        if kind == "tcp-pipe":
            _tcp_pipe(port, up_port)
        else:
            _asgi_relay(kind.removeprefix("asgi-"), port, up_port)
        return

    up_port = free_port()
    registry = Path(tempfile.mkdtemp()) / "registry.yaml"
    registry.write_text(
        f"models:\n  {MODEL}:\n    served_name: {SERVED}\n    upstream: http://127.0.0.1:{up_port}/v1\n    gpus: [0]\n"
        "meter: {source: simulated}\n"
    )
    os.sched_setaffinity(0, {1 % (os.cpu_count() or 1)})
    exe = [sys.executable, "-m"]
    upstream = subprocess.Popen(_pinned([1], [*exe, "wattgate.proxy.cli", "simulate-upstream", "--port", str(up_port)]))
    try:
        _wait(f"http://127.0.0.1:{up_port}/v1/models")
        n = args.concurrency * args.requests_per_stream
        print(f"c={args.concurrency}, {n} streams of 128 tokens per relay")
        for kind in args.relays:
            port = free_port()
            if kind == "wattgate":
                cmd = [*exe, "wattgate.proxy.cli", "serve", "--config", str(registry), "--port", str(port), "--log-level", "warning"]
                model, health = MODEL, "/healthz"
            else:
                cmd = [*exe, "bench.relay_floor", "--serve", kind, str(port), str(up_port)]
                model, health = SERVED, "/v1/models"
            relay = subprocess.Popen(_pinned([0], cmd))
            try:
                _wait(f"http://127.0.0.1:{port}{health}")
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                asyncio.run(_level(url, model, args.concurrency, args.concurrency))  # warm-up
                cpu0, main0 = _cpu_s(relay.pid), _cpu_s(relay.pid, relay.pid)
                r = asyncio.run(_level(url, model, args.concurrency, n))
                per_chunk = (_cpu_s(relay.pid) - cpu0) / r["chunks"] * 1e6
                main = (_cpu_s(relay.pid, relay.pid) - main0) / r["chunks"] * 1e6
                print(f"{kind:<14}{per_chunk:>7.1f} us CPU/chunk{r['tokens_per_s']:>8.0f} chunks/s"
                      f"  (event-loop thread {main:.1f}, other threads {per_chunk - main:.1f})")
            finally:
                relay.terminate()
                relay.wait(timeout=10)
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


if __name__ == "__main__":
    main()

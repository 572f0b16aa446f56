"""A worker's end of the hub's event socket (``proxy/hub_link.HubConnection``) against a stand-in hub on a
real Unix socket: replies reach the call waiting for them, a reply that does not come in time gives
way to ``TIMED_OUT`` (and, the hub counted stalled, so do later ones until it is heard from), and a line that is not the hub's drops the link, which is then made again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from wattgate.proxy.hub_connection import TIMED_OUT, HubConnection


class StandInHub:
    """Reads the worker's batches into a queue of events; the test writes its replies."""

    def __init__(self) -> None:
        self.connections = 0
        self.events: asyncio.Queue[list[Any]] = asyncio.Queue()
        self.writer: asyncio.StreamWriter | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writer = writer
        try:
            while line := await reader.readline():
                _, events = orjson.loads(line)
                for event in events:
                    await self.events.put(event)
        except ConnectionError:  # the worker dropped the link
            pass

    def reply(self, line: bytes) -> None:
        assert self.writer is not None
        self.writer.write(line)

    async def next_event(self, kind: str) -> list[Any]:
        while (event := await asyncio.wait_for(self.events.get(), 5))[0] != kind:
            pass
        return event


async def _connected(conn: HubConnection, hub: StandInHub, connections: int) -> None:
    async with asyncio.timeout(5):
        while not (conn.up and hub.connections == connections and hub.writer is not None):
            await asyncio.sleep(0.01)


@asynccontextmanager
async def _linked(folder: Path) -> AsyncIterator[tuple[HubConnection, StandInHub]]:
    """A worker's connection, connected to a stand-in hub on a socket in ``folder``."""
    hub = StandInHub()
    server = await asyncio.start_unix_server(hub.serve, str(folder / "events.sock"))
    conn = HubConnection(folder / "events.sock", 0)
    async with server, conn.running():
        await _connected(conn, hub, 1)
        yield conn, hub


def test_replies_reach_their_calls_and_a_late_one_gives_way(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _linked(tmp_path) as (conn, hub):
            answered = conn.request("energy", 1, ["end", 1], timeout=5)
            late = conn.request("energy", 2, ["end", 2], timeout=0.05)
            assert (await hub.next_event("end"))[1] == 1
            hub.reply(orjson.dumps(["energy", 1, {"joules": 1.5}]) + b"\n")
            assert await answered == ["energy", 1, {"joules": 1.5}]
            assert await late is TIMED_OUT
            hub.reply(orjson.dumps(["energy", 2, {"joules": 2.0}]) + b"\n")  # too late: nobody waits for it
            hub.reply(orjson.dumps(["methods", {"llama": "nvml"}]) + b"\n")
            async with asyncio.timeout(5):
                while conn.methods.get("llama") is None:
                    await asyncio.sleep(0.01)
            assert conn.up and hub.connections == 1

    asyncio.run(scenario())


def test_a_line_that_is_not_the_hubs_drops_the_link_and_it_is_made_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _linked(tmp_path) as (conn, hub):
            waiting = conn.request("energy", 1, ["end", 1], timeout=5)
            hub.reply(b"not json\n")
            assert await waiting is None  # the link dropped: no answer will come on it
            await _connected(conn, hub, 2)
            assert conn.generation == 2

    asyncio.run(scenario())


def test_after_one_late_reply_no_call_waits_until_the_hub_is_heard_from(tmp_path: Path) -> None:
    """A stalled hub costs one bounded wait, not one per call: later requests give way at once (their
    events still go to the hub), until any reply shows it is back."""

    async def scenario() -> None:
        async with _linked(tmp_path) as (conn, hub):
            assert await conn.request("energy", 1, ["end", 1], timeout=0.05) is TIMED_OUT
            assert conn.stalled
            at_once = conn.request("energy", 2, ["end", 2], timeout=5)
            assert at_once.done() and at_once.result() is TIMED_OUT
            assert [(await hub.next_event("end"))[1] for _ in range(2)] == [1, 2]  # the hub still gets both
            hub.reply(orjson.dumps(["energy", 1, {"joules": 1.0}]) + b"\n")  # late, but the hub is back
            async with asyncio.timeout(5):
                while conn.stalled:
                    await asyncio.sleep(0.01)
            answered = conn.request("energy", 3, ["end", 3], timeout=5)
            assert (await hub.next_event("end"))[1] == 3
            hub.reply(orjson.dumps(["energy", 3, {"joules": 3.0}]) + b"\n")
            assert await answered == ["energy", 3, {"joules": 3.0}]

    asyncio.run(scenario())

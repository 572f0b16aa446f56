"""A worker's end of the hub's event socket (``proxy/hub_connection.HubConnection``) against a stand-in hub
on a real Unix socket: replies reach the call waiting for them, a reply that does not come in time gives
way to ``Unanswered.LATE`` (and, the hub counted stalled, so do later ones until it is heard from), and a
line that is not the hub's drops the link, which is then made again. And the protocol's messages
(``proxy/hub_protocol``) round-trip through the wire's JSON."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from wattgate.meter import Fault, Measurement, Method, Status
from wattgate.proxy import hub_protocol as hp
from wattgate.proxy.hub_connection import HubConnection
from wattgate.proxy.hub_protocol import Unanswered


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


def _end(cid: int) -> hp.End:
    return hp.End(cid, Status.OK, 1.0, 0.5)


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
            answered = conn.request(_end(1), timeout=5)
            late = conn.request(_end(2), timeout=0.05)
            assert (await hub.next_event("end"))[1] == 1
            hub.reply(hp.reply_line(hp.Figure(1, {"joules": 1.5})))
            assert await answered == hp.Figure(1, {"joules": 1.5})
            assert await late is Unanswered.LATE
            hub.reply(hp.reply_line(hp.Figure(2, {"joules": 2.0})))  # too late: nobody waits for it
            hub.reply(hp.reply_line(hp.Methods({"llama": "nvml"})))
            async with asyncio.timeout(5):
                while conn.methods.get("llama") is None:
                    await asyncio.sleep(0.01)
            assert conn.up and hub.connections == 1

    asyncio.run(scenario())


def test_a_line_that_is_not_the_hubs_drops_the_link_and_it_is_made_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _linked(tmp_path) as (conn, hub):
            waiting = conn.request(_end(1), timeout=5)
            hub.reply(b"not json\n")
            assert await waiting is Unanswered.GONE  # the link dropped: no answer will come on it
            await _connected(conn, hub, 2)
            assert conn.generation == 2

    asyncio.run(scenario())


def test_after_one_late_reply_no_call_waits_until_the_hub_is_heard_from(tmp_path: Path) -> None:
    """A stalled hub costs one bounded wait, not one per call: later requests give way at once (their
    events still go to the hub), until any reply shows it is back."""

    async def scenario() -> None:
        async with _linked(tmp_path) as (conn, hub):
            assert await conn.request(_end(1), timeout=0.05) is Unanswered.LATE
            assert conn.stalled
            at_once = conn.request(_end(2), timeout=5)
            assert at_once.done() and at_once.result() is Unanswered.LATE
            assert [(await hub.next_event("end"))[1] for _ in range(2)] == [1, 2]  # the hub still gets both
            hub.reply(hp.reply_line(hp.Figure(1, {"joules": 1.0})))  # late, but the hub is back
            async with asyncio.timeout(5):
                while conn.stalled:
                    await asyncio.sleep(0.01)
            answered = conn.request(_end(3), timeout=5)
            assert (await hub.next_event("end"))[1] == 3
            hub.reply(hp.reply_line(hp.Figure(3, {"joules": 3.0})))
            assert await answered == hp.Figure(3, {"joules": 3.0})

    asyncio.run(scenario())


MEASUREMENT = Measurement("r1", {0: 1.5, 1: 2.0}, Method.ESTIMATE, True, 1.0, 2.0, 3, 4, Status.OK,
                          Fault.UNREACHABLE, 0.25)


@pytest.mark.parametrize("message", [
    hp.Hello(1, 4242), hp.Open(7, "r1", True, "llama", None, 12, 3.5), hp.Done(7, 5), hp.Use(7, 12, None),
    hp.End(7, Status.CLIENT_CLOSED, 4.0, 0.5), hp.Lag(0.002), hp.Lost(3),
    hp.Estimated("llama", "team-a", "r1", 1.0, hp.measurement_fields(MEASUREMENT)),
    hp.Methods({"llama": "nvml"}), hp.Opened(7, "r1-2", "team-a/r1-2", "nvml"), hp.Figure(7, None),
])
def test_each_message_round_trips_through_the_wire(message):
    decode = hp.decode_reply if isinstance(message, hp.Methods | hp.Opened | hp.Figure) else hp.decode_event
    assert decode(orjson.loads(orjson.dumps(hp.encode(message)))) == message


def test_a_worker_estimate_round_trips_and_bad_messages_are_refused():
    assert hp.measurement_from(orjson.loads(orjson.dumps(hp.measurement_fields(MEASUREMENT)))) == MEASUREMENT
    with pytest.raises(ValueError, match="unknown message 'nope'"):
        hp.decode_event(["nope", 1])
    with pytest.raises(TypeError):
        hp.decode_event(["end", 1])  # a field short
    with pytest.raises(ValueError):
        hp.decode_event(["opened", 1, "r", "k", "nvml"])  # a reply is not an event

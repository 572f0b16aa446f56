"""A worker's connection to the hub (:mod:`proxy.hub`): the line protocol over a Unix socket, events
batched at most :data:`FLUSH_S` late, replies awaited at most :data:`REPLY_TIMEOUT_S`, reconnection
with backoff, and the outbox of calls estimated while the hub was away. What goes over it:
:mod:`proxy.hub_link`."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import orjson

from wattgate.meter import Method
from wattgate.proxy import hub_protocol as hp
from wattgate.proxy.hub_protocol import MAX_LINE_BYTES, Unanswered

log = logging.getLogger("wattgate.worker")

FLUSH_S = 0.005  # token events wait at most this long, to go to the hub together (their times go with them)
# A reply the hub owes waits this long, then the worker goes on without it: a client-chosen id is used
# unchecked (the hub checks it when it catches up), an ended call's figure is estimated here.
REPLY_TIMEOUT_S = 0.5
RECONNECT_S = (0.05, 1.0)  # first and longest wait between attempts to reach the hub
MAX_BUFFER_BYTES = 64 * 1024 * 1024  # events the hub has not read: beyond this, the link is dropped
OUTBOX_SIZE = 10_000  # calls estimated while the hub was away, kept for it
_REPLY_TO: dict[type[Any], str] = {hp.Open: hp.Opened.KIND, hp.End: hp.Figure.KIND}  # what each request waits for


class _HubProtocol(asyncio.Protocol):
    """The hub's replies, one JSON line each, handed to :meth:`HubConnection.replied` as they are read.

    A protocol rather than a stream reader: a reply completes its call's future in the same turn of the
    event loop as it is read, where a reader task would take a turn more, and on a busy worker a turn
    is milliseconds that every stream's last chunk waits."""

    def __init__(self, conn: HubConnection) -> None:
        self.conn = conn
        self.buffer = b""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        try:
            if len(self.buffer) > MAX_LINE_BYTES:
                raise ValueError("a reply line over the limit")
            if lines:
                self.conn.stalled = False
            for line in lines:
                self.conn.replied(hp.decode_reply(orjson.loads(line)))
        except (ValueError, LookupError, TypeError):  # not what a hub sends: drop the link, reconnect
            log.warning("worker %d: bad reply from the hub; reconnecting", self.conn.index, exc_info=True)
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class HubConnection:
    """A worker's end of the hub's event socket: events batched out, replies in, reconnection, and an
    outbox for what was estimated while the hub was away."""

    def __init__(self, path: Path, index: int) -> None:
        self.path = path
        self.index = index
        self.generation = 0  # counts connections: a call opened on an earlier one is the hub's no more
        self._transport: asyncio.Transport | None = None
        self._batch: list[list[Any]] = []  # encoded events
        self._tokens: list[float] = []  # token events, flat: cid, n, t, cid, n, t, ...
        self._flush_at: asyncio.TimerHandle | None = None
        self._waiting: dict[tuple[str, int], asyncio.Future[hp.Reply | Unanswered]] = {}
        self._outbox: deque[hp.Estimated] = deque()
        self._lost = 0  # estimated calls the outbox could not keep
        self.methods: dict[str, Method] = {}  # the hub's latest word on how each model's calls are metered
        self.stalled = False  # a reply came too late, and the hub has sent nothing since: wait for none

    @property
    def up(self) -> bool:
        return self._transport is not None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Keep connected to the hub while the worker's app runs."""
        task = asyncio.create_task(self._keep_connected())
        try:
            yield
        finally:
            self._flush()
            transport, self._transport = self._transport, None  # closing: not a hub gone missing
            task.cancel()
            if transport is not None:
                transport.close()

    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        wait = RECONNECT_S[0]
        while True:
            try:
                transport, protocol = await loop.create_unix_connection(lambda: _HubProtocol(self), str(self.path))
            except OSError:
                await asyncio.sleep(wait)
                wait = min(wait * 2, RECONNECT_S[1])
                continue
            wait = RECONNECT_S[0]
            self._connected(transport)
            try:
                await protocol.closed
            finally:
                self._disconnected(transport)

    def _connected(self, transport: asyncio.Transport) -> None:
        self.generation += 1
        self._transport = transport
        self.stalled = False
        self._batch.append(hp.encode(hp.Hello(self.index, os.getpid())))
        if self._outbox or self._lost:
            log.info("worker %d: hub reached; sending %d calls estimated while it was away", self.index,
                     len(self._outbox))
        self._batch.extend(hp.encode(rec) for rec in self._outbox)
        self._outbox.clear()
        if self._lost:
            self._batch.append(hp.encode(hp.Lost(self._lost)))
            self._lost = 0
        self._flush()

    def _disconnected(self, transport: asyncio.Transport) -> None:
        transport.close()
        if self._transport is not None:  # None: the worker is closing
            self._transport = None
            log.warning("worker %d: hub unreachable; figures are estimates until it is back", self.index)
        self._batch.clear()
        self._tokens.clear()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result(Unanswered.GONE)
        self._waiting.clear()

    def replied(self, reply: hp.Reply) -> None:
        """One reply from the hub: to the call waiting for it, or the hub's word on metering methods."""
        if isinstance(reply, hp.Methods):
            self.methods.update({name: Method(m) for name, m in reply.methods.items()})
            return
        fut = self._waiting.pop((reply.KIND, reply.cid), None)
        if fut is not None and not fut.done():  # done: timed out, or its call went away
            fut.set_result(reply)

    def send(self, event: hp.Event) -> None:
        """Queue ``event`` for the next batch (sent within :data:`FLUSH_S`)."""
        if self._transport is None:
            return
        self._batch.append(hp.encode(event))
        self._flush_soon()

    def tokens(self, cid: int, n: float, t: float) -> None:
        """Queue a token event: the one event sent per streamed chunk, kept flat to cost the hub less."""
        if self._transport is None:
            return
        self._tokens += (cid, n, t)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(FLUSH_S, self._flush)

    def request(self, event: hp.Open | hp.End, timeout: float | None = None
                ) -> asyncio.Future[hp.Reply | Unanswered]:
        """Send ``event`` now, with what is queued; the future gets the hub's reply to it, or
        :attr:`~Unanswered.GONE` if none will come, :attr:`~Unanswered.LATE` if none came within ``timeout``
        seconds (at once while the hub is stalled)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[hp.Reply | Unanswered] = loop.create_future()
        if self._transport is None:
            fut.set_result(Unanswered.GONE)
            return fut
        self._batch.append(hp.encode(event))
        self._flush()
        if timeout is not None and self.stalled:
            fut.set_result(Unanswered.LATE)
            return fut
        self._waiting[(_REPLY_TO[type(event)], event.cid)] = fut
        if timeout is not None:  # a timer on the future itself: its waiter wakes a turn sooner than under wait_for
            timer = loop.call_later(timeout, self._time_out, fut)
            fut.add_done_callback(lambda _: timer.cancel())
        return fut

    def _time_out(self, fut: asyncio.Future[hp.Reply | Unanswered]) -> None:
        if not fut.done():
            self.timed_out()
            fut.set_result(Unanswered.LATE)

    def timed_out(self) -> None:
        """A reply came too late: the hub counts as stalled until it sends something."""
        if not self.stalled:
            self.stalled = True
            log.warning("worker %d: the hub did not answer within %g s; calls are estimated here until it does",
                        self.index, REPLY_TIMEOUT_S)

    def _flush(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        transport = self._transport
        if not (self._batch or self._tokens) or transport is None:
            return
        data = orjson.dumps([self._tokens, self._batch]) + b"\n"
        self._batch, self._tokens = [], []
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_BUFFER_BYTES:  # a stalled hub must not fill this worker's memory
            log.warning("worker %d: hub is %d bytes behind; dropping the link", self.index,
                        transport.get_write_buffer_size())
            transport.abort()

    def keep(self, event: hp.Estimated) -> None:
        """Keep the record of a call estimated here, for the hub: sent now, or once it is back."""
        if self._transport is not None:
            self.send(event)
        elif len(self._outbox) < OUTBOX_SIZE:
            self._outbox.append(event)
        else:
            self._lost += 1

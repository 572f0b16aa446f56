"""The hub of a multi-worker gateway: the one process that keeps the books.

``wattgate serve --workers N`` (:mod:`proxy.workers`) runs N relay workers and this
hub. Every call on a GPU must reach one meter for a fair split, so the workers
send their calls' windows here and the hub answers ``/metrics``, ``/readyz`` and
``/v1/energy/{id}`` for all of them.

How they talk, one batch of events per line over a Unix socket, is
:mod:`proxy.hub_protocol`; each kind of event has its handler here
(:attr:`HubServer._handlers`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from wattgate.meter import Fault, Measurement, Status
from wattgate.proxy import hub_protocol as hp
from wattgate.proxy.books import Books, LocalCall

log = logging.getLogger("wattgate.hub")


def events_path(runtime_dir: str | os.PathLike[str]) -> Path:
    return Path(runtime_dir, "events.sock")


def api_path(runtime_dir: str | os.PathLike[str]) -> Path:
    return Path(runtime_dir, "api.sock")


@dataclass(slots=True)
class Worker:
    """One connected worker, as the hub sees it."""

    index: int | None = None
    pid: int | None = None
    calls: dict[int, LocalCall] = field(default_factory=dict)  # open calls by cid
    served: int = 0  # calls opened since it connected

    def state(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid, "open_calls": len(self.calls), "calls": self.served}


class HubServer:
    """Applies the workers' events to the books (:mod:`proxy.hub_protocol`), one handler per kind."""

    def __init__(self, books: Books) -> None:
        self.books = books
        self.workers: dict[asyncio.StreamWriter, Worker] = {}
        self._connections: set[asyncio.Task[None]] = set()
        self._handlers: dict[type[Any], Callable[[Worker, Any, list[bytes]], Awaitable[None] | None]] = {
            hp.Open: self._open, hp.End: self._end, hp.Done: self._done, hp.Use: self._use, hp.Lag: self._lag,
            hp.Estimated: self._estimated, hp.Lost: self._lost, hp.Hello: self._hello,
        }

    @asynccontextmanager
    async def serving(self, path: Path) -> AsyncIterator[None]:
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._connection, path, limit=hp.MAX_LINE_BYTES)
        try:
            yield
        finally:
            server.close()
            for writer in list(self.workers):
                writer.close()
                self._closed(self.workers.pop(writer))
            # Let each connection's handler see its end, rather than be cancelled with the loop.
            if self._connections:
                await asyncio.wait(self._connections, timeout=5)

    def state(self) -> list[dict[str, Any]]:
        return sorted((w.state() for w in self.workers.values()), key=lambda s: (s["index"] is None, s["index"]))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker = self.workers[writer] = Worker()
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        try:
            while line := await reader.readline():
                replies: list[bytes] = []
                tokens, events = orjson.loads(line)
                calls = worker.calls
                for cid, n, t in hp.token_triples(tokens):
                    if (call := calls.get(cid)) is not None:  # None: ended as the worker's connection broke
                        call.tokens(n, t)
                for event in events:
                    try:
                        message = hp.decode_event(event)
                        if (pending := self._handlers[type(message)](worker, message, replies)) is not None:
                            await pending
                    except Exception:  # one bad event must not end the worker's connection
                        log.exception("hub: bad event %r from worker %s", event[:1], worker.index)
                if replies:
                    writer.write(b"".join(replies))
        except (ConnectionError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            log.warning("hub: connection of worker %s broke (%s)", worker.index, type(exc).__name__)
        finally:
            if self.workers.pop(writer, None) is not None:
                self._closed(worker)
            writer.close()

    def _closed(self, worker: Worker) -> None:
        """A worker's connection closed: its calls still open end now (its process is gone or going)."""
        if worker.calls:
            log.warning("hub: worker %s (pid %s) left with %d calls open; they end as client_closed",
                        worker.index, worker.pid, len(worker.calls))
        for call in worker.calls.values():
            call.end(Status.CLIENT_CLOSED)
        worker.calls.clear()

    def _hello(self, worker: Worker, hello: hp.Hello, replies: list[bytes]) -> None:
        worker.index, worker.pid = hello.worker_index, hello.pid
        methods = {name: self.books.method_for(model) for name, model in self.books.settings.models.items()}
        replies.append(hp.reply_line(hp.Methods(methods)))

    async def _open(self, worker: Worker, o: hp.Open, replies: list[bytes]) -> None:
        call = await self.books.open(o.request_id, o.client_chose, o.model_name, o.team, o.prompt_tokens, o.t)
        worker.calls[o.cid] = call
        worker.served += 1
        replies.append(hp.reply_line(hp.Opened(o.cid, call.request_id, call.key, call.method)))

    async def _end(self, worker: Worker, e: hp.End, replies: list[bytes]) -> None:
        call = worker.calls.pop(e.cid, None)
        energy = None  # a call the hub never opened (its opening failed): the worker records an estimate
        if call is not None:
            call.end(Status(e.status), e.t, e.latency_s)
            energy = await call.energy()
        replies.append(hp.reply_line(hp.Figure(e.cid, energy)))

    def _done(self, worker: Worker, done: hp.Done, replies: list[bytes]) -> None:
        if (call := worker.calls.get(done.cid)) is not None:
            call.completed(done.n)

    def _use(self, worker: Worker, use: hp.Use, replies: list[bytes]) -> None:
        if (call := worker.calls.get(use.cid)) is not None:
            call.usage(use.prompt_tokens, use.completion_tokens)

    def _lag(self, worker: Worker, lag: hp.Lag, replies: list[bytes]) -> None:
        self.books.observe_loop_lag(lag.seconds)

    def _lost(self, worker: Worker, lost: hp.Lost, replies: list[bytes]) -> None:
        self.books.metrics.count_dropped(lost.n)

    def _estimated(self, worker: Worker, rec: hp.Estimated, replies: list[bytes]) -> None:
        """A call a worker served while the hub was away: recorded like the hub's own estimates."""
        books = self.books
        key = books.records.open(rec.request_id, rec.model_name, rec.team)
        if key is None:  # the hub recorded it already (its connection closed while it ran)
            return
        m: Measurement = replace(hp.measurement_from(rec.measurement), request_id=key)
        books.metrics.count_meter_error(Fault.UNREACHABLE)
        books.record(rec.model_name, m, m.status, rec.latency_s)
        books.settled(m)

"""The hub of a multi-worker gateway: the one process that keeps the books.

``wattgate serve --workers N`` (:mod:`proxy.workers`) runs N relay workers and this
hub. Every call on a GPU must reach one meter for a fair split, so the workers
send their calls' windows here and the hub answers ``/metrics``, ``/readyz`` and
``/v1/energy/{id}`` for all of them.

The workers' events come over a Unix socket, one batch per line: a JSON array
``[tokens, events]``. ``tokens`` is flat, ``cid, n, t`` for every ``n`` tokens of a
stream that arrived at ``t`` (the one event per relayed chunk, so the cheapest to
read); ``events`` are the others, in order. Times are on CLOCK_MONOTONIC, which
every process on the host shares. A worker flushes its batch at once after an
event that needs a reply (``open``, ``end``), so a batch holds at most one, last:
the hub applies the tokens first, then the events, and a call's tokens are never
in a batch before its opening::

    ["hello", worker_index, pid]
    ["open", cid, request_id, client_chose, model_name, team, prompt_tokens, t]
    ["done", cid, n]                           a plain response's token count
    ["use", cid, prompt_tokens, completion_tokens]
    ["end", cid, status, t, latency_s]
    ["lag", seconds]                           the worker's event-loop lag
    ["rec", model_name, team, request_id, latency_s, measurement]   a call the worker
                                               estimated itself while the hub was away
    ["lost", n]                                such calls it could not keep

``cid`` numbers a call within its worker's connection. The hub answers ``hello``
with ``["methods", {model_name: method}]`` (how each model's calls are metered
now), ``open`` with ``["opened", cid, request_id, key, method]`` (the id changes
only when the client chose one the team already used) and ``end`` with
``["energy", cid, energy_object]`` (null for a call it does not have: the worker
then estimates it and sends it as ``rec``). A worker whose connection closes (it
died) has its open calls ended as ``client_closed``, settled and recorded like
any other.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from wattgate.meter import Fault, Measurement, Method, Status
from wattgate.proxy.books import Books, LocalCall

log = logging.getLogger("wattgate.hub")

MAX_LINE_BYTES = 64 * 1024 * 1024  # one batch of events; far above what a worker sends in one flush


def events_path(runtime_dir: str | os.PathLike[str]) -> Path:
    return Path(runtime_dir, "events.sock")


def api_path(runtime_dir: str | os.PathLike[str]) -> Path:
    return Path(runtime_dir, "api.sock")


def measurement_fields(m: Measurement) -> list[Any]:
    """``m`` as a JSON array (a worker's estimate, for the hub to record)."""
    return [m.request_id, {str(g): j for g, j in m.joules_by_gpu.items()}, m.method, m.settled, m.start, m.end,
            m.prompt_tokens, m.completion_tokens, m.status, m.fault, m.host_joules]


def measurement_from(fields: list[Any]) -> Measurement:
    rid, joules, method, settled, start, end, prompt, completion, status, fault, host = fields
    return Measurement(str(rid), {int(g): float(j) for g, j in joules.items()}, Method(method), bool(settled),
                       float(start), float(end), int(prompt), int(completion), Status(status),
                       None if fault is None else Fault(fault), float(host))


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
    """Applies the workers' events to the books; see the module's docstring for the protocol."""

    def __init__(self, books: Books) -> None:
        self.books = books
        self.workers: dict[asyncio.StreamWriter, Worker] = {}
        self._handlers: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def serving(self, path: Path) -> AsyncIterator[None]:
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._connection, path, limit=MAX_LINE_BYTES)
        try:
            yield
        finally:
            server.close()
            for writer in list(self.workers):
                writer.close()
                self._closed(self.workers.pop(writer))
            # Let each connection's handler see its end, rather than be cancelled with the loop.
            if self._handlers:
                await asyncio.wait(self._handlers, timeout=5)

    def state(self) -> list[dict[str, Any]]:
        return sorted((w.state() for w in self.workers.values()), key=lambda s: (s["index"] is None, s["index"]))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker = self.workers[writer] = Worker()
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            while line := await reader.readline():
                replies: list[bytes] = []
                tokens, events = orjson.loads(line)
                calls = worker.calls
                it = iter(tokens)
                for cid, n, t in zip(it, it, it, strict=True):
                    if (call := calls.get(cid)) is not None:  # None: ended as the worker's connection broke
                        call.tokens(n, t)
                for event in events:
                    try:
                        await self._apply(worker, event, replies)
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

    async def _apply(self, worker: Worker, event: list[Any], replies: list[bytes]) -> None:
        kind = event[0]
        call: LocalCall | None
        if kind == "open":
            _, cid, request_id, client_chose, name, team, prompt_tokens, t = event
            call = await self.books.open(request_id, client_chose, name, team, prompt_tokens, t)
            worker.calls[cid] = call
            worker.served += 1
            replies.append(orjson.dumps(["opened", cid, call.request_id, call.key, call.method]) + b"\n")
        elif kind == "end":
            _, cid, status, t, latency_s = event
            call = worker.calls.pop(cid, None)
            energy = None  # a call the hub never opened (its opening failed): the worker records an estimate
            if call is not None:
                call.end(Status(status), t, latency_s)
                energy = await call.energy()
            replies.append(orjson.dumps(["energy", cid, energy]) + b"\n")
        elif kind == "done":
            if (call := worker.calls.get(event[1])) is not None:
                call.completed(event[2])
        elif kind == "use":
            if (call := worker.calls.get(event[1])) is not None:
                call.usage(event[2], event[3])
        elif kind == "lag":
            self.books.observe_loop_lag(event[1])
        elif kind == "rec":
            _, name, team, request_id, latency_s, fields = event
            self._record_estimate(name, team, request_id, latency_s, measurement_from(fields))
        elif kind == "lost":
            self.books.metrics.ledger_dropped.inc(event[1])
        elif kind == "hello":
            worker.index, worker.pid = event[1], event[2]
            methods = {name: self.books.method_for(model) for name, model in self.books.settings.models.items()}
            replies.append(orjson.dumps(["methods", methods]) + b"\n")
        else:
            log.warning("hub: unknown event %r", kind)

    def _record_estimate(self, name: str, team: str | None, request_id: str, latency_s: float, m: Measurement) -> None:
        """A call a worker served while the hub was away: recorded like the hub's own estimates."""
        books = self.books
        key = books.records.open(request_id, name, team)
        if key is None:  # the hub recorded it already (its connection closed while it ran)
            return
        m = replace(m, request_id=key)
        books.metrics.meter_errors.labels(Fault.UNREACHABLE).inc()
        books.record(name, m, m.status, latency_s)
        books.settled(m)

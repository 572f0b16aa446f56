"""Limits at the HTTP layer: how large a request's head may be, how long its head and body may take,
and how many requests may be arriving at once.

uvicorn's httptools protocol reads a request's line and headers whole, whatever their size, and waits
for a body forever (a 64 MB header stalled the event loop for 7-11 s; 5,000 bodies shorter than their
Content-Length were held for good). Its h11 protocol has a size cap (``h11_max_incomplete_event_size``,
what vLLM sets against GHSA-rxc4-3w6r-4v47) but misses an oversized head that arrives in one read (h11
PR #206) and parses in Python. This protocol is uvicorn's httptools one with the limits added in its
parser callbacks: nothing is added to a response's path, so the relay costs what it did.

A head is counted twice: by the bytes read while it is incomplete (a head spread over many reads is
refused before it is whole) and by its parsed size once complete (one read can hold a whole head).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from wattgate.proxy.errors import error_body
from wattgate.proxy.settings import HttpLimits


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a request that was answered already."""


def _incomplete(server_state: Any) -> set[LimitedHttpProtocol]:
    """The connections of one server whose current request is still arriving."""
    if not hasattr(server_state, "wattgate_incomplete"):
        server_state.wattgate_incomplete = set()
    return server_state.wattgate_incomplete  # type: ignore[no-any-return]


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`~proxy.settings.HttpLimits` (set on a subclass by
    :func:`limited_protocol`)."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arriving = _incomplete(self.server_state)
        self._refused = False
        self._head_bytes = 0
        self._in_head = True  # a connection that says nothing is timed like a head that stalls
        self._began = False  # whether a byte of the current request has come (a silent one is just closed)
        self._last_read = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        if len(self._arriving) >= self.limits.max_incomplete_requests:
            self._refuse_busy()
            return
        self._arriving.add(self)
        self._arm(self.limits.head_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._arriving.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._last_read = self.loop.time()
        super().data_received(data)
        if self._in_head and not self._refused:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse_head()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a callback that refused the request stopped the parser: answered already
            super().send_400_response(msg)

    # -- parser callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._began, self._head_bytes = True, True, 0
        if self not in self._arriving:  # the next request on a kept-alive connection
            if len(self._arriving) >= self.limits.max_incomplete_requests:
                self._refuse_busy()
                raise _Refused
            self._arriving.add(self)
            self._arm(self.limits.head_timeout_s)

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_head_bytes:
            self._refuse_head()
            raise _Refused
        self._in_head = False
        self._arm(self.limits.body_timeout_s)  # until the body is complete (at once when there is none)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._arriving.discard(self)
        super().on_message_complete()

    # -- timing out -----------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._check_timeout)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_timeout(self) -> None:
        """Nothing read for a whole timeout: the request is answered 408 and the connection closed. A
        body's timer is not re-armed at every read (that is a timer per chunk): it looks back when it fires."""
        self._timer = None
        limit = self.limits.head_timeout_s if self._in_head else self.limits.body_timeout_s
        quiet = self.loop.time() - self._last_read
        if not self._in_head and quiet < limit:
            self._timer = self.loop.call_later(limit - quiet, self._check_timeout)
            return
        cycle = self.cycle
        if self._in_head and not self._began:
            self._close()  # never said a word: nobody to answer
        elif self._in_head or cycle is None or not cycle.response_started:
            phase = "headers" if self._in_head else "body"
            self._refuse(408, f"request {phase} not received within {limit:g} s")
        else:  # answered already (e.g. a 401 before the body was read): only the connection is left
            self._close()

    # -- answering ----------------------------------------------------------------

    def _refuse_busy(self) -> None:
        self._refuse(503, "too many requests arriving at once; try again shortly")

    def _refuse_head(self) -> None:
        self._refuse(431, f"request line and headers exceed {self.limits.max_head_bytes} bytes")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` in OpenAI's error shape and close the connection; the app, if it is reading
        this request's body, sees the client leave."""
        self._refused = True
        body = orjson.dumps(error_body(message, "invalid_request_error", code=status))
        if not self.transport.is_closing():
            self.transport.write(b"".join([
                STATUS_LINE[status], b"content-type: application/json\r\n",
                b"content-length: ", str(len(body)).encode(), b"\r\n",
                b"connection: close\r\n", *([b"retry-after: 1\r\n"] if status == 503 else []), b"\r\n", body,
            ]))
        self._close()

    def _close(self) -> None:
        self._disarm()
        self._arriving.discard(self)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if not self.transport.is_closing():
            self.transport.close()


def limited_protocol(limits: HttpLimits) -> type[LimitedHttpProtocol]:
    """The protocol class to give uvicorn (``Config(http=...)``) for ``limits``."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})


def uvicorn_options(limits: HttpLimits) -> dict[str, Any]:
    """uvicorn's settings for a gateway's public port: the limited protocol, no WebSockets (no route
    takes one)."""
    return {"http": limited_protocol(limits), "ws": "none"}


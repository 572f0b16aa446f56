"""Relay of an upstream Server-Sent-Events stream to the client, with the energy added at the end.

Every event is forwarded as soon as it arrives. The only event held back is the
upstream's usage chunk (``choices: []``, requested by the gateway with
``stream_options.include_usage``): it becomes the last data event, carrying the
``energy`` object (and ``usage`` only if the client asked for it), followed by
``[DONE]``. Tokens are counted from the bytes of each event, without parsing its
JSON; the exact totals come from the usage chunk.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from meter import Measurement, RequestWindow

_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_CHOICE = b'"choices":[{'
_DONE = b"data: [DONE]"


class StreamRelay(Response):
    """ASGI response that relays one upstream stream.

    ``finish(measurement, status)`` is awaited once the window is closed and
    returns the ``energy`` object for the last chunk (status ``ok``, ``error``
    or ``client_closed``).
    """

    def __init__(
        self,
        upstream: httpx.Response,
        window: RequestWindow,
        headers: dict[str, str],
        client_wants_usage: bool,
        finish: Callable[[Measurement, str], Awaitable[dict[str, Any]]],
    ) -> None:
        super().__init__(None, 200, {"cache-control": "no-cache", **headers}, "text/event-stream")
        # No length: the body is a stream (FastAPI may still add headers to raw_headers).
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.upstream = upstream
        self.window = window
        self.client_wants_usage = client_wants_usage
        self.finish = finish
        self.held: dict[str, Any] | None = None
        self.first: dict[str, Any] | None = None
        self.status = "ok"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client_gone = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    nonlocal client_gone
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            client_gone = True
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch_disconnect)
                tail = await self._relay(send)
                tg.cancel_scope.cancel()
        except OSError:  # the client's socket went away while sending
            client_gone = True
        finally:
            with anyio.CancelScope(shield=True):
                # Closing the upstream connection makes vLLM abort the generation.
                await self.upstream.aclose()
                if client_gone:
                    await self.finish(self.window.end("client_closed"), "client_closed")
        if not client_gone:
            await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _relay(self, send: Send) -> bytes:
        """Forward the stream; return the closing bytes (energy chunk and ``[DONE]``)."""
        buf = b""
        error_event = b""
        try:
            # Raw bytes: SSE is not compressed by vLLM, and skipping the decoder saves a layer per chunk.
            chunks = self.upstream.aiter_raw() if not self.upstream.headers.get("content-encoding") else self.upstream.aiter_bytes()
            async for chunk in chunks:
                buf += chunk
                if b"\r" in buf:
                    buf = buf.replace(b"\r\n", b"\n")
                out = []
                while (i := buf.find(b"\n\n")) >= 0:
                    event, buf = buf[: i + 2], buf[i + 2 :]
                    forwarded = self._event(event)
                    if forwarded:
                        out.append(forwarded)
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
        except httpx.TimeoutException:
            error_event = self._error_event("upstream stopped sending (read timeout)", 504)
        except httpx.TransportError:
            error_event = self._error_event("upstream connection broke mid-stream", 502)
        measurement = self.window.end(self.status)
        energy = await self.finish(measurement, self.status)
        last = self.held if self.held is not None else self._synthetic_last()
        if not self.client_wants_usage:
            last.pop("usage", None)
        last["energy"] = energy
        return error_event + b"data: " + orjson.dumps(last) + b"\n\n" + _DONE + b"\n\n"

    def _event(self, event: bytes) -> bytes | None:
        """Account one upstream event; return the bytes to forward (None: hold or drop)."""
        if event.startswith(_DONE):
            return None
        if not event.startswith(b"data: {"):
            return event  # comments and keep-alives pass through
        if self.first is None:
            self.first = _json(event)
        if event.startswith(b'data: {"error"'):
            self.status = "error"
            return event
        if b'"usage"' in event and _USAGE.search(event):
            obj = _json(event)
            usage = obj.get("usage") or {}
            self.window.usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))
            if not obj.get("choices"):
                self.held = obj
                return None
            if not self.client_wants_usage:  # continuous usage stats the client did not ask for
                obj.pop("usage", None)
                event = b"data: " + orjson.dumps(obj) + b"\n\n"
        if _CHOICE in event:
            self.window.tokens(1)
        return event

    def _synthetic_last(self) -> dict[str, Any]:
        first = self.first or {}
        return {
            "id": first.get("id", ""),
            "object": first.get("object", "chat.completion.chunk"),
            "created": first.get("created", int(time.time())),
            "model": first.get("model", ""),
            "choices": [],
        }

    def _error_event(self, message: str, status: int) -> bytes:
        self.status = "error"
        body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": status}}
        return b"data: " + orjson.dumps(body) + b"\n\n"


def _json(event: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(event[6:])
    except orjson.JSONDecodeError:
        return {}
    return obj if isinstance(obj, dict) else {}

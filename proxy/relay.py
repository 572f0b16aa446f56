"""Relay of an upstream Server-Sent-Events stream to the client, with the energy added at the end.

Every event is forwarded as soon as it arrives. The only event held back is the
upstream's usage chunk (``choices: []``, requested by the gateway with
``stream_options.include_usage``): it becomes the last data event, carrying the
``energy`` object (and ``usage`` only if the client asked for it), followed by
``[DONE]``. With the figures in usage on (the default), a chat stream's finish chunk
(every choice has its ``finish_reason``) is held back too, until the figure is
known, and goes out just before the last event with the figure in each choice's
``delta.provider_specific_fields.energy``: the one place LiteLLM's proxy keeps on a
stream whatever the provider. Anything else arriving after it sends it on first,
unchanged.

Every data event is parsed (orjson: about 1.5 us for a chat chunk, what the
regular-expression scan for output it replaced cost), so nothing a client cannot
parse is passed on: the first event whose data is not a JSON object, or bytes
that are not an SSE event at all, end the stream with an error event, the energy
chunk and ``[DONE]``, as an upstream that breaks does. An event whose choices
carry generated text, reasoning or a tool call is a token arriving now, whatever
the JSON's spacing, key order or SSE framing; the exact totals come from the
usage chunk.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from wattgate.meter import Status
from wattgate.proxy import upstream as up
from wattgate.proxy.calls import CallWindow
from wattgate.proxy.chunks import (
    ERROR_KEY,
    NO_DATA,
    USAGE_KEY,
    has_key,
    json_object,
    output_and_finish,
    sse_data,
    with_choice_energy,
)
from wattgate.proxy.errors import error_body
from wattgate.proxy.figures import usage_fields

_DONE = b"data: [DONE]"
# Longest event held while waiting for its blank line: far above any chat chunk (logprobs
# included), and what keeps an upstream that never sends one from filling the gateway's memory.
MAX_EVENT_BYTES = 16 * 1024 * 1024


class _Unparseable(Exception):
    """An upstream event that a client's SSE or JSON parser would fail on."""


class StreamRelay(Response):
    """ASGI response that relays one upstream stream.

    The window is ended once the stream is (status ``ok``, ``error`` or
    ``client_closed``), and its ``energy`` object goes into the last chunk.
    """

    def __init__(
        self,
        upstream: up.Response,
        window: CallWindow,
        headers: dict[str, str],
        client_wants_usage: bool,
        energy_in_usage: bool,
    ) -> None:
        super().__init__(None, 200, {"cache-control": "no-cache", **headers}, "text/event-stream")
        # No length: the body is a stream (FastAPI may still add headers to raw_headers).
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.upstream_response = upstream
        self.window = window
        self.client_wants_usage = client_wants_usage
        self.energy_in_usage = energy_in_usage
        self.held: dict[str, Any] | None = None
        self.finish: tuple[dict[str, Any], bytes] | None = None  # the held finish chunk, and its event
        self.first: dict[str, Any] | None = None
        self.status = Status.OK
        self.streaming = True
        self.tokens = 0  # tokens seen in the events of the current read

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        client_gone = False

        def on_message(message: asyncio.Future[Message]) -> None:
            nonlocal client_gone
            if message.cancelled() or message.exception() is not None or not self.streaming:
                return
            if message.result()["type"] == "http.disconnect":
                client_gone = True
                task.cancel()  # stop relaying now, even while waiting for a slow first token

        # A bare future rather than a task group: this runs once per request, and
        # anyio's cancel scopes cost more CPU than the rest of the request set-up.
        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(on_message)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            tail = await self._relay(send)
        except OSError:  # the client's socket went away while sending
            client_gone = True
        except asyncio.CancelledError:
            if not client_gone:
                raise
            task.uncancel()
        finally:
            watcher.remove_done_callback(on_message)
            watcher.cancel()
            if not client_gone:
                self.upstream_response.release()  # back to the pool; aiohttp closes it if the body was not read to the end
            else:
                self.upstream_response.close()  # dropping the connection makes vLLM abort the generation
        if client_gone:
            self.window.end(Status.CLIENT_CLOSED)
        else:
            await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _relay(self, send: Send) -> bytes:
        """Forward the stream; return the closing bytes (energy chunk and ``[DONE]``)."""
        buf = b""
        error_event = b""
        try:
            async for chunk in self.upstream_response.content.iter_any():
                buf += chunk
                if b"\r" in buf:
                    buf = buf.replace(b"\r\n", b"\n")
                *events, buf = buf.split(b"\n\n")
                out, bad = self._forward(events)
                self._record_tokens()
                if out:
                    out.append(b"")
                    await send({"type": "http.response.body", "body": b"\n\n".join(out), "more_body": True})
                if bad:
                    buf, error_event = b"", self._error_event("upstream sent an event that is not valid SSE JSON", 502)
                    break
                if len(buf) > MAX_EVENT_BYTES:
                    buf = b""
                    error_event = self._error_event(f"upstream sent an event over {MAX_EVENT_BYTES} bytes", 502)
                    break
            # The last event may end without its blank line when the upstream closes; one that does not
            # parse was cut short: it is not passed on (the client's JSON parser would fail on it) but said to be missing.
            if rest := buf.strip():
                out, bad = self._forward([rest])
                if bad:
                    error_event = self._error_event("upstream closed the stream in the middle of an event", 502)
                elif out:
                    await send({"type": "http.response.body", "body": out[0] + b"\n\n", "more_body": True})
            self._record_tokens()
        except TimeoutError:
            error_event = self._error_event("upstream stopped sending (read timeout)", 504)
        except up.ERRORS:
            error_event = self._error_event("upstream connection broke mid-stream", 502)
        self.streaming = False  # from here on, a disconnect no longer interrupts: the window is closing
        self.window.end(self.status)
        energy = await self.window.energy()
        finish = b""
        if self.finish is not None:
            finish = b"data: " + orjson.dumps(with_choice_energy(self.finish[0], energy)) + b"\n\n"
        last = self.held if self.held is not None else self._synthetic_last()
        if self.energy_in_usage:  # where front ends and routers look: usage, and LiteLLM's provider fields
            last["usage"] = {**(last.get("usage") or {}), **usage_fields(energy)}
            last["provider_specific_fields"] = {"energy": energy}
        elif not self.client_wants_usage:
            last.pop("usage", None)
        last["energy"] = energy
        return finish + error_event + b"data: " + orjson.dumps(last) + b"\n\n" + _DONE + b"\n\n"

    def _forward(self, events: list[bytes]) -> tuple[list[bytes], bool]:
        """What to forward of ``events``, up to the first one a client could not parse (then True)."""
        out = []
        for event in events:
            held = self.finish
            try:
                forwarded = self._event(event)
            except _Unparseable:
                return out, True
            if forwarded:
                if held is not None and self.finish is held:  # more came after the finish chunk: it goes on as it was
                    out.append(held[1])
                    self.finish = None
                out.append(forwarded)
        return out, False

    def _event(self, event: bytes) -> bytes | None:
        """Account one upstream event (without its blank line); return what to forward (None: hold or drop).
        Raises :class:`_Unparseable` for data that is not a JSON object, or bytes that are not an SSE event."""
        data = sse_data(event)
        if data is None:
            if event.startswith(NO_DATA):
                return event  # comments, keep-alives, an event name without data
            raise _Unparseable
        obj = json_object(data)
        if obj is None:
            if data.strip() == b"[DONE]":  # once per stream: tried after the parse, which every other event needs
                return None
            raise _Unparseable
        if self.first is None:
            self.first = obj
        if b'"error"' in data and has_key(ERROR_KEY, data):
            self.status = Status.ERROR
            return event
        if b'"usage"' in data and has_key(USAGE_KEY, data):
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self.window.usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))
                if not obj.get("choices"):
                    self.held = obj
                    return None
                if not self.client_wants_usage:  # continuous usage stats the client did not ask for
                    del obj["usage"]
                    event = b"data: " + orjson.dumps(obj)
        output, finishes = output_and_finish(obj)
        if output:
            self.tokens += 1
        if finishes and self.energy_in_usage:
            previous, self.finish = self.finish, (obj, event)
            return previous[1] if previous is not None else None
        return event

    def _record_tokens(self) -> None:
        """Tokens that arrived in one read arrived together: one record for them (fewer records, and
        no bursts of near-identical times for the meter to merge)."""
        if self.tokens:
            self.window.tokens(self.tokens)
            self.tokens = 0

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
        self.status = Status.ERROR
        return b"data: " + orjson.dumps(error_body(message, "upstream_error", code=status)) + b"\n\n"

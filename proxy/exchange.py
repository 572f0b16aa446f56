"""One proxied call, in named steps: check it, open its window, send it, reply with JSON or a stream.

Everything that can fail on the way in (auth, the body, its fields, serializing
it for the upstream) happens in :func:`parse`, before the call has a record or a
meter window. From the moment the window opens, :class:`Exchange` owns it, and
every way out, an answer, an upstream failure, a client that left or a bug,
closes it through the window's ``end``, whose first call alone counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import orjson
from starlette.responses import Response
from starlette.types import Receive

from wattgate.meter import Status, token_count
from wattgate.proxy import upstream as up
from wattgate.proxy.calls import CallWindow
from wattgate.proxy.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from wattgate.proxy.figures import energy_headers, usage_fields
from wattgate.proxy.relay import StreamRelay
from wattgate.proxy.settings import Model, Settings

log = logging.getLogger(__name__)

_BYTES_PER_TOKEN = 4  # rough prompt size until the upstream reports exact usage
_PROMPT_FIELD = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input"}

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Call:
    """A checked call, ready to send: nothing about it can fail any more before the upstream answers."""

    path: str  # under /v1, e.g. "chat/completions"
    name: str  # the registry's model name, as the client sent it
    model: Model
    stream: bool
    client_wants_usage: bool  # a stream's usage chunk goes to the client only if it asked
    payload: bytes  # the body for the upstream
    prompt_tokens: int  # a guess from the body's size, until the upstream's usage


def parse(settings: Settings, path: str, body: dict[str, Any]) -> Call:
    """Check a call's body and make the upstream's; raises :class:`GatewayError` subclasses."""
    name = body.get("model")
    if not isinstance(name, str):
        raise InvalidRequest("'model' must be a string", param="model")
    resolved = settings.resolve(name)
    if resolved is None:
        known = ", ".join(f"'{m}'" for m in settings.models)
        raise ModelNotFound(f"The model '{name}' does not exist; this gateway serves {known}", param="model")
    name, model = resolved, settings.models[resolved]
    check_fields(path, body)
    stream = body.get("stream") is True
    client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    body["model"] = settings.served_name(name)
    if stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    try:
        # orjson reads JSON nested up to 1024 levels but writes only 254 (the body object counted): a
        # deeper body (valid JSON) fails here, before the call holds anything, not after its window opened.
        payload = orjson.dumps(body)
        prompt_bytes = len(orjson.dumps(body.get(_PROMPT_FIELD[path])))
    except orjson.JSONEncodeError:
        raise InvalidRequest(TOO_DEEP) from None
    return Call(path, name, model, stream, client_wants_usage, payload, max(1, prompt_bytes // _BYTES_PER_TOKEN))


TOO_DEEP = "request body is nested too deeply (at most 254 levels, the body object counted)"


def check_fields(path: str, body: dict[str, Any]) -> None:
    """Cheap type checks of what the gateway itself relies on; the upstream validates the rest."""
    if body.get("stream") is not None and not isinstance(body["stream"], bool):  # null: OpenAI's default, false
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "n" else 0)):
            raise InvalidRequest(f"'{key}' must be a non-negative integer", param=key)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    field = _PROMPT_FIELD[path]
    prompt = body.get(field)
    if path == "chat/completions":
        if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
            raise InvalidRequest("'messages' must be a non-empty array of objects", param=field)
    elif not isinstance(prompt, (str, list)):
        raise InvalidRequest(f"'{field}' must be a string or an array", param=field)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Front(Protocol):
    """What an exchange needs of the gateway."""

    client: up.UpstreamClient
    settings: Settings

    def upstream_headers(self, model: Model, request_id: str) -> dict[str, str]: ...


class Exchange:
    """One call with an open window: ``run`` sends it and answers; every way out closes the window once."""

    def __init__(self, front: Front, call: Call, window: CallWindow) -> None:
        self.front = front
        self.call = call
        self.request_id = window.request_id  # as the client knows it
        # The upstream's x-request-id: the record's key, unique across teams (vLLM refuses a second
        # request under an id that is running), in ASCII whatever the team's alias.
        self.upstream_id = quote(window.key, safe="/._:-")
        self.window = window

    async def run(self, receive: Receive) -> Response:
        """Send the call and answer; the window is closed on every way out but a stream's (its relay closes it)."""
        response = None
        try:
            response = await until_disconnect(receive, self._send())
            if self.call.stream and response.status == 200:
                return self._relay(response)
            return await until_disconnect(receive, self._reply(response))
        except BaseException as exc:
            if response is not None:
                response.close()  # unread: dropping the connection makes vLLM abort the generation
            gone = isinstance(exc, ClientGone)
            self.window.end(Status.CLIENT_CLOSED if gone else Status.ERROR)
            if gone:
                return Response(status_code=499)  # nobody reads it: the client has gone
            raise

    async def _send(self) -> up.Response:
        call = self.call
        try:
            headers = self.front.upstream_headers(call.model, self.upstream_id)
            return await self.front.client.post(f"{call.model.base_url}/{call.path}", call.payload, headers)
        except TimeoutError:
            raise _failed(UpstreamTimeout, call, "did not answer in time") from None
        except up.ERRORS as exc:
            raise _failed(UpstreamUnavailable, call, f"is unreachable ({up.describe(exc)})") from None

    def _relay(self, response: up.Response) -> StreamRelay:
        headers = {**up.passed_headers(response), "x-request-id": self.request_id,
                   "x-energy-method": self.window.method}
        return StreamRelay(response, self.window, headers, self.call.client_wants_usage,
                           self.front.settings.gateway.energy_in_usage)

    async def _reply(self, response: up.Response) -> Response:
        """The upstream's JSON answer with the energy object added (or its error, relayed)."""
        call = self.call
        try:
            raw = await response.read()
        except TimeoutError:
            raise _failed(UpstreamTimeout, call, "stopped answering") from None
        except up.ERRORS:
            raise _failed(UpstreamUnavailable, call, "broke the connection") from None
        finally:
            # Read to the end: back to the pool. Cut short (a client that left): aiohttp closes the
            # connection, and vLLM aborts the generation.
            response.release()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        ok = response.status == 200 and isinstance(data, dict)
        if ok:
            usage = data.get("usage")
            usage = usage if isinstance(usage, dict) else {}
            completion = token_count(usage.get("completion_tokens"))
            if completion:
                self.window.completed(completion)
            self.window.usage(usage.get("prompt_tokens"), completion)
        self.window.end(Status.OK if ok else Status.ERROR)
        energy = await self.window.energy()
        headers = {**up.passed_headers(response), "x-request-id": self.request_id, **energy_headers(energy)}
        if ok:
            body = _with_energy(data, raw, energy, self.front.settings.gateway.energy_in_usage)
            return Response(body, status_code=200, media_type="application/json", headers=headers)
        if response.status == 200:
            raise _failed(UpstreamUnavailable, call, "sent a response that is not a JSON object")
        if isinstance(data, dict) and "error" in data:  # the upstream's own error, relayed unchanged
            return Response(raw, status_code=response.status, media_type="application/json", headers=headers)
        message = raw.decode("utf-8", "replace")[:500] or response.reason or ""
        return UpstreamFailed(f"upstream error: {message}", response.status).response(headers)


def upstream_name(model: Model) -> str:
    """The upstream's address as the registry gives it, without any credentials in it."""
    url = urlsplit(model.base_url)
    return f"{url.scheme}://{url.hostname}{f':{url.port}' if url.port else ''}{url.path}"


def _failed(kind: type[GatewayError], call: Call, what: str) -> GatewayError:
    """An upstream failure, logged once (it names the upstream; never the prompt or a key)."""
    message = f"upstream {upstream_name(call.model)} for model '{call.name}' {what}"
    log.warning("%s", message)
    return kind(message)


def _with_energy(data: dict[str, Any], raw: bytes, energy: dict[str, Any], in_usage: bool) -> bytes:
    """The upstream's JSON object with ``energy`` added (and, ``in_usage``, its figures in ``usage``)."""
    data["energy"] = energy
    if in_usage and isinstance(data.get("usage"), dict):
        data["usage"].update(usage_fields(energy))
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes: add the key to the upstream's own bytes
        body = raw.rstrip()
        return body[:-1] + b',"energy":' + orjson.dumps(energy) + b"}"


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """``work``'s result, or :class:`ClientGone` (``work`` cancelled) if the client disconnects first.

    Once the request body has been read, the server's next ``receive`` message is the disconnect.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
        gone.cancel()
        if gone.done() and not gone.cancelled():
            gone.exception()  # a receive that failed: the connection is gone all the same
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _disconnected(receive: Callable[[], Awaitable[Any]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass

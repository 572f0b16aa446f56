"""A relay worker's link to the hub (:mod:`proxy.hub`): its calls' windows are kept there.

The worker relays; the hub meters. Token events are batched (at most
:data:`FLUSH_S` late, with the time each token arrived); a call's opening and its
end are sent at once, and the end's ``energy`` object comes back in one round
trip. Nothing on a stream's path waits for the hub but that last chunk, and
that for at most :data:`REPLY_TIMEOUT_S` (and the opening of a call whose id the
client chose, which the hub checks against the team's records, as long). Once a
reply is that late the link counts the hub as stalled, and no call waits for it
again until it is heard from: a stall costs one bounded wait, not one per call.
The routes the hub answers are waited for a bounded time too; ``/readyz`` then
answers from the worker's own view (``hub: "stalled"``) within a probe's second.

When the hub is unreachable (restarting, killed), calls are still served: their
figures are estimated here, labelled ``estimate`` with the fault ``unreachable``,
and kept in a bounded outbox that goes to the hub once it is back, so the ledger
and metrics still get them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from starlette.responses import Response

from wattgate.meter import Fault, Method, Status
from wattgate.meter.window import Request as Window
from wattgate.meter.window import measurement, token_count
from wattgate.proxy import hub_protocol as hp
from wattgate.proxy.errors import ServiceUnavailable
from wattgate.proxy.figures import energy_object
from wattgate.proxy.gateway_state import GatewayState
from wattgate.proxy.hub import api_path, events_path
from wattgate.proxy.hub_connection import REPLY_TIMEOUT_S, HubConnection
from wattgate.proxy.hub_protocol import Unanswered
from wattgate.proxy.metering import site_factors
from wattgate.proxy.readiness import READY_PROBE_S, ask_upstreams, ready_response
from wattgate.proxy.records import record_key
from wattgate.proxy.settings import Model, Settings

log = logging.getLogger("wattgate.worker")

# The hub's answer to /readyz (its own upstream probes included) is waited for this long before the
# worker answers from its own view: within the 1 s a Kubernetes probe allows by default.
HUB_READY_WAIT_S = READY_PROBE_S + 0.1
HUB_ROUTE_WAIT_S = 5.0  # /metrics and /v1/energy: beyond this (or REPLY_TIMEOUT_S while stalled), 503


class HubLink:
    """A worker's link to the hub: opens :class:`HubCall` windows there (a :class:`~proxy.calls.CallOpener`)
    and passes it the routes it answers."""

    def __init__(self, settings: Settings, runtime_dir: str | os.PathLike[str], index: int) -> None:
        self.settings = settings
        self.site = site_factors(settings)
        self.index = index
        self.conn = HubConnection(events_path(runtime_dir), index)
        self.api = api_path(runtime_dir)
        self._next_cid = 0
        self._http: aiohttp.ClientSession | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The connection to the hub and the client for its routes, while the worker's app runs."""
        self._http = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.api)))
        try:
            async with self.conn.running():
                yield
        finally:
            await self._http.close()

    async def open(self, request_id: str, client_chose: bool, name: str, team: str | None,
                   prompt_tokens: int) -> HubCall:
        cid, self._next_cid = self._next_cid, self._next_cid + 1
        call = HubCall(self, cid, request_id, team, name, self.settings.models[name], prompt_tokens)
        if not self.conn.up:
            return call
        opened = self.conn.request(hp.Open(cid, request_id, client_chose, name, team, prompt_tokens, call.opened_at))
        # The hub checks a client-chosen id against the team's records (a fresh id names none: no wait);
        # while it is stalled the id is used unchecked, and checked when the hub catches up.
        if client_chose and not self.conn.stalled:
            try:
                await asyncio.wait_for(asyncio.shield(opened), REPLY_TIMEOUT_S)
            except TimeoutError:
                self.conn.timed_out()
        if opened.done():
            call.opened(opened)
        else:
            opened.add_done_callback(call.opened)
        return call

    def observe_loop_lag(self, seconds: float) -> None:
        self.conn.send(hp.Lag(seconds))

    async def ask_hub(self, request: Request) -> Response:
        """``/metrics``, ``/readyz``, ``/v1/energy`` and ``/v1/energy/{id}``, answered by the hub."""
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k in ("authorization", "accept")}
        path = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")  # as the client sent it
        if query := request.scope.get("query_string"):
            path += "?" + query.decode("latin-1")
        if request.url.path == "/readyz":
            return await self._ready(path, headers, request.app.state.gateway)
        wait = REPLY_TIMEOUT_S if self.conn.stalled else HUB_ROUTE_WAIT_S
        try:
            return await self._from_hub(path, headers, wait)
        except TimeoutError:
            raise ServiceUnavailable(f"the gateway's hub, which keeps records and metrics, did not answer within "
                                     f"{wait:g} s; try again shortly") from None
        except aiohttp.ClientError:
            raise ServiceUnavailable("the gateway's hub, which keeps records and metrics, is not reachable; "
                                     "try again shortly") from None

    async def _from_hub(self, path: str, headers: dict[str, str], wait: float) -> Response:
        assert self._http is not None
        async with self._http.get(f"http://hub{path}", headers=headers, timeout=aiohttp.ClientTimeout(total=wait)) as r:
            body = await r.read()
            return Response(body, r.status, media_type=r.headers.get("content-type"))

    async def _ready(self, path: str, headers: dict[str, str], gw: GatewayState) -> Response:
        """The hub's ``/readyz``; if it is late or away, the worker's own: it still serves calls, with
        estimates, so it is ready if its upstreams are. Both are asked at once, so either way the
        answer comes within :data:`HUB_READY_WAIT_S`."""
        own = asyncio.ensure_future(ask_upstreams(gw))
        try:
            response = await self._from_hub(path, headers, HUB_READY_WAIT_S)
        except TimeoutError:
            fault = "stalled"
        except aiohttp.ClientError:
            fault = "unreachable"
        else:
            own.cancel()
            return response
        return ready_response(gw, await own, {"method": Method.ESTIMATE, "ok": False, "hub": fault}, {})


def add_hub_routes(app: FastAPI, link: HubLink) -> None:
    """The routes a worker passes to the hub."""
    for path in ("/metrics", "/readyz", "/v1/energy", "/v1/energy/{request_id}"):
        app.add_route(path, link.ask_hub, methods=["GET"])


class HubCall:
    """A call's window kept at the hub, fed by a worker (a :class:`~proxy.calls.CallWindow`)."""

    __slots__ = (
        "_completed",
        "_conn",
        "_ended",
        "_energy",
        "_link",
        "_method",
        "_reply",
        "_seen",
        "_usage",
        "cid",
        "generation",
        "key",
        "model",
        "name",
        "opened_at",
        "prompt_tokens",
        "request_id",
        "team",
    )

    def __init__(self, link: HubLink, cid: int, request_id: str, team: str | None, name: str, model: Model,
                 prompt_tokens: int) -> None:
        self._link = link
        self.cid = cid
        self.request_id = request_id
        self.team = team
        self.key = record_key(team, request_id)
        self.name = name
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.opened_at = time.monotonic()
        # Its events go to the connection it was opened on; -1: opened while the hub was away.
        self._conn = link.conn
        self.generation = self._conn.generation if self._conn.up else -1
        self._method = self._conn.methods.get(name, Method.ESTIMATE) if self._conn.up else Method.ESTIMATE
        self._seen = 0.0
        self._completed = 0
        self._usage: tuple[int | None, int | None] = (None, None)
        self._ended: tuple[Status, float] | None = None
        self._reply: asyncio.Future[hp.Reply | Unanswered] | None = None
        self._energy: dict[str, Any] | None = None

    @property
    def method(self) -> Method:
        return self._method

    def opened(self, fut: asyncio.Future[hp.Reply | Unanswered]) -> None:
        """The hub's answer to the opening: the id it was recorded under, and its method."""
        reply = fut.result() if fut.done() else None
        if not isinstance(reply, hp.Opened):
            self.generation = -1  # the hub did not answer: this call is estimated here
            self._method = Method.ESTIMATE
            return
        self.request_id, self.key = reply.request_id, reply.key
        self._method = self._conn.methods[self.name] = Method(reply.method)

    @property
    def _live(self) -> bool:
        return self.generation == self._conn.generation and self._conn.up

    def tokens(self, n: float = 1) -> None:
        self._seen += n
        if self._live:
            self._conn.tokens(self.cid, n, time.monotonic())

    def completed(self, n: int) -> None:
        self._completed += n
        if self._live:
            self._conn.send(hp.Done(self.cid, n))

    def usage(self, prompt_tokens: object, completion_tokens: object) -> None:
        prompt, completion = token_count(prompt_tokens), token_count(completion_tokens)
        self._usage = (prompt if prompt is not None else self._usage[0],
                       completion if completion is not None else self._usage[1])
        if self._live:
            self._conn.send(hp.Use(self.cid, prompt, completion))

    def end(self, status: Status) -> None:
        if self._ended is not None:
            return
        t = time.monotonic()
        self._ended = (status, t)
        if self._live:
            self._reply = self._conn.request(hp.End(self.cid, status, t, t - self.opened_at), REPLY_TIMEOUT_S)

    async def energy(self) -> dict[str, Any]:
        if self._energy is not None:
            return self._energy
        reply = await self._reply if self._reply is not None else Unanswered.GONE
        if reply is Unanswered.LATE:  # a slow hub: it still records the call; the client gets an estimate now
            self._energy = self._estimate()
        elif isinstance(reply, hp.Figure) and reply.energy is not None:
            self._energy = reply.energy
        else:  # the hub was away, lost its connection, or never opened the call
            self._energy = self._estimate(keep=True)
        return self._energy

    def _estimate(self, keep: bool = False) -> dict[str, Any]:
        """The call's figure estimated here (the hub did not answer); ``keep``: for the hub to record."""
        assert self._ended is not None
        status, end = self._ended
        prompt, completion = self._usage
        window = Window(self.key, tuple(self.model.gpus), self.opened_at, self.model.prefill_weight,
                        self.model.estimate.active_params_b, prompt if prompt is not None else self.prompt_tokens,
                        completion_tokens=completion if completion is not None else self._completed or int(self._seen),
                        end=end, status=status, fault=Fault.UNREACHABLE)
        m = measurement(window, Method.ESTIMATE, {}, True, 0.0, end)
        if keep:
            self._conn.keep(hp.Estimated(self.name, self.team, self.request_id, end - self.opened_at,
                                         hp.measurement_fields(m)))
        # Final for the worker, but the API calls a figure settled only once the hub has it.
        return {**energy_object(m, self._link.site, self.request_id), "settled": False}

"""The FastAPI gateway: routes, request checks, forwarding and per-request figures.

:func:`create_app` is the single-process gateway. A multi-worker gateway builds the
same routes in two halves: workers relay calls (:func:`add_call_routes`) and the hub
answers from its books (:func:`add_book_routes`); see :mod:`proxy.workers`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from wattgate.meter import Meter
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.books import Books
from wattgate.proxy.calls import CallOpener, request_id_from
from wattgate.proxy.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from wattgate.proxy.exchange import TOO_DEEP, Exchange, parse, upstream_name
from wattgate.proxy.figures import ENERGY_HEADERS
from wattgate.proxy.foreign import ForeignLoadPoller
from wattgate.proxy.keys import load_keys
from wattgate.proxy.metering import build_meter
from wattgate.proxy.metrics import TeamView
from wattgate.proxy.page import add_page_routes
from wattgate.proxy.records import record_key
from wattgate.proxy.settings import Model, Settings
from wattgate.proxy.totals import GROUPS, parse_duration
from wattgate.proxy.upstream import ERRORS as UPSTREAM_ERRORS
from wattgate.proxy.upstream import UpstreamClient

log = logging.getLogger("wattgate")

#: What ``GET /v1/energy`` totals by: no ``team`` (a caller sees its own team's records only).
SUMMARY_GROUPS = tuple(g for g in GROUPS if g != "team")


class GatewayState:
    """What the routes of one app share: the caller's checks, the upstream client, and where calls are
    metered (``calls``: this process's books, or a multi-worker gateway's hub)."""

    def __init__(self, settings: Settings, calls: CallOpener, books: Books | None = None,
                 keys: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.calls = calls
        self.books = books  # None in a worker: the hub keeps them
        auth = settings.gateway.auth
        self.keys = load_keys(auth) if keys is None else keys  # read once: a file may be given
        self.metrics_aliases = frozenset(auth.metrics_aliases if auth else ())
        t = settings.gateway.timeouts
        self.client = UpstreamClient(t.connect_s, t.read_s, settings.gateway.max_connections)

    @classmethod
    def local(cls, settings: Settings, meter: Meter, drive: dict[int, SimulatedGpu]) -> GatewayState:
        """A gateway that keeps its own books (one process, or a multi-worker gateway's hub)."""
        auth = settings.gateway.auth
        keys = load_keys(auth)
        teams = sorted(set(keys.values()) - set(auth.metrics_aliases if auth else ()))
        books = Books(settings, meter, drive, teams)
        for name, model in settings.models.items():
            if model.api_key_env and not os.environ.get(model.api_key_env):
                log.warning("model '%s': $%s is not set, so its upstream gets no key", name, model.api_key_env)
        return cls(settings, books, books, keys)

    def authenticate(self, request: Request) -> str | None:
        """The caller's team alias; None when auth is off."""
        if not self.keys:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        alias = self.keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if alias is None:
            raise Unauthorized("missing or unknown gateway API key")
        return alias

    def metrics_for(self, request: Request, books: Books) -> CollectorRegistry | TeamView:
        """What the caller may scrape: everything, or with keys on, its own team's series only."""
        team = self.authenticate(request)
        if team is None or team in self.metrics_aliases:
            return books.metrics.registry
        return TeamView(books.metrics.registry, team)

    async def read_json(self, request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise UnsupportedMediaType("Content-Type must be application/json")
        limit = self.settings.gateway.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            if e.msg.startswith("depth limit exceeded"):  # valid JSON, deeper than orjson reads (1024)
                raise InvalidRequest(TOO_DEEP) from None
            raise InvalidRequest("request body is not valid JSON (UTF-8)") from None
        if not isinstance(data, dict):
            raise InvalidRequest("request body must be a JSON object")
        return data

    def upstream_headers(self, model: Model, request_id: str) -> dict[str, str]:
        headers = {"content-type": "application/json", "x-request-id": request_id}
        if model.api_key_env:
            key = os.environ.get(model.api_key_env)
            if key:
                headers["authorization"] = f"Bearer {key}"
        return headers


class _ApiCors:
    """CORS for the ``/v1`` API only: ``/metrics`` and the health routes are for operators, not browsers."""

    def __init__(self, app: ASGIApp, /, **options: Any) -> None:
        self.app = app
        self.cors = CORSMiddleware(app, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = scope["type"] == "http" and scope["path"].startswith("/v1/")
        await (self.cors if api else self.app)(scope, receive, send)


def _request_id(request: Request) -> str:
    return request_id_from(request.headers.get("x-request-id", ""))


async def probe_loop_lag(observe: Callable[[float], None], period_s: float = 0.5) -> None:
    """Observe how late a sleep wakes up: the time callbacks wait for the busy loop."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        observe(max(loop.time() - due, 0.0))


@asynccontextmanager
async def books_running(gw: GatewayState, books: Books) -> AsyncIterator[None]:
    """The books' meter, grid feed and foreign-load poller, for the lifespan of the app that keeps them."""
    settings = gw.settings
    books.start()
    tasks = [asyncio.create_task(books.grid.run()), asyncio.create_task(warn_unreachable(gw))]
    if settings.meter.foreign_poll_ms and books.meter.sampler is not None:
        foreign = ForeignLoadPoller(
            gw.client, books.meter, settings.models, settings.served_name, books.in_flight,
            settings.meter.foreign_poll_ms / 1000,
        )
        tasks.append(asyncio.create_task(foreign.run()))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        books.stop()  # settles what it can: those records still reach the ledger


def new_app(gw: GatewayState, running: Callable[[], AbstractAsyncContextManager[None]] | None = None) -> FastAPI:
    """An app with the gateway's error shapes and CORS, and no routes yet; ``running``: what runs while it does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.client.open()
        lag_probe = asyncio.create_task(probe_loop_lag(gw.calls.observe_loop_lag))
        try:
            if running is None:
                yield
            else:
                async with running():
                    yield
        finally:
            lag_probe.cancel()
            await gw.client.close()

    # No redirect_slashes: its 307 would be built from the client's Host header; a stray slash is a 404.
    app = FastAPI(title="wattgate", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    app.state.gateway = gw
    if gw.settings.gateway.cors_allow_origins:
        app.add_middleware(
            _ApiCors,
            allow_origins=gw.settings.gateway.cors_allow_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[*ENERGY_HEADERS, "x-request-id"],  # else a browser app cannot read the figures
        )

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return exc.response({"x-request-id": getattr(request.state, "request_id", None) or _request_id(request)})

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> Response:
        return NotFound(f"no route {request.method} {request.url.path}").response()

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc: Exception) -> Response:
        return MethodNotAllowed(f"method {request.method} not allowed on {request.url.path}").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # One line here: Starlette hands the exception on to the server, which logs its traceback.
        log.error("unexpected %s on %s", type(exc).__name__, request.url.path)
        return GatewayError("internal gateway error").response()

    return app


def add_call_routes(app: FastAPI, gw: GatewayState) -> None:
    """The proxied calls, ``/v1/models``, ``/healthz`` and the chat page: what a relay worker answers itself."""
    settings = gw.settings

    async def forward(request: Request, path: str) -> Response:
        request.state.request_id = _request_id(request)
        team = gw.authenticate(request)
        try:
            body = await gw.read_json(request)
        except ClientDisconnect:  # left while sending its body: nothing was opened, nobody to answer
            return Response(status_code=499)
        call = parse(settings, path, body)
        given = request.headers.get("x-request-id")
        window = await gw.calls.open(
            request.state.request_id, request.state.request_id == given, call.name, team, call.prompt_tokens
        )
        request.state.request_id = window.request_id
        return await Exchange(gw, call, window).run(request.receive)

    # Plain Starlette routes: the proxied calls need no FastAPI dependency solving per request.
    for path in ("chat/completions", "completions", "embeddings"):
        app.add_route(f"/v1/{path}", functools.partial(forward, path=path), methods=["POST"])

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        gw.authenticate(request)
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "wattgate"} for n in settings.models],
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if settings.gateway.chat_page:
        add_page_routes(app)


def add_book_routes(
    app: FastAPI, gw: GatewayState, books: Books, more_ready: Callable[[], dict[str, Any]] | None = None
) -> None:
    """``/v1/energy/{id}``, ``/metrics`` and ``/readyz``: answered by whoever keeps the books
    (``more_ready``: what else ``/readyz`` says, e.g. a hub's workers)."""

    @app.get("/v1/energy/{request_id}")
    async def energy(request_id: str, request: Request) -> Response:
        team = gw.authenticate(request)
        rec = books.records.get(record_key(team, request_id))
        found = rec.energy if rec is not None and rec.energy else await books.stored(
            request_id, team, any_team=not gw.keys)
        if not found:
            raise NotFound(f"no energy record for request '{request_id}'")
        return JSONResponse(found)

    @app.get("/v1/energy")
    async def summary(request: Request, by: str = "model", since: str | None = None) -> Response:
        team = gw.authenticate(request)
        if by not in SUMMARY_GROUPS:
            raise InvalidRequest(f"by must be one of {', '.join(SUMMARY_GROUPS)}", param="by")
        try:
            since_s = parse_duration(since) if since else None
        except ValueError as e:
            raise InvalidRequest(str(e), param="since") from None
        rows = await books.summary(by, team, since_s)
        return JSONResponse({"object": "list", "by": by, "since": since, "data": rows})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        exposition = generate_latest(gw.metrics_for(request, books))  # type: ignore[arg-type]  # a view collects too
        return Response(exposition, media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz")
    async def readyz() -> Response:
        ledger = books.ledger.state() if books.ledger is not None else {"state": "off"}
        more = {"grid": books.grid.state(), "ledger": ledger, **(more_ready() if more_ready else {})}
        return ready_response(gw, await ask_upstreams(gw), books.meter.state(), more)


READY_PROBE_S = 0.5  # each upstream's /models must answer within this: /readyz answers within a probe's 1 s


async def _upstream_answers(gw: GatewayState, model: Model) -> bool:
    try:
        status, _ = await gw.client.get(f"{model.base_url}/models", gw.upstream_headers(model, "readyz"), READY_PROBE_S)
        return status < 500
    except UPSTREAM_ERRORS:
        return False


async def warn_unreachable(gw: GatewayState) -> None:
    """At start-up, one warning per upstream that does not answer: a wrong port shows now, not at the first call."""
    for name, up in (await ask_upstreams(gw)).items():
        if not up:
            log.warning("model %s: its upstream %s does not answer /models yet; its calls get 502 until it does",
                        name, upstream_name(gw.settings.models[name]))


async def ask_upstreams(gw: GatewayState) -> dict[str, bool]:
    """Whether each model's upstream answers ``/models``, all asked at once."""
    models = gw.settings.models
    return dict(zip(models, await asyncio.gather(*(_upstream_answers(gw, m) for m in models.values())), strict=True))


def ready_response(gw: GatewayState, upstreams: dict[str, bool], meter_state: dict[str, Any],
                   more: dict[str, Any]) -> Response:
    """``/readyz``: ready when every upstream but the optional ones answers; the meter's state is
    reported, not required (a meter fault never fails a request: figures fall back to estimates)."""
    models = gw.settings.models
    ready = all(up or models[name].readiness == "optional" for name, up in upstreams.items())
    body = {"ready": ready, "upstreams": upstreams, "meter": meter_state, **more}
    return JSONResponse(body, status_code=200 if ready else 503)


def create_app(
    settings: Settings,
    meter: Meter | None = None,
    drive: dict[int, SimulatedGpu] | None = None,
) -> FastAPI:
    """The single-process gateway. Without ``meter`` it builds the one the registry asks for."""
    if meter is None:
        meter, drive = build_meter(settings)
    gw = GatewayState.local(settings, meter, drive or {})
    books = gw.books
    assert books is not None
    app = new_app(gw, lambda: books_running(gw, books))
    add_call_routes(app, gw)
    add_book_routes(app, gw, books)
    return app

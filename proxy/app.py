"""The FastAPI gateway put together: its lifespan, error shapes and CORS (:func:`new_app`), and
:func:`create_app`, the single-process gateway. The routes are :mod:`proxy.routes`; what they
share, :mod:`proxy.gateway_state`. A multi-worker gateway composes the same parts: see
:mod:`proxy.workers`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from wattgate.meter import Meter
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.books import Books
from wattgate.proxy.errors import (
    GatewayError,
    MethodNotAllowed,
    NotFound,
)
from wattgate.proxy.figures import ENERGY_HEADERS
from wattgate.proxy.foreign import ForeignLoadPoller
from wattgate.proxy.gateway_state import GatewayState
from wattgate.proxy.metering import build_meter
from wattgate.proxy.readiness import warn_unreachable
from wattgate.proxy.routes import add_book_routes, add_call_routes, client_request_id
from wattgate.proxy.settings import Settings

log = logging.getLogger("wattgate")

class _ApiCors:
    """CORS for the ``/v1`` API only: ``/metrics`` and the health routes are for operators, not browsers."""

    def __init__(self, app: ASGIApp, /, **options: Any) -> None:
        self.app = app
        self.cors = CORSMiddleware(app, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = scope["type"] == "http" and scope["path"].startswith("/v1/")
        await (self.cors if api else self.app)(scope, receive, send)


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
        return exc.response({"x-request-id": getattr(request.state, "request_id", None) or client_request_id(request)})

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

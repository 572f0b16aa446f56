"""The gateway's routes in two halves: the calls a relay answers itself (:func:`add_call_routes`) and
what whoever keeps the books answers (:func:`add_book_routes`). One process adds both; a
multi-worker gateway adds the first to its workers and the second to its hub."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from wattgate.proxy.books import Books
from wattgate.proxy.calls import request_id_from
from wattgate.proxy.errors import InvalidRequest, NotFound, ServiceUnavailable
from wattgate.proxy.exchange import Exchange, parse
from wattgate.proxy.gateway_state import GatewayState
from wattgate.proxy.ledger_store import StoreUnavailable
from wattgate.proxy.page import add_page_routes
from wattgate.proxy.readiness import ask_upstreams, ready_response
from wattgate.proxy.records import record_key
from wattgate.proxy.totals import GROUPS, parse_duration

log = logging.getLogger("wattgate")

#: What ``GET /v1/energy`` totals by: no ``team`` (a caller sees its own team's records only).
SUMMARY_GROUPS = tuple(g for g in GROUPS if g != "team")


def client_request_id(request: Request) -> str:
    return request_id_from(request.headers.get("x-request-id", ""))


def add_call_routes(app: FastAPI, gw: GatewayState) -> None:
    """The proxied calls, ``/v1/models``, ``/healthz`` and the chat page: what a relay worker answers itself."""
    settings = gw.settings

    async def forward(request: Request, path: str) -> Response:
        request.state.request_id = client_request_id(request)
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
        found = rec.energy if rec is not None and rec.energy else None
        if not found:  # older, or written by another gateway on a shared ledger
            try:
                found = await books.stored(request_id, team, any_team=not gw.keys.on)
            except StoreUnavailable as exc:
                raise _ledger_away(exc) from None
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
        try:
            rows = await books.summary(by, team, since_s)
        except StoreUnavailable as exc:
            raise _ledger_away(exc) from None
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


_READ_FAILURE_LOG_S = 60.0  # polls keep coming while a shared ledger is away: a line a minute, not one each
_read_failure_logged = -_READ_FAILURE_LOG_S


def _ledger_away(exc: StoreUnavailable) -> ServiceUnavailable:
    """A read the ledger could not answer: logged with its cause (it may name the database's host), at
    most once a minute; a 503 without it."""
    global _read_failure_logged
    if (now := time.monotonic()) - _read_failure_logged >= _READ_FAILURE_LOG_S:
        _read_failure_logged = now
        log.warning("ledger: reads fail (%s); GET /v1/energy answers 503 meanwhile", exc)
    return ServiceUnavailable("the ledger cannot answer now; try again shortly")

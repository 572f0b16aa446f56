"""What the routes of one app share: the settings, the caller's checks (keys, body), the upstream
client, and where calls are metered."""

from __future__ import annotations

import logging
import os
from typing import Any

import orjson
from fastapi import Request
from prometheus_client import CollectorRegistry

from wattgate.meter import Meter
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.books import Books
from wattgate.proxy.calls import CallOpener
from wattgate.proxy.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from wattgate.proxy.exchange import TOO_DEEP
from wattgate.proxy.keys import GatewayKeys
from wattgate.proxy.metrics import TeamView
from wattgate.proxy.settings import Model, Settings
from wattgate.proxy.upstream import UpstreamClient

log = logging.getLogger("wattgate")


class GatewayState:
    """What the routes of one app share: the caller's checks, the upstream client, and where calls are
    metered (``calls``: this process's books, or a multi-worker gateway's hub)."""

    def __init__(self, settings: Settings, calls: CallOpener, books: Books | None = None,
                 keys: GatewayKeys | None = None) -> None:
        self.settings = settings
        self.calls = calls
        self.books = books  # None in a worker: the hub keeps them
        self.keys = GatewayKeys.from_settings(settings.gateway.auth) if keys is None else keys
        t = settings.gateway.timeouts
        self.client = UpstreamClient(t.connect_s, t.read_s, settings.gateway.max_connections, t.keepalive_s)

    @classmethod
    def local(cls, settings: Settings, meter: Meter, drive: dict[int, SimulatedGpu]) -> GatewayState:
        """A gateway that keeps its own books (one process, or a multi-worker gateway's hub)."""
        keys = GatewayKeys.from_settings(settings.gateway.auth)
        books = Books(settings, meter, drive, keys.teams)
        for name, model in settings.models.items():
            if model.api_key_env and not os.environ.get(model.api_key_env):
                log.warning("model '%s': $%s is not set, so its upstream gets no key", name, model.api_key_env)
        return cls(settings, books, books, keys)

    def authenticate(self, request: Request) -> str | None:
        """The caller's team alias; None when auth is off (:meth:`GatewayKeys.team`)."""
        return self.keys.team(request.headers.get("authorization", ""))

    def metrics_for(self, request: Request, books: Books) -> CollectorRegistry | TeamView:
        """What the caller may scrape: everything, or with keys on, its own team's series only."""
        team = self.authenticate(request)
        if self.keys.sees_every_team(team):
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

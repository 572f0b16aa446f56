"""The FastAPI gateway: routes, request checks, forwarding and per-request figures."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from wattgate.meter import Fault, Measurement, Meter, MeterFault, Method, RequestWindow, Status
from wattgate.meter.footprint import SiteFactors, UnknownZone, grid_intensity
from wattgate.meter.host import FixedHostPower, HostPower, RaplHostPower
from wattgate.meter.sources import PowerSource
from wattgate.meter.sources.simulated import SimulatedGpu, SimulatedSource
from wattgate.proxy.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from wattgate.proxy.exchange import Exchange, parse
from wattgate.proxy.figures import ENERGY_HEADERS, energy_object
from wattgate.proxy.foreign import ForeignLoadPoller
from wattgate.proxy.ledger import Ledger, default_path, to_row
from wattgate.proxy.metrics import Metrics, TeamView
from wattgate.proxy.records import Records, record_key
from wattgate.proxy.settings import ConfigError, Model, Settings, load_keys
from wattgate.proxy.upstream import ERRORS as UPSTREAM_ERRORS
from wattgate.proxy.upstream import UpstreamClient

log = logging.getLogger("wattgate")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Settled records kept in memory with the ledger on (it answers for older ones): about 1 KB each.
RECENT_WITH_LEDGER = 1_000


def site_factors(settings: Settings) -> SiteFactors:
    s = settings.site
    if s.grid_intensity_g_per_kwh is not None:
        intensity, source = s.grid_intensity_g_per_kwh, "override"
    else:
        try:
            intensity, source = grid_intensity(s.grid_zone), f"codecarbon:{s.grid_zone}"
        except UnknownZone as exc:
            raise ConfigError(f"site.grid_zone: {exc}") from None
    return SiteFactors(s.grid_zone, intensity, s.pue, s.wue_site_l_per_kwh, s.water_grid_l_per_kwh, source)


def build_meter(
    settings: Settings, simulated_gpus: dict[int, SimulatedGpu] | None = None
) -> tuple[Meter, dict[int, SimulatedGpu]]:
    """The meter the registry asks for; NVML missing degrades to estimates, loudly.

    Also returns the simulated GPUs the gateway must drive itself (begin/end of each request).
    ``simulated_gpus``: for ``source: simulated``, GPUs whose load something else drives (the
    demo's and tests' simulated upstream); none then for the gateway to drive.
    """
    m = settings.meter
    gpus = settings.metered_gpus
    simulated: dict[int, SimulatedGpu] = {}
    source: PowerSource | None = None
    init_fault = None
    if m.source == "simulated":
        if simulated_gpus is None:
            simulated = {g: SimulatedGpu() for g in gpus}
        source = SimulatedSource(simulated if simulated_gpus is None else simulated_gpus)
    elif m.source == "nvml" and gpus:
        from wattgate.meter.sources.nvml import NvmlSource

        try:
            source = NvmlSource(gpus, m.mig)
        except MeterFault as exc:
            log.warning("meter: %s; all figures will be estimates", exc)
            init_fault = exc.kind
    meter = Meter(
        source,
        gpus,
        host=_host_power(settings),
        interval_s=m.interval_ms / 1000,
        idle=m.idle,
        settle_lag_s=m.settle_lag_ms / 1000,
        stale_after_s=m.stale_after_ms / 1000,
        counter_every_s=None if m.counter_interval_ms == "auto" else m.counter_interval_ms / 1000 or None,
        counter_cpu_budget=m.counter_cpu_budget if m.counter_interval_ms == "auto" else None,
        power_lag_s=m.power_lag_ms / 1000,
    )
    if init_fault:
        meter.errors[init_fault] += 1
    return meter, simulated


def _host_power(settings: Settings) -> HostPower | None:
    host = settings.meter.host
    if host.source == "fixed":
        return FixedHostPower(host.watts_per_gpu)
    if host.source == "rapl":
        try:
            return RaplHostPower()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"meter.host.source: rapl: {exc}") from None
    return None


class GatewayState:
    """State shared by the routes of one app."""

    def __init__(self, settings: Settings, meter: Meter, drive: dict[int, SimulatedGpu]) -> None:
        self.settings = settings
        self.site = site_factors(settings)
        self.meter = meter
        self.drive = drive  # simulated GPUs whose load follows the gateway's requests
        self.keys = load_keys(settings.gateway.auth)
        self.metrics_aliases = frozenset(settings.gateway.auth.metrics_aliases)
        if unknown := self.metrics_aliases - set(self.keys.values()):
            raise ConfigError(f"gateway.auth.metrics_aliases: no key has the alias {', '.join(sorted(unknown))}")
        teams = sorted(set(self.keys.values()) - self.metrics_aliases)
        self.metrics = Metrics(settings.models, meter, teams=teams)
        with_ledger = settings.ledger.enabled
        self.records = Records(min(settings.gateway.recent_records, RECENT_WITH_LEDGER) if with_ledger
                               else settings.gateway.recent_records)
        self.in_flight: Counter[str] = Counter()  # gateway requests open per registry model
        for kind, n in meter.errors.items():
            self.metrics.meter_errors.labels(kind).inc(n)
        self.ledger = (
            Ledger(settings.ledger.path or default_path(), settings.ledger.queue_size, self.metrics.ledger_dropped.inc)
            if settings.ledger.enabled
            else None
        )
        self.estimates = Meter(None)  # windows for when the meter itself fails
        self.estimates.on_settled = self.settled
        meter.on_settled = self.settled
        meter.on_error = lambda kind: self.metrics.meter_errors.labels(kind).inc()
        t = settings.gateway.timeouts
        self.client = UpstreamClient(t.connect_s, t.read_s, settings.gateway.max_connections)
        for name, model in settings.models.items():
            if model.api_key_env and not os.environ.get(model.api_key_env):
                log.warning("model '%s': $%s is not set, so its upstream gets no key", name, model.api_key_env)

    # -- settled figures (called from the meter's thread) ------------------------

    def settled(self, m: Measurement) -> None:
        rec = self.records.get(m.request_id)  # the window is named by the record's key
        if rec is None:
            return
        energy = energy_object(m, self.site, rec.request_id)
        if self.ledger is None:
            self.records.update(m.request_id, energy)
        else:
            # The API calls a record settled only once it is durable: a crash loses no settled record.
            gpu_joules = {g: round(j, 6) for g, j in m.joules_by_gpu.items() if g >= 0}
            row = to_row(energy, rec.model, rec.team, time.time(), gpu_joules)
            self.ledger.submit(row, after=lambda: self.records.update(m.request_id, energy))
        # Metrics after the record: if they fail, the record is kept all the same.
        mx = self.metrics
        # Other sources (a trace in tests, a benchmark's) count with the simulated figures: not measurements.
        method = m.method if m.method in (Method.NVML, Method.ESTIMATE) else Method.SIMULATED
        mx.energy.labels(rec.model, method).observe(m.joules)
        if m.completion_tokens:
            mx.per_token.labels(rec.model).observe(m.joules / m.completion_tokens)
        mx.carbon.labels(rec.model).inc(energy["gco2e"])
        mx.water.labels(rec.model).inc(energy["water_ml"] / 1000)
        if rec.team is not None:
            mx.team_energy.labels(rec.team).inc(m.joules)
            mx.team_carbon.labels(rec.team).inc(energy["gco2e"])
            mx.team_water.labels(rec.team).inc(energy["water_ml"] / 1000)

    # -- request handling --------------------------------------------------------

    def authenticate(self, request: Request) -> str | None:
        """The caller's team alias; None when auth is off."""
        if not self.keys:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        alias = self.keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if alias is None:
            raise Unauthorized("missing or unknown gateway API key")
        return alias

    def metrics_for(self, request: Request) -> CollectorRegistry | TeamView:
        """What the caller may scrape: everything, or with keys on, its own team's series only."""
        team = self.authenticate(request)
        if team is None or team in self.metrics_aliases:
            return self.metrics.registry
        return TeamView(self.metrics.registry, team)

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
        except orjson.JSONDecodeError:
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

    async def open_record(
        self, request_id: str, client_chose: bool, name: str, team: str | None
    ) -> tuple[str, str]:
        """Open the record of ``team``'s request under ``request_id``, or under a new id when that one
        already names one of the team's records (a client reusing its ids must not overwrite what was
        metered); the id used and the record's key. Other teams' ids are not looked at: two teams may
        send the same id, and neither learns of the other's."""
        if client_chose and await self.stored(request_id, team) is not None:
            request_id = _new_request_id()
        while (key := self.records.open(request_id, name, team)) is None:
            request_id = _new_request_id()
        return request_id, key

    async def stored(self, request_id: str, team: str | None) -> dict[str, Any] | None:
        """The ledger's record of ``team``'s ``request_id`` (any team's when keys are off), read off
        the event loop (a commit may hold the database)."""
        if self.ledger is None:
            return None
        return await asyncio.to_thread(self.ledger.get, request_id, team, any_team=not self.keys)

    def begin(self, request_id: str, name: str, model: Model, prompt_tokens: int) -> RequestWindow:
        self.in_flight[name] += 1
        for g in model.gpus:
            if g in self.drive:
                self.drive[g].begin_sequence()
        kwargs = {
            "prompt_tokens": prompt_tokens,
            "prefill_weight": model.prefill_weight,
            "active_params_b": model.estimate.active_params_b,
        }
        try:
            return self.meter.begin(request_id, model.gpus, **kwargs)  # type: ignore[arg-type]
        except Exception:  # metering never fails a request: fall back to an estimate
            log.exception("meter failed to open a window")
            self.metrics.meter_errors.labels(Fault.INTERNAL).inc()
            return self.estimates.begin(request_id, model.gpus, **kwargs)  # type: ignore[arg-type]

    def method_for(self, model: Model) -> Method:
        """The method a call to ``model`` starting now is metered by."""
        return self.meter.method_for(model.gpus)

    def finish(self, name: str, model: Model, m: Measurement, status: Status, forwarded_at: float) -> dict[str, Any]:
        self.in_flight[name] -= 1
        for g in model.gpus:
            if g in self.drive:
                self.drive[g].end_sequence()
        mx = self.metrics
        mx.requests.labels(name, status).inc()
        mx.tokens.labels(name, "prompt").inc(m.prompt_tokens)
        mx.tokens.labels(name, "completion").inc(m.completion_tokens)
        mx.latency.labels(name).observe(time.monotonic() - forwarded_at)
        rec = self.records.get(m.request_id)  # the window is named by the record's key
        energy = energy_object(m, self.site, None if rec is None else rec.request_id)
        if m.settled and self.ledger is not None:
            # Final already (an estimate), but the API says settled only once the ledger has it.
            self.records.update(m.request_id, {**energy, "settled": False})
            return energy
        rec = self.records.update(m.request_id, energy)
        return rec.energy if rec is not None and rec.energy else energy


class _ApiCors:
    """CORS for the ``/v1`` API only: ``/metrics`` and the health routes are for operators, not browsers."""

    def __init__(self, app: ASGIApp, /, **options: Any) -> None:
        self.app = app
        self.cors = CORSMiddleware(app, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = scope["type"] == "http" and scope["path"].startswith("/v1/")
        await (self.cors if api else self.app)(scope, receive, send)


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else _new_request_id()


def _new_request_id() -> str:
    return f"wg-{uuid.uuid4().hex}"


async def _probe_loop_lag(observe: Callable[[float], None], period_s: float = 0.5) -> None:
    """Observe how late a sleep wakes up: the time callbacks wait for the busy loop."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        observe(max(loop.time() - due, 0.0))


def create_app(
    settings: Settings,
    meter: Meter | None = None,
    drive: dict[int, SimulatedGpu] | None = None,
) -> FastAPI:
    """The gateway app. Without ``meter`` it builds the one the registry asks for."""
    if meter is None:
        meter, drive = build_meter(settings)
    gw = GatewayState(settings, meter, drive or {})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.client.open()
        gw.meter.start()
        poller = None
        if settings.meter.foreign_poll_ms and gw.meter.sampler is not None:
            foreign = ForeignLoadPoller(
                gw.client, gw.meter, settings.models, settings.served_name, gw.in_flight,
                settings.meter.foreign_poll_ms / 1000,
            )
            poller = asyncio.create_task(foreign.run())
        lag_probe = asyncio.create_task(_probe_loop_lag(gw.metrics.loop_lag.observe))
        try:
            yield
        finally:
            lag_probe.cancel()
            if poller is not None:
                poller.cancel()
            await gw.client.close()
            gw.meter.stop()  # settles what it can: those records still reach the ledger
            if gw.ledger is not None:
                gw.ledger.close()

    app = FastAPI(title="wattgate", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gw
    if settings.gateway.cors_allow_origins:
        app.add_middleware(
            _ApiCors,
            allow_origins=settings.gateway.cors_allow_origins,
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
        err = InvalidRequest(f"method {request.method} not allowed on {request.url.path}")
        err.status = 405
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # One line here: Starlette hands the exception on to the server, which logs its traceback.
        log.error("unexpected %s on %s", type(exc).__name__, request.url.path)
        return GatewayError("internal gateway error").response()

    async def forward(request: Request, path: str) -> Response:
        request.state.request_id = _request_id(request)
        team = gw.authenticate(request)
        try:
            body = await gw.read_json(request)
        except ClientDisconnect:  # left while sending its body: nothing was opened, nobody to answer
            return Response(status_code=499)
        call = parse(settings, path, body)
        given = request.headers.get("x-request-id")
        request_id, key = await gw.open_record(
            request.state.request_id, request.state.request_id == given, call.name, team
        )
        request.state.request_id = request_id
        window = gw.begin(key, call.name, call.model, call.prompt_tokens)  # named by the key: unique across teams
        return await Exchange(gw, call, request_id, key, window).run(request.receive)

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

    @app.get("/v1/energy/{request_id}")
    async def energy(request_id: str, request: Request) -> Response:
        team = gw.authenticate(request)
        rec = gw.records.get(record_key(team, request_id))
        found = rec.energy if rec is not None and rec.energy else await gw.stored(request_id, team)
        if not found:
            raise NotFound(f"no energy record for request '{request_id}'")
        return JSONResponse(found)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        exposition = generate_latest(gw.metrics_for(request))  # type: ignore[arg-type]  # a view collects too
        return Response(exposition, media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        upstreams: dict[str, bool] = {}
        for name, model in settings.models.items():
            try:
                status, _ = await gw.client.get(f"{model.base_url}/models", gw.upstream_headers(model, "readyz"), 5.0)
                upstreams[name] = status < 500
            except UPSTREAM_ERRORS:
                upstreams[name] = False
        meter_state = gw.meter.state()
        ready = all(upstreams.values())
        body = {"ready": ready, "upstreams": upstreams, "meter": meter_state}
        return JSONResponse(body, status_code=200 if ready else 503)

    return app

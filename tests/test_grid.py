"""Live grid intensity: Electricity Maps and WattTime as fake servers on localhost that speak their documented
shapes, errors and rate limits; the feed's choice of figure over time; and an outage behind a running gateway."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.conftest import SERVED, settled_records, wait_until
from wattgate.meter.footprint import GridIntensity
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.app import create_app
from wattgate.proxy.grid import ElectricityMaps, GridFeed, WattTime
from wattgate.proxy.serving import ServerThread
from wattgate.proxy.settings import LedgerSettings, MeterSettings, Model, Settings, Site
from wattgate.proxy.simulated_upstream import SimulatedUpstream

STATIC = GridIntensity(56.039, "codecarbon", "average", "FRA")
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class FakeProviders:
    """Electricity Maps and WattTime on one local server; ``mode`` picks what they answer."""

    mode: str = "ok"  # ok | 500 | 429 | not-json | bad-value
    em_value: Any = 123.0
    em_time: float | None = T0  # the figures' time; None: the moment of the answer (a live feed)
    moer_lbs: Any = 1000.0
    expire_token_once: bool = False
    logins: int = 0
    calls: list[str] = field(default_factory=list)

    def _time(self) -> float:
        return time.time() if self.em_time is None else self.em_time

    def _fault(self) -> Response | None:
        if self.mode == "500":
            return PlainTextResponse("upstream trouble", status_code=500)
        if self.mode == "429":
            return JSONResponse({"message": "too many requests"}, status_code=429, headers={"retry-after": "120"})
        if self.mode == "not-json":
            return PlainTextResponse("<html>maintenance</html>")
        return None

    async def em_latest(self, request: Request) -> Response:
        self.calls.append(f"em {request.query_params.get('zone')}")
        if request.headers.get("auth-token") != "em-token":
            return JSONResponse({"message": "invalid auth-token"}, status_code=401)
        if fault := self._fault():
            return fault
        value = "lots" if self.mode == "bad-value" else self.em_value
        return JSONResponse({"zone": request.query_params["zone"], "carbonIntensity": value,
                             "datetime": iso(self._time()), "updatedAt": iso(self._time() + 60),
                             "emissionFactorType": "lifecycle", "isEstimated": False, "temporalGranularity": "hourly"})

    async def wt_login(self, request: Request) -> Response:
        if request.headers.get("authorization") != "Basic " + base64.b64encode(b"wt-user:wt-pass").decode():
            return JSONResponse({"message": "bad login"}, status_code=403)
        self.logins += 1
        return JSONResponse({"token": f"token-{self.logins}"})

    async def wt_forecast(self, request: Request) -> Response:
        q = request.query_params
        self.calls.append(f"wt {q.get('region')} {q.get('signal_type')} {q.get('horizon_hours')}")
        token = request.headers.get("authorization", "")
        if self.expire_token_once and token == "Bearer token-1":
            self.expire_token_once = False
            return JSONResponse({"message": "token expired"}, status_code=401)
        if not token.startswith("Bearer token-"):
            return JSONResponse({"message": "no token"}, status_code=401)
        if fault := self._fault():
            return fault
        value = None if self.mode == "bad-value" else self.moer_lbs
        return JSONResponse({"data": [{"point_time": iso(self._time()), "value": value}],
                             "meta": {"region": q["region"], "signal_type": "co2_moer", "units": "lbs_co2_per_mwh",
                                      "generated_at": iso(self._time())}})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v3/carbon-intensity/latest", self.em_latest),
                                 Route("/login", self.wt_login), Route("/v3/forecast", self.wt_forecast)])


@pytest.fixture
def providers() -> Iterator[tuple[FakeProviders, str]]:
    fake = FakeProviders()
    with ServerThread(fake.app()) as srv:
        yield fake, srv.url


def poll(feed: GridFeed) -> float:
    async def once() -> float:
        async with aiohttp.ClientSession() as http:
            return await feed.poll_once(http)

    return asyncio.run(once())


def test_electricity_maps_latest_is_the_figure_in_force(providers):
    fake, url = providers
    feed = GridFeed(STATIC, ElectricityMaps("FR", "em-token", url), poll_s=300, max_age_s=3600, clock=lambda: T0)
    assert poll(feed) == 300
    assert fake.calls == ["em FR"]
    now = feed.at(T0 + 600)
    assert now == GridIntensity(123.0, "electricitymaps", "average", "FR", T0, estimated=False)
    assert feed.at(T0 + 3601) == GridIntensity(56.039, "codecarbon", "average", "FRA", fallback="electricitymaps")
    fake.em_value, fake.em_time = 200.0, T0 + 3600
    poll(feed)
    assert feed.at(T0 + 1800).g_per_kwh == 123.0  # a request's own time picks the figure then in force
    assert feed.at(T0 + 3700).g_per_kwh == 200.0


def test_watttime_marginal_rate_in_grams_per_kwh_and_a_new_token_when_one_expires(providers):
    fake, url = providers
    feed = GridFeed(STATIC, WattTime("CAISO_NORTH", "wt-user", "wt-pass", url), poll_s=300, clock=lambda: T0)
    fake.expire_token_once = True
    poll(feed)
    figure = feed.at(T0)
    assert (figure.source, figure.signal, figure.zone, figure.at) == ("watttime", "marginal", "CAISO_NORTH", T0)
    assert figure.g_per_kwh == pytest.approx(453.592)  # 1,000 lb per MWh
    assert fake.logins == 2 and fake.calls == ["wt CAISO_NORTH co2_moer 0"] * 2
    poll(feed)
    assert fake.logins == 2  # the token is kept while it lasts


@pytest.mark.parametrize(("mode", "why"), [("500", "HTTP 500"), ("not-json", "not JSON"),
                                           ("bad-value", "not a carbon intensity"), ("429", "HTTP 429")])
def test_a_failing_provider_leaves_the_zones_average_in_place_and_says_why(providers, mode, why):
    fake, url = providers
    errors: list[str] = []
    feed = GridFeed(STATIC, ElectricityMaps("FR", "em-token", url), poll_s=300, on_error=errors.append,
                    clock=lambda: T0)
    fake.mode = mode
    wait = poll(feed)
    assert errors == ["electricitymaps"] and why in (feed.last_error or "")
    assert feed.at(T0) == GridIntensity(56.039, "codecarbon", "average", "FRA", fallback="electricitymaps")
    assert wait == 300  # a retry-after (120 s) shorter than the poll: the poll is kept
    slow = GridFeed(STATIC, ElectricityMaps("FR", "em-token", url), poll_s=60, clock=lambda: T0)
    assert poll(slow) == (120 if mode == "429" else 60)  # ... a longer one is honoured


def test_a_wrong_key_and_a_provider_that_is_down_are_failures_too(providers):
    _, url = providers
    feed = GridFeed(STATIC, ElectricityMaps("FR", "wrong", url), poll_s=300, clock=lambda: T0)
    poll(feed)
    assert "HTTP 401" in (feed.last_error or "")
    down = GridFeed(STATIC, ElectricityMaps("FR", "em-token", "http://127.0.0.1:9", timeout_s=1), poll_s=300)
    poll(down)
    assert down.last_error and down.at().fallback == "electricitymaps"
    bad_login = GridFeed(STATIC, WattTime("CAISO_NORTH", "wt-user", "nope", url), poll_s=300)
    poll(bad_login)
    assert "HTTP 403" in (bad_login.last_error or "")


def test_without_a_provider_the_zones_average_is_used_as_is():
    feed = GridFeed(STATIC)
    assert feed.at() is STATIC and feed.state()["source"] == "codecarbon"


def test_an_outage_behind_the_gateway_fails_no_request_and_every_figure_says_what_it_used(providers, tmp_path,
                                                                                           monkeypatch):
    fake, url = providers
    fake.em_time = None  # always the latest figure
    monkeypatch.setenv("WG_EM_TOKEN", "em-token")
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED, default_max_tokens=4)) as up:
        settings = Settings(
            site=Site(grid_zone="FRA", grid_provider={"source": "electricitymaps", "zone": "FR", "base_url": url,
                                                      "api_key_env": "WG_EM_TOKEN", "poll_s": 1, "max_age_s": 3}),
            meter=MeterSettings(source="simulated", settle_lag_ms=200),
            ledger=LedgerSettings(path=tmp_path / "ledger.db"),
            models={"llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])},
        )
        with ServerThread(create_app(settings)) as gw:
            def call() -> httpx.Response:
                r = httpx.post(f"{gw.url}/v1/chat/completions",
                               json={"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
                return r

            wait_until(lambda: httpx.get(f"{gw.url}/readyz").json()["grid"]["source"] == "electricitymaps",
                       timeout=10, what="the provider's first figure")
            live = call()
            assert live.headers["x-grid-intensity-source"].startswith("electricitymaps; signal=average; at=")
            assert float(live.headers["x-grid-intensity"]) == 123.0
            assert live.json()["energy"]["grid"]["location"]["source"] == "electricitymaps"

            fake.mode = "500"  # down: the last figure stays in force until it is 3 s old
            assert float(call().headers["x-grid-intensity"]) == 123.0
            fake.mode = "bad-value"
            wait_until(lambda: httpx.get(f"{gw.url}/readyz").json()["grid"]["fallback_for"] == "electricitymaps",
                       timeout=10, what="the figure to age out")
            stale = call()
            assert stale.headers["x-grid-intensity-source"] == "codecarbon; signal=average; fallback-for=electricitymaps"
            assert float(stale.headers["x-grid-intensity"]) == pytest.approx(56.039)
            ready = httpx.get(f"{gw.url}/readyz").json()
            assert ready["ready"] and "not a carbon intensity" in ready["grid"]["last_error"]
            errors = [line for line in httpx.get(f"{gw.url}/metrics").text.splitlines()
                      if line.startswith("wattgate_grid_errors_total")]
            assert errors and float(errors[0].split()[-1]) >= 2

            ids = [live.headers["x-request-id"], stale.headers["x-request-id"]]
            records = settled_records(gw.url, ids)
            assert records[ids[0]]["grid"]["location"]["source"] == "electricitymaps"  # settled with its own time's
            assert records[ids[1]]["grid"]["location"]["fallback_for"] == "electricitymaps"
            for r in records.values():
                assert r["gco2e"] == pytest.approx(r["gco2e_location"])


def test_a_changing_intensity_reaches_each_requests_headers_and_ledger_row(providers, tmp_path, monkeypatch):
    fake, url = providers
    fake.em_time = None
    monkeypatch.setenv("WG_EM_TOKEN", "em-token")
    ledger = tmp_path / "ledger.db"
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED, default_max_tokens=4)) as up:
        settings = Settings(
            site=Site(grid_zone="FRA", grid_provider={"source": "electricitymaps", "zone": "FR", "base_url": url,
                                                      "api_key_env": "WG_EM_TOKEN", "poll_s": 1}),
            meter=MeterSettings(source="simulated", settle_lag_ms=200),
            ledger=LedgerSettings(path=ledger),
            models={"llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])},
        )
        with ServerThread(create_app(settings)) as gw:
            seen: dict[str, float] = {}
            for value in (150.0, 310.0, 75.0):
                fake.em_value = value
                wait_until(lambda v=value: httpx.get(f"{gw.url}/readyz").json()["grid"]["g_per_kwh"] == v,
                           timeout=10, what=f"the provider's figure {value}")
                r = httpx.post(f"{gw.url}/v1/chat/completions",
                               json={"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
                assert float(r.headers["x-grid-intensity"]) == value
                assert r.headers["x-grid-intensity-source"].startswith("electricitymaps; signal=average; at=")
                seen[r.headers["x-request-id"]] = value
            settled_records(gw.url, list(seen))
    from wattgate.proxy.ledger import Ledger
    from wattgate.proxy.ledger_file import SqliteStore

    stored = Ledger(SqliteStore(ledger))
    try:
        for rid, value in seen.items():
            row = stored.get(rid)
            assert row is not None and row["settled"]
            assert (row["grid_source"], row["grid_location_g_per_kwh"]) == ("electricitymaps", value)
            assert row["grid"]["location"]["estimated"] is False  # Electricity Maps' isEstimated, kept
            assert row["gco2e_location"] == pytest.approx(row["joules"] / 3.6e6 * row["pue"] * value, abs=1e-9)
    finally:
        stored.close()

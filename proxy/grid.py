"""Live grid carbon intensity: Electricity Maps or WattTime, polled in the background, never on a request's path.

A :class:`GridFeed` keeps the figures a provider gave and answers, for a moment,
the one in force then (:meth:`GridFeed.at`). When the provider fails, or its
latest figure is older than ``max_age_s``, the zone's annual average (CodeCarbon)
stands in, marked with the provider it stands in for: every figure says what it
used.

- Electricity Maps API v3: ``GET {base}/v3/carbon-intensity/latest?zone=Z``
  with an ``auth-token`` header; ``carbonIntensity`` (gCO2eq/kWh, location-based
  average) for the hour at ``datetime``.
- WattTime API v3: a token from ``GET {base}/login`` (HTTP basic auth; it
  lasts 30 minutes), then ``GET {base}/v3/forecast?region=R&signal_type=co2_moer
  &horizon_hours=0``: the marginal rate (MOER) now, in lbs CO2 per MWh
  (x 0.453592 = g per kWh), for the five minutes at ``point_time``.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

import aiohttp
import orjson

from wattgate.meter.footprint import GridIntensity
from wattgate.proxy.settings import GridProviderSettings

log = logging.getLogger(__name__)

G_PER_KWH_PER_LB_PER_MWH = 0.453592  # 1 lb = 453.592 g; per MWh -> per kWh: / 1000
MAX_G_PER_KWH = 3000.0  # above any grid's figure (coal alone is about 1,000): a bigger one is bad data
HISTORY = 2000  # figures kept: 7 days of WattTime's 5-minute ones at a 5-minute poll


class ProviderError(Exception):
    """A provider's answer that gives no usable figure: its HTTP ``status`` when that was the fault,
    ``retry_after_s`` when it asked to wait (429)."""

    def __init__(self, message: str, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class Provider(Protocol):
    name: str

    async def latest(self, http: aiohttp.ClientSession) -> GridIntensity: ...


def _parse_time(text: object) -> float:
    if not isinstance(text, str):
        raise ProviderError(f"no timestamp: {text!r}")
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ProviderError(f"not an ISO timestamp: {text!r}") from None


def _intensity(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_G_PER_KWH \
            or not math.isfinite(value):
        raise ProviderError(f"not a carbon intensity: {value!r}")
    return float(value)


async def _get_json(http: aiohttp.ClientSession, url: str, timeout_s: float, headers: dict[str, str] | None = None,
                    params: dict[str, str] | None = None, auth: aiohttp.BasicAuth | None = None) -> Any:
    async with http.get(url, headers=headers, params=params, auth=auth,
                        timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
        body = await r.read()
        if r.status == 429:
            retry = r.headers.get("retry-after", "")
            raise ProviderError("HTTP 429 (rate limited)", 429, float(retry) if retry.isdigit() else None)
        if r.status != 200:
            raise ProviderError(f"HTTP {r.status}", r.status)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProviderError("the answer is not JSON") from None


@dataclass
class ElectricityMaps:
    """Electricity Maps' latest figure for a zone: location-based, average."""

    zone: str
    token: str
    base_url: str = "https://api.electricitymaps.com"
    timeout_s: float = 10.0
    name: str = "electricitymaps"

    async def latest(self, http: aiohttp.ClientSession) -> GridIntensity:
        data = await _get_json(http, f"{self.base_url}/v3/carbon-intensity/latest", self.timeout_s,
                               {"auth-token": self.token}, {"zone": self.zone})
        if not isinstance(data, dict):
            raise ProviderError("the answer is not an object")
        estimated = data.get("isEstimated")
        return GridIntensity(_intensity(data.get("carbonIntensity")), self.name, "average",
                             str(data.get("zone") or self.zone), _parse_time(data.get("datetime")),
                             estimated=estimated if isinstance(estimated, bool) else None)


@dataclass
class WattTime:
    """WattTime's marginal rate now for a region (its forecast at horizon 0), in g per kWh."""

    region: str
    username: str
    password: str
    base_url: str = "https://api.watttime.org"
    timeout_s: float = 10.0
    name: str = "watttime"
    _token: str | None = None
    _token_at: float = 0.0

    async def _login(self, http: aiohttp.ClientSession) -> str:
        data = await _get_json(http, f"{self.base_url}/login", self.timeout_s,
                               auth=aiohttp.BasicAuth(self.username, self.password))
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise ProviderError("login gave no token")
        self._token, self._token_at = token, time.monotonic()
        return token

    async def latest(self, http: aiohttp.ClientSession) -> GridIntensity:
        if self._token is None or time.monotonic() - self._token_at > 25 * 60:  # tokens last 30 minutes
            await self._login(http)
        url = f"{self.base_url}/v3/forecast"
        params = {"region": self.region, "signal_type": "co2_moer", "horizon_hours": "0"}
        try:
            data = await _get_json(http, url, self.timeout_s, {"authorization": f"Bearer {self._token}"}, params)
        except ProviderError as exc:
            if exc.status != 401:
                raise
            token = await self._login(http)  # expired early: once more with a new one
            data = await _get_json(http, url, self.timeout_s, {"authorization": f"Bearer {token}"}, params)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list) or not data["data"]:
            raise ProviderError("no data points")
        units = (data.get("meta") or {}).get("units")
        if units != "lbs_co2_per_mwh":
            raise ProviderError(f"unexpected units {units!r}")
        point = data["data"][0]
        if not isinstance(point, dict):
            raise ProviderError("a data point is not an object")
        lbs = point.get("value")
        if isinstance(lbs, bool) or not isinstance(lbs, int | float):
            raise ProviderError(f"not a rate: {lbs!r}")
        return GridIntensity(_intensity(lbs * G_PER_KWH_PER_LB_PER_MWH), self.name, "marginal", self.region,
                             _parse_time(point.get("point_time")))


def provider_from(settings: GridProviderSettings, environ: dict[str, str] | None = None) -> Provider | None:
    """The provider the registry names (None for ``static``); its keys come from the environment."""
    env = os.environ if environ is None else environ
    if settings.source == "electricitymaps":
        assert settings.zone is not None
        return ElectricityMaps(settings.zone, env.get(settings.api_key_env or "", ""),
                               settings.base_url or ElectricityMaps.base_url, settings.timeout_s)
    if settings.source == "watttime":
        assert settings.zone is not None
        return WattTime(settings.zone, env.get(settings.username_env, ""), env.get(settings.password_env, ""),
                        settings.base_url or WattTime.base_url, settings.timeout_s)
    return None


class GridFeed:
    """The figures of one provider over time, and the static figure that stands in for them."""

    def __init__(self, static: GridIntensity, provider: Provider | None = None, poll_s: float = 300.0,
                 max_age_s: float = 7200.0, on_error: Callable[[str], object] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.static = static
        self.provider = provider
        self.poll_s = poll_s
        self.max_age_s = max_age_s
        self.on_error = on_error
        self.clock = clock
        self._times: list[float] = []  # the figures' own times, ascending
        self._figures: list[GridIntensity] = []
        self.last_error: str | None = None

    def add(self, figure: GridIntensity) -> None:
        """Keep a provider's figure (a repeat of one already kept changes nothing)."""
        assert figure.at is not None
        i = bisect.bisect_left(self._times, figure.at)
        if i < len(self._times) and self._times[i] == figure.at:
            self._figures[i] = figure
        else:
            self._times.insert(i, figure.at)
            self._figures.insert(i, figure)
            if len(self._times) > HISTORY:
                del self._times[0], self._figures[0]
        self.last_error = None

    def at(self, t: float | None = None) -> GridIntensity:
        """The figure in force at ``t`` (Unix time; now by default): the provider's latest one from
        no later than ``t`` and less than ``max_age_s`` old, else the static one marked as standing in."""
        if self.provider is None:
            return self.static
        t = self.clock() if t is None else t
        i = bisect.bisect_right(self._times, t) - 1
        if i < 0 and self._times and self._times[0] - t < self.poll_s:
            i = 0  # a figure stamped a little after t (the provider's clock ahead): still the one in force
        if i >= 0 and t - self._times[i] <= self.max_age_s:
            return self._figures[i]
        return replace(self.static, fallback=self.provider.name)

    async def poll_once(self, http: aiohttp.ClientSession) -> float:
        """Ask the provider once; the seconds to wait before asking again."""
        assert self.provider is not None
        try:
            self.add(await self.provider.latest(http))
        except (ProviderError, aiohttp.ClientError, TimeoutError) as exc:
            self.last_error = f"{self.provider.name}: {exc or type(exc).__name__}"
            log.warning("grid intensity: %s; the zone's annual average stands in", self.last_error)
            if self.on_error is not None:
                self.on_error(self.provider.name)
            retry = exc.retry_after_s if isinstance(exc, ProviderError) else None
            if retry is not None:
                return min(max(retry, self.poll_s), 3600.0)
        return self.poll_s

    async def run(self) -> None:
        """Poll until cancelled (a background task of the books)."""
        if self.provider is None:
            return
        async with aiohttp.ClientSession(trust_env=True) as http:
            while True:
                await asyncio.sleep(await self.poll_once(http))

    def state(self) -> dict[str, Any]:
        """For ``/readyz``: the figure in force now and how the provider is doing."""
        now = self.at()
        return {"source": now.source, "signal": now.signal, "g_per_kwh": now.g_per_kwh,
                "fallback_for": now.fallback, "last_error": self.last_error}

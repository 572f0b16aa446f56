"""Embodied carbon per request: the hardware's manufacturing emissions pro-rated by the GPU time the request
had, split as its energy is (not EcoLogits' fixed batch of 64), with hand-computed figures."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import settled_records
from wattgate.meter.footprint import J_PER_KWH, Embodied, GridIntensity, SiteFactors, footprint
from wattgate.proxy.registry_file import parse_settings

MSG = [{"role": "user", "content": "hi"}]


def test_one_gpu_hour_of_embodied_carbon_by_hand():
    # EcoLogits 0.11: 273 kg per GPU, 5,700 kg per 8-GPU server, 3 years of 365 days.
    per_second = (273 + 5700 / 8) * 1000 / (3 * 365 * 86400)
    assert Embodied().g_per_gpu_second == pytest.approx(per_second)
    site = SiteFactors("FRA", GridIntensity(56.0, "codecarbon", "average", "FRA"), None, 1.2, 0.5, 3.1)
    f = footprint(J_PER_KWH, site, gpu_seconds=3600)
    assert f.embodied_gco2e == pytest.approx(37.5) and f.gco2e == pytest.approx(1.2 * 56.0)  # apart from operational


def test_the_registry_sets_the_hardware():
    from wattgate.proxy.metering import site_factors

    s = parse_settings("site: {hardware: {gpu_embodied_kgco2e: 164, server_embodied_kgco2e: 2400, gpus_per_server: 4,"
                       " lifetime_years: 5}}\nmodels: {a: {upstream: 'http://x/v1'}}\n")
    assert site_factors(s).embodied.g_per_gpu_second == pytest.approx((164 + 600) * 1000 / (5 * 365 * 86400))


async def _calls(url: str, n: int, stream: bool) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        async def one() -> str:
            r = await c.post("/v1/chat/completions", json={"model": "llama", "messages": MSG, "max_tokens": 16,
                                                           "stream": stream})
            return r.headers["x-request-id"]

        return await asyncio.gather(*(one() for _ in range(n)))


def test_a_lone_request_has_its_whole_window_and_a_batch_shares_it(stack):
    per_second = Embodied().g_per_gpu_second
    [lone] = asyncio.run(_calls(stack.url, 1, stream=False))
    rec = settled_records(stack.url, [lone])[lone]
    assert rec["gpu_seconds"] == pytest.approx(rec["window_ms"] / 1000, rel=0.02, abs=0.002)
    assert rec["embodied_gco2e"] == pytest.approx(rec["gpu_seconds"] * per_second, rel=1e-4)  # (us rounding)
    assert rec["gco2e"] == pytest.approx(rec["gco2e_location"])  # embodied is not in the operational figure

    batch = asyncio.run(_calls(stack.url, 4, stream=True))
    recs = settled_records(stack.url, batch)
    # Four at once: each has about a quarter of the time they shared, not EcoLogits' 1/64.
    for r in recs.values():
        assert r["gpu_seconds"] == pytest.approx(r["window_ms"] / 1000 / 4, rel=0.25)
    shared = sum(r["gpu_seconds"] for r in recs.values())
    longest = max(r["window_ms"] for r in recs.values()) / 1000
    # Together they hold the time the GPU was busy with them, once: about the longest window (their starts
    # are a few ms apart; tests/test_attribution.py proves the split conserves time exactly).
    assert 0.9 * longest <= shared <= 1.25 * longest

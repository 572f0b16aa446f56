"""Carbon and water arithmetic against hand-computed figures from the pinned CodeCarbon data."""

from __future__ import annotations

import pytest

from wattgate.meter.estimate import estimate
from wattgate.meter.footprint import J_PER_KWH, GridIntensity, SiteFactors, footprint, grid_intensity


def site(zone: str, intensity: float, market: float | None = None) -> SiteFactors:
    fixed = None if market is None else GridIntensity(market, "override", "contractual", zone)
    return SiteFactors(zone, GridIntensity(intensity, "codecarbon", "average", zone), fixed, pue=1.2,
                       wue_site_l_per_kwh=0.5, water_grid_l_per_kwh=3.1)


def test_one_kwh_in_france_and_usa():
    fra, usa = grid_intensity("FRA"), grid_intensity("USA")
    assert fra == pytest.approx(56.039) and usa == pytest.approx(369.473)  # codecarbon 3.x data (2023 mix)
    f = footprint(J_PER_KWH, site("FRA", fra))
    assert f.wh == pytest.approx(1000.0) and f.gco2e == pytest.approx(1.2 * 56.039)
    assert f.water_ml == pytest.approx((1 * 0.5 + 1.2 * 3.1) * 1000)
    assert footprint(J_PER_KWH, site("USA", usa)).gco2e == pytest.approx(1.2 * 369.473)


def test_cloud_region_zone():
    assert grid_intensity("gcp:europe-west1") > 0


def test_estimate_grows_with_tokens_and_parameters():
    def gpu(prompt, completion, params):
        return estimate(prompt, completion, params, latency_s=2.0).gpu_j

    assert gpu(10, 100, 8) < gpu(10, 200, 8) < gpu(10, 200, 70)
    assert gpu(100, 0, 8) > 0  # prompt tokens count too (embeddings)
    assert estimate(0, 0, 8).gpu_j == 0
    # A window of no measurable length (or none given) still gets the model's figure.
    assert estimate(10, 100, 8, latency_s=0.0).gpu_j == estimate(10, 100, 8).gpu_j > 0


def test_estimate_is_ecologits_it_energy():
    """8B active parameters, 100 output tokens, 2 s: EcoLogits 0.11 gives 4.51e-6 kWh GPU, 1.30e-6 kWh server."""
    est = estimate(0, 100, 8, latency_s=2.0)
    assert est.gpu_j == pytest.approx(4.508459e-6 * J_PER_KWH, rel=1e-4)
    assert est.host_j == pytest.approx(1.302083e-6 * J_PER_KWH, rel=1e-4)


def test_unit_conversions_round_trip():
    s = site("FRA", 56.039)
    for joules in (0.0, 1.0, 3600.0, 123.456, J_PER_KWH):
        f = footprint(joules, s)
        assert f.wh * 3600 == pytest.approx(joules)
        assert f.gco2e / 1.2 / 56.039 * J_PER_KWH == pytest.approx(joules, abs=1e-9)
        assert f.water_ml / 1000 / (0.5 + 1.2 * 3.1) * J_PER_KWH == pytest.approx(joules, abs=1e-9)


def test_a_sites_own_figure_is_market_based_and_the_zones_is_still_reported():
    from wattgate.proxy.metering import site_factors
    from wattgate.proxy.registry_file import parse_settings

    s = parse_settings("site: {grid_zone: FRA, grid_intensity_g_per_kwh: 20}\nmodels: {a: {upstream: 'http://x/v1'}}\n")
    f = site_factors(s)
    assert f.market == GridIntensity(20, "override", "contractual", "FRA")
    assert f.location == GridIntensity(pytest.approx(56.039), "codecarbon", "average", "FRA")
    kwh = footprint(J_PER_KWH, f)
    assert kwh.gco2e == pytest.approx(1.56 * 20) and kwh.gco2e_location == pytest.approx(1.56 * 56.039)
    assert kwh.grid is f.market
    plain = site_factors(parse_settings("site: {grid_zone: FRA}\nmodels: {a: {upstream: 'http://x/v1'}}\n"))
    assert plain.market is None and footprint(J_PER_KWH, plain).gco2e == pytest.approx(1.56 * 56.039)


def test_a_live_figure_stands_in_for_the_zones_average():
    s = site("FRA", 56.039)
    live = GridIntensity(100.0, "electricitymaps", "average", "FR", at=1.8e9)
    f = footprint(J_PER_KWH, s, live)
    assert f.gco2e == f.gco2e_location == pytest.approx(1.2 * 100.0) and f.grid is live
    assert footprint(J_PER_KWH, site("FRA", 56.039, market=20.0), live).gco2e == pytest.approx(1.2 * 20.0)

"""The SCI breakdown (SCI 1.1: SCI = E x I + M per request) and the boundary tiers, by hand and through the
ledger: the report's totals equal the sums of the per-request figures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import settled_records
from wattgate.meter import Measurement, Method
from wattgate.meter.footprint import GridIntensity, SiteFactors
from wattgate.proxy.figures import ENERGY_KEYS, Energy, energy_object
from wattgate.proxy.ledger import Ledger
from wattgate.proxy.ledger_file import SqliteStore, connect
from wattgate.proxy.ledger_rows import to_row
from wattgate.proxy.totals import totals


def site(pue: float = 1.5, intensity: float = 100.0) -> SiteFactors:
    return SiteFactors("FRA", GridIntensity(intensity, "codecarbon", "average", "FRA"), None, pue, 0.5, 3.1)


def measurement(gpu_j: float, host_j: float = 0.0, gpu_s: float = 0.0, rid: str = "r") -> Measurement:
    return Measurement(rid, {0: gpu_j}, Method.NVML, True, 0.0, 1.0, 10, 20, host_joules=host_j,
                       gpu_seconds={0: gpu_s})


def test_sci_and_tiers_by_hand():
    e = energy_object(measurement(36.0, host_j=3.6, gpu_s=2.0), site(), idle_j=7.2)
    sci = e["sci"]
    assert sci["tiers_wh"] == pytest.approx({"accelerators": 0.01, "with_host": 0.011, "with_idle": 0.013,
                                             "facility": 0.0195})
    embodied = 2.0 * (273 + 5700 / 8) * 1000 / (3 * 365 * 86400)
    assert sci["e_kwh"] == pytest.approx(0.0000195) and sci["i_g_per_kwh"] == 100.0
    assert sci["m_g"] == pytest.approx(embodied) and sci["sci_g"] == pytest.approx(0.0000195 * 100 + embodied)
    # The operational figure of the request itself leaves the idle share out; the SCI's widest tier has it.
    assert e["gco2e"] == pytest.approx(39.6 / 3.6e6 * 1.5 * 100)


records = st.lists(st.tuples(st.floats(0, 5000), st.floats(0, 500), st.floats(0, 1000), st.floats(0, 60),
                             st.floats(1.0, 2.0), st.floats(0, 900), st.sampled_from(["m1", "m2"])),
                   min_size=1, max_size=25)


@settings(max_examples=40, deadline=None)
@given(records)
def test_report_totals_are_the_sums_of_the_records(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("sci") / "l.db"
    ledger = Ledger(SqliteStore(path))
    energies = []
    for i, (gpu_j, host_j, idle_j, gpu_s, pue, intensity, model) in enumerate(rows):
        e = energy_object(measurement(gpu_j, host_j, gpu_s, f"r{i}"), site(pue, intensity), idle_j=idle_j)
        energies.append((model, e))
        ledger.submit(to_row(e, model, None, time.time(), idle_joules=idle_j))
    ledger.close()
    db = connect(path)
    by_model = {r["model"]: r for r in totals(db, "model")}
    db.close()
    for model, group in by_model.items():
        mine = [e for m, e in energies if m == model]
        sci = group["sci"]
        assert sci["requests"] == len(mine) == group["requests"]
        assert sci["e_kwh"] == pytest.approx(sum(e["sci"]["e_kwh"] for e in mine), rel=1e-6, abs=1e-12)
        assert sci["m_g"] == pytest.approx(sum(e["sci"]["m_g"] for e in mine), rel=1e-6, abs=1e-9)
        assert sci["sci_g_per_request"] * len(mine) == pytest.approx(sum(e["sci"]["sci_g"] for e in mine),
                                                                     rel=1e-6, abs=1e-9)
        for tier, wh in sci["tiers_wh"].items():
            assert wh == pytest.approx(sum(e["sci"]["tiers_wh"][tier] for e in mine), rel=1e-6, abs=1e-6), tier
        for key in ("gco2e", "gco2e_location", "embodied_gco2e", "gpu_seconds"):
            assert group[key] == pytest.approx(sum(e[key] for e in mine), rel=1e-6, abs=1e-9), key


def test_each_record_through_the_gateway_carries_its_sci(stack):
    import httpx

    def call() -> httpx.Response:
        return httpx.post(f"{stack.url}/v1/chat/completions", json={"model": "llama", "max_tokens": 8,
                                                                    "messages": [{"role": "user", "content": "hi"}]})

    call()  # idle after a first request is shared by the next ones (before it, nobody's)
    time.sleep(0.5)
    r = call()
    rid = r.headers["x-request-id"]
    inline = r.json()["energy"]["sci"]
    rec = settled_records(stack.url, [rid])[rid]
    sci = rec["sci"]
    tiers = sci["tiers_wh"]
    assert tiers["accelerators"] <= tiers["with_host"] <= tiers["with_idle"] <= tiers["facility"]
    assert tiers["with_idle"] > tiers["with_host"]  # idle: exclude, and the GPU idled before
    assert sci["sci_g"] == pytest.approx(sci["e_kwh"] * sci["i_g_per_kwh"] + sci["m_g"], rel=1e-6)
    assert sci["m_g"] == pytest.approx(rec["embodied_gco2e"]) and set(inline) == set(sci)


def read_back(path: Path, energy: Energy, idle_j: float = 0.0) -> Energy:
    """``energy``'s record as the ledger gives it back (``GET /v1/energy/{id}`` once it left memory),
    once written and the ledger reopened."""
    ledger = Ledger(SqliteStore(path))
    ledger.submit(to_row(energy, "m", None, time.time(), idle_joules=idle_j))
    ledger.close()
    again = Ledger(SqliteStore(path))
    try:
        rec = again.energy(energy["request_id"])
    finally:
        again.close()
    assert rec is not None
    return rec


def test_a_record_read_back_from_the_ledger_has_the_same_sci_and_grid(tmp_path):
    e = energy_object(measurement(36.0, host_j=3.6, gpu_s=2.0), site(), idle_j=7.2)
    rec = read_back(tmp_path / "l.db", e, idle_j=7.2)
    assert list(rec) == list(e) == list(ENERGY_KEYS)  # the same object as a response's, key for key
    assert {k: v for k, v in rec.items() if k != "sci"} == {k: v for k, v in e.items() if k != "sci"}
    assert rec["sci"]["tiers_wh"] == pytest.approx(e["sci"]["tiers_wh"])
    for key in ("e_kwh", "i_g_per_kwh", "m_g", "sci_g"):
        assert rec["sci"][key] == pytest.approx(e["sci"][key]), key
    assert rec["grid"] == e["grid"] and rec["grid"]["market"] is None


def test_a_record_with_a_sites_own_figure_reads_back_with_both_grid_figures(tmp_path):
    from dataclasses import replace

    fixed = replace(site(), market=GridIntensity(20.0, "override", "contractual", "FRA"))
    e = energy_object(measurement(36.0, gpu_s=2.0), fixed)
    rec = read_back(tmp_path / "l.db", e)
    assert rec["grid"] == e["grid"] and rec["grid"]["market"]["g_per_kwh"] == 20.0
    assert rec["gco2e"] == pytest.approx(e["gco2e"]) and rec["gco2e_location"] == pytest.approx(e["gco2e_location"])


def test_the_idle_time_before_a_gpus_first_request_is_nobodys(tmp_path):
    import httpx

    from tests.conftest import SERVED
    from wattgate.meter.sources.simulated import SimulatedGpu
    from wattgate.proxy.app import create_app
    from wattgate.proxy.serving import ServerThread
    from wattgate.proxy.settings import LedgerSettings, MeterSettings, Model, Settings
    from wattgate.proxy.simulated_upstream import SimulatedUpstream

    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED, default_max_tokens=8)) as up:
        settings = Settings(meter=MeterSettings(source="simulated", settle_lag_ms=200),
                            ledger=LedgerSettings(enabled=False),
                            models={"llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])})
        with ServerThread(create_app(settings)) as gw:
            time.sleep(1.5)  # 1.5 s at the simulated GPU's 80 W idle: ~120 J, some ten times the request's own
            r = httpx.post(f"{gw.url}/v1/chat/completions",
                           json={"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
            rid = r.headers["x-request-id"]
            tiers = settled_records(gw.url, [rid])[rid]["sci"]["tiers_wh"]
    assert tiers["with_idle"] == tiers["with_host"] > 0


def test_idle_is_spread_over_a_trailing_periods_attributed_energy():
    """IdlePeriod on scripted totals: before a GPU's first request nothing is anyone's; within the first
    period the ratio covers all the time since; later, only the trailing period counts, so an idle
    first week weighs nothing on this week's requests."""
    from wattgate.meter import GpuTotals
    from wattgate.proxy.books import IdlePeriod

    hour = 3600.0
    period = IdlePeriod(24 * hour)

    def totals(idle: float, attributed: float) -> dict[int, GpuTotals]:
        return {0: GpuTotals(measured=idle + attributed, attributed=attributed, idle=idle, unattributed=0.0,
                             pending_idle=0.0, power_w=None)}

    assert period.per_joule(totals(idle=5000.0, attributed=0.0), now=0.0) == {0: 0.0}  # idle before it: nobody's
    # A quiet first week: 100 kJ of idle, 1 kJ attributed.
    assert period.per_joule(totals(105_000.0, 1000.0), now=7 * 24 * hour)[0] == pytest.approx(100.0)
    # Then a busy day: every quarter hour 10 J idle and 100 J attributed.
    idle, attributed = 105_000.0, 1000.0
    for quarter in range(1, 4 * 24 * 2 + 1):
        idle, attributed = idle + 10, attributed + 100
        ratio = period.per_joule(totals(idle, attributed), now=7 * 24 * hour + quarter * hour / 4)[0]
    assert ratio == pytest.approx(0.1, rel=0.02)  # the last 24 h only: the idle week is forgotten

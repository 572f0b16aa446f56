"""``NvmlSource`` against a stand-in NVML (tests/fake_nvml.py): units, fallbacks, MIG, faults, and the
gateway's figures saying ``nvml``. A real driver's answers are for tests/test_gpu.py on a GPU host."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import SERVED, settled_records, wait_until
from tests.fake_nvml import FakeGpu, FakeNvml
from wattgate.meter.kinds import Fault
from wattgate.meter.sources import MeterFault
from wattgate.meter.sources.nvml import NvmlSource, visible_gpu_count
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.app import create_app
from wattgate.proxy.serving import ServerThread
from wattgate.proxy.settings import MeterSettings, Model, Settings
from wattgate.proxy.simulated_upstream import SimulatedUpstream


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeNvml]:
    def install(*gpus: FakeGpu, init_error: str | None = None) -> FakeNvml:
        fake = FakeNvml(list(gpus), init_error)
        monkeypatch.setitem(sys.modules, "pynvml", fake.module())
        return fake

    return install


def test_reads_the_counter_and_instantaneous_power_in_joules_and_watts(nvml):
    nvml(FakeGpu(power_mw=250_000))
    source = NvmlSource([0])
    first, second = source.read(0), source.read(0)
    assert first.power_w == 250.0 and first.energy_j is not None and second.energy_j is not None
    assert 1000.0 <= first.energy_j <= second.energy_j < 1100.0
    assert source.read(0, energy=False).energy_j is None  # power alone, between counter reads
    assert source.power_lag_s == 0.06 and not source.unmeasurable


def test_a_gpu_without_instantaneous_power_is_warned_of_once_and_read_averaged(nvml, caplog):
    fake = nvml(FakeGpu(), FakeGpu(has_instant_power=False, power_mw=123_000))
    with caplog.at_level(logging.WARNING, logger="wattgate.meter.sources.nvml"):
        source = NvmlSource([0, 1])
    warned = [r.getMessage() for r in caplog.records if "instantaneous power" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("GPU 1 ") and "bench.sensor_lag" in warned[0]
    fake.calls.clear()
    assert [source.read(1).power_w for _ in range(5)] == [123.0] * 5
    assert fake.calls["instant_power"] == 0 and fake.calls["averaged_power"] == 5  # not asked again each poll
    assert source.read(0).power_w == 300.0 and fake.calls["instant_power"] == 1


def test_a_gpu_without_an_energy_counter_gives_power_alone(nvml, caplog):
    nvml(FakeGpu(has_counter=False))
    with caplog.at_level(logging.WARNING, logger="wattgate.meter.sources.nvml"):
        source = NvmlSource([0])
    assert "GPU 0 has no energy counter" in caplog.text
    reading = source.read(0)
    assert reading.energy_j is None and reading.power_w == 300.0


@pytest.mark.parametrize("mig, unmeasurable", [("estimate", True), ("whole_gpu", False)])
def test_a_gpu_in_mig_mode_is_estimated_unless_metered_whole(nvml, mig, unmeasurable):
    nvml(FakeGpu(mig=True), FakeGpu())
    source = NvmlSource([0, 1], mig=mig)
    assert set(source.unmeasurable) == ({0} if unmeasurable else set())
    if unmeasurable:
        assert "MIG" in source.unmeasurable[0]


@pytest.mark.parametrize("message, kind", [("GPU is lost", Fault.LOST_GPU), ("Unknown Error", Fault.READ)])
def test_a_failed_read_is_a_fault_of_its_kind(nvml, message, kind):
    fake = nvml(FakeGpu())
    source = NvmlSource([0])
    fake.gpus[0].fail = message
    with pytest.raises(MeterFault) as exc:
        source.read(0)
    assert exc.value.kind == kind and "GPU 0" in str(exc.value)
    if kind == Fault.LOST_GPU:  # a lost GPU fails between counter reads too
        with pytest.raises(MeterFault):
            source.read(0, energy=False)
    else:  # a power read that fails once is a poll without power
        assert source.read(0, energy=False).power_w is None


def test_no_driver_or_a_missing_gpu_fails_at_start_saying_why(nvml):
    nvml(FakeGpu(), init_error="Driver Not Loaded")
    with pytest.raises(MeterFault, match="NVML is not available: Driver Not Loaded") as exc:
        NvmlSource([0])
    assert exc.value.kind == Fault.INIT
    assert visible_gpu_count() == 0
    nvml(FakeGpu(), FakeGpu())
    assert visible_gpu_count() == 2
    with pytest.raises(MeterFault, match=r"GPU indices \[3\] not visible to NVML \(2 GPUs\)"):
        NvmlSource([0, 3])
    nvml(FakeGpu(), FakeGpu(open_error="Insufficient Permissions"))
    with pytest.raises(MeterFault, match=r"NVML cannot open the GPUs \[0, 1\]: Insufficient Permissions") as exc:
        NvmlSource([0, 1])
    assert exc.value.kind == Fault.INIT


def test_the_gateway_on_nvml_reports_nvml_figures(nvml):
    fake = nvml(FakeGpu(power_mw=400_000))
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED, default_max_tokens=16)) as up:
        settings = Settings(meter=MeterSettings(source="nvml", settle_lag_ms=200),
                            models={"m": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])})
        with ServerThread(create_app(settings)) as gw:
            r = httpx.post(f"{gw.url}/v1/chat/completions",
                           json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.headers["x-energy-method"] == "nvml"
            record = settled_records(gw.url, [r.json()["energy"]["request_id"]])
            ready = httpx.get(f"{gw.url}/readyz").json()["meter"]
    (rec,) = record.values()
    assert rec["method"] == "nvml" and rec["joules"] > 0
    assert ready["ok"] is True and ready["errors"] == {} and ready["power_lag_ms"] == 60.0  # NVML's own delay
    assert fake.calls["energy"] > 0 and fake.calls["shutdown"] == 1  # the gateway closed NVML when it stopped


def test_a_gpu_lost_while_serving_turns_its_calls_into_estimates_and_readyz_says_so(nvml):
    fake = nvml(FakeGpu())
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED, default_max_tokens=4)) as up:
        settings = Settings(meter=MeterSettings(source="nvml", settle_lag_ms=200, stale_after_ms=300),
                            models={"m": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])})
        with ServerThread(create_app(settings)) as gw:
            def call() -> httpx.Response:
                return httpx.post(f"{gw.url}/v1/chat/completions",
                                  json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})

            assert call().headers["x-energy-method"] == "nvml"
            fake.gpus[0].fail = "GPU is lost"
            wait_until(lambda: httpx.get(f"{gw.url}/readyz").json()["meter"]["gpus"]["0"]["fault"] is not None,
                       what="the lost GPU faulted")
            r = call()
            meter = httpx.get(f"{gw.url}/readyz").json()["meter"]
    assert r.status_code == 200 and r.headers["x-energy-method"] == "estimate"
    # The GPU's state is "stale" whatever stopped its readings; the errors say why.
    assert meter["ok"] is False and meter["gpus"]["0"]["fault"] == "stale" and meter["errors"]["lost_gpu"] >= 1

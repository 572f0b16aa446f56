"""Gateway set-ups beyond the shared stack: meter faults, registry-built meters, gateway keys."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import SERVED, wait_until
from wattgate.meter import Meter
from wattgate.meter.sources.simulated import H100_LLAMA_8B
from wattgate.meter.sources.trace import TraceSource
from wattgate.proxy.app import create_app
from wattgate.proxy.serving import ServerThread
from wattgate.proxy.settings import Auth, GatewaySettings, LedgerSettings, MeterSettings, Model, Settings
from wattgate.proxy.simulated_upstream import SimulatedUpstream

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def upstream():
    with ServerThread(SimulatedUpstream(served_name=SERVED, default_max_tokens=8)) as up:
        yield up


def settings_for(upstream, **kw) -> Settings:
    return Settings(models={"llama": Model(served_name=SERVED, upstream=f"{upstream.url}/v1", gpus=[0])}, **kw)


def test_meter_fault_never_fails_the_request(upstream):
    """A GPU that cannot be read: the request is served, figures are estimates, the fault is counted."""
    meter = Meter(TraceSource({0: [(0.0, 0.0, 100.0)]}, time.monotonic, fail_from=0.0), [0], stale_after_s=0.3)
    with ServerThread(create_app(settings_for(upstream), meter=meter)) as gw:
        wait_until(lambda: meter.method_for([0]) == "estimate", what="the GPU faulted")
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="llama", messages=MSG, max_tokens=8)
        energy = raw.parse().model_extra["energy"]
        assert raw.headers["x-energy-method"] == "estimate" and energy["method"] == "estimate"
        assert energy["joules"] > 0 and energy["settled"]
        stream = client.chat.completions.with_raw_response.create(model="llama", messages=MSG, max_tokens=4, stream=True)
        assert stream.headers["x-energy-method"] == "estimate"  # the meter was already faulted when it began
        assert list(stream.parse())[-1].model_extra["energy"]["method"] == "estimate"
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'wattgate_meter_errors_total{kind="read"}' in metrics
        assert 'wattgate_meter_errors_total{kind="read"} 0.0' not in metrics
        ready = httpx.get(f"{gw.url}/readyz").json()
        assert ready["meter"]["ok"] is False


def test_gpu_in_mig_mode_gets_estimates_and_says_why(upstream):
    """No per-instance power on a MIG GPU: its requests are estimated, not errors, and /readyz says why."""
    trace = [(k * 0.1, 1000.0 + k * 30.0, 300.0) for k in range(3000)]
    source = TraceSource({0: trace, 1: trace}, time.monotonic, unmeasurable={0: "MIG mode: no power per instance"})
    settings = Settings(models={
        "mig": Model(served_name=SERVED, upstream=f"{upstream.url}/v1", gpus=[0]),
        "whole": Model(served_name=SERVED, upstream=f"{upstream.url}/v1", gpus=[1]),
    })
    with ServerThread(create_app(settings, meter=Meter(source, [0, 1]))) as gw:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.with_raw_response.create(model="mig", messages=MSG, max_tokens=4, stream=True)
        assert stream.headers["x-energy-method"] == "estimate"
        assert list(stream.parse())[-1].model_extra["energy"]["method"] == "estimate"
        measured = client.chat.completions.with_raw_response.create(model="whole", messages=MSG, max_tokens=4)
        assert measured.headers["x-energy-method"] == "trace"
        ready = httpx.get(f"{gw.url}/readyz").json()["meter"]
        assert ready["ok"] and ready["unmeasurable_gpus"] == {"0": "MIG mode: no power per instance"}
        assert list(ready["gpus"]) == ["1"] and not ready["errors"]
        assert 'wattgate_gpu_power_watts{gpu="0"}' not in httpx.get(f"{gw.url}/metrics").text


def test_upstream_calls_honour_the_proxy_environment(upstream, monkeypatch):
    """An upstream reachable only through HTTP_PROXY (here the simulated upstream, taking absolute-form requests)."""
    monkeypatch.setenv("HTTP_PROXY", upstream.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    settings = Settings(models={"llama": Model(served_name=SERVED, upstream="http://vllm.invalid:8000/v1")},
                        meter=MeterSettings(source="none"))
    with ServerThread(create_app(settings)) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "llama", "messages": MSG}, timeout=10,
                       trust_env=False)  # the test client itself goes direct
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_registry_simulated_meter_follows_gateway_load(upstream):
    """`meter.source: simulated` in the registry: the simulated GPU runs one sequence per request in
    flight, so a lone request settles at that power (above idle) over its window."""
    profile = H100_LLAMA_8B
    with ServerThread(create_app(settings_for(upstream, meter=MeterSettings(source="simulated")))) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "llama", "messages": MSG, "max_tokens": 24})
        assert r.status_code == 200 and r.headers["x-energy-method"] == "simulated"
        rid = r.headers["x-request-id"]
        wait_until(lambda: httpx.get(f"{gw.url}/v1/energy/{rid}").json()["settled"], what="settled")
        rec = httpx.get(f"{gw.url}/v1/energy/{rid}").json()
    window_s = rec["window_ms"] / 1000
    assert profile.idle_w * window_s < rec["joules"] <= profile.power_w(1) * window_s * 1.1, rec


def test_registry_without_meter_estimates(upstream):
    with ServerThread(create_app(settings_for(upstream, meter=MeterSettings(source="none")))) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "llama", "messages": MSG})
        assert r.status_code == 200 and r.headers["x-energy-method"] == "estimate"


def test_gateway_keys_and_record_visibility(upstream, monkeypatch):
    monkeypatch.setenv("WG_TEST_KEYS", "team-a:sk-a,team-b:sk-b")
    settings = settings_for(
        upstream, meter=MeterSettings(source="none"), gateway=GatewaySettings(auth=Auth(keys_env="WG_TEST_KEYS"))
    )
    with ServerThread(create_app(settings)) as gw:
        url = f"{gw.url}/v1/chat/completions"
        body = {"model": "llama", "messages": MSG}
        denied = httpx.post(url, json=body, headers={"authorization": "Bearer sk-wrong"})
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert "sk-wrong" not in denied.text
        ok = httpx.post(url, json=body, headers={"authorization": "Bearer sk-a"})
        assert ok.status_code == 200
        rid = ok.headers["x-request-id"]
        own = httpx.get(f"{gw.url}/v1/energy/{rid}", headers={"authorization": "Bearer sk-a"})
        other = httpx.get(f"{gw.url}/v1/energy/{rid}", headers={"authorization": "Bearer sk-b"})
        assert own.status_code == 200 and other.status_code == 404


def test_two_teams_may_send_the_same_request_id_and_neither_learns_of_the_other(upstream, monkeypatch, tmp_path):
    """Each gets its id echoed and its own record; a team reusing its own id gets a fresh one."""
    monkeypatch.setenv("WG_TEST_KEYS", "team-a:sk-a,team-b:sk-b")
    settings = settings_for(upstream, meter=MeterSettings(source="simulated", settle_lag_ms=200),
                            gateway=GatewaySettings(auth=Auth(keys_env="WG_TEST_KEYS")),
                            ledger=LedgerSettings(path=tmp_path / "ledger.db"))
    with ServerThread(create_app(settings)) as gw:
        def call(key: str, rid: str, tokens: int) -> httpx.Response:
            body = {"model": "llama", "messages": MSG, "max_tokens": tokens}
            return httpx.post(f"{gw.url}/v1/chat/completions", json=body,
                              headers={"authorization": f"Bearer {key}", "x-request-id": rid})

        def record(key: str, rid: str) -> dict:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                r = httpx.get(f"{gw.url}/v1/energy/{rid}", headers={"authorization": f"Bearer {key}"})
                if r.status_code != 200 or r.json()["settled"]:
                    return r.json()
                time.sleep(0.05)
            raise AssertionError(f"{rid} did not settle")

        a, b = call("sk-a", "shared-1", 2), call("sk-b", "shared-1", 5)
        assert a.headers["x-request-id"] == b.headers["x-request-id"] == "shared-1"
        assert a.json()["energy"]["request_id"] == b.json()["energy"]["request_id"] == "shared-1"
        assert record("sk-a", "shared-1")["completion_tokens"] == 2
        assert record("sk-b", "shared-1")["completion_tokens"] == 5
        again = call("sk-a", "shared-1", 1)
        assert again.headers["x-request-id"].startswith("wg-")
        assert record("sk-a", "shared-1")["completion_tokens"] == 2
        assert record("sk-b", "never-sent")["error"]["code"] == "not_found"


def test_with_keys_on_metrics_and_models_need_a_key_and_teams_see_only_their_own_series(upstream, monkeypatch):
    monkeypatch.setenv("WG_TEST_KEYS", "team-a:sk-a,team-b:sk-b,prometheus:sk-scrape")
    auth = Auth(keys_env="WG_TEST_KEYS", metrics_aliases=["prometheus"])
    settings = settings_for(upstream, meter=MeterSettings(source="none"), gateway=GatewaySettings(auth=auth))
    with ServerThread(create_app(settings)) as gw:
        def get(path: str, key: str | None = None) -> httpx.Response:
            headers = {"origin": "https://app.example"} | ({"authorization": f"Bearer {key}"} if key else {})
            return httpx.get(f"{gw.url}{path}", headers=headers)

        for path in ("/metrics", "/v1/models"):
            denied = get(path)
            assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error", path
        assert get("/v1/models", "sk-a").json()["data"][0]["id"] == "llama"
        everything = get("/metrics", "sk-scrape")
        assert 'wattgate_team_energy_joules_total{team="team-a"}' in everything.text
        assert 'wattgate_team_energy_joules_total{team="team-b"}' in everything.text
        assert 'team="prometheus"' not in everything.text  # the scrape key is not a team
        assert "access-control-allow-origin" not in everything.headers  # not for browsers
        own = get("/metrics", "sk-a").text
        assert 'wattgate_team_energy_joules_total{team="team-a"}' in own and 'team="team-b"' not in own
        assert "wattgate_requests_total" in own and "sk-a" not in own
        assert get("/v1/models", "sk-a").headers["access-control-allow-origin"]  # the API keeps its CORS


def test_a_metrics_alias_without_a_key_is_a_config_error(upstream, monkeypatch):
    from wattgate.proxy.settings import ConfigError

    monkeypatch.setenv("WG_TEST_KEYS", "team-a:sk-a")
    auth = Auth(keys_env="WG_TEST_KEYS", metrics_aliases=["prometheus"])
    with pytest.raises(ConfigError, match="prometheus"):
        create_app(settings_for(upstream, meter=MeterSettings(source="none"), gateway=GatewaySettings(auth=auth)))


def test_fixed_host_power_is_a_separate_component(upstream):
    host = MeterSettings(source="simulated", settle_lag_ms=200, host={"source": "fixed", "watts_per_gpu": 150})
    with ServerThread(create_app(settings_for(upstream, meter=host))) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "llama", "messages": MSG},
                       headers={"x-request-id": "host-1"})
        assert r.status_code == 200
        deadline = time.monotonic() + 5
        while not (rec := httpx.get(f"{gw.url}/v1/energy/host-1").json()).get("settled"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    parts = rec["components"]
    assert parts["host"] > 0 and parts["gpu"] > 0
    assert rec["joules"] == pytest.approx(parts["gpu"] + parts["host"], rel=1e-5)


def test_nvml_missing_degrades_to_estimates_and_says_so(upstream):
    """On a machine without NVML the gateway still serves, every figure is an estimate, /readyz says why."""
    with ServerThread(create_app(settings_for(upstream, meter=MeterSettings(source="nvml")))) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "llama", "messages": MSG})
        assert r.status_code == 200 and r.headers["x-energy-method"] == "estimate"
        meter = httpx.get(f"{gw.url}/readyz").json()["meter"]
        assert meter["ok"] is False and meter["errors"] == {"init": 1}

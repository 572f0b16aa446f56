"""The gateway driven by the real openai SDK against a vLLM-like upstream on localhost."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.conftest import SERVED, wait_until

MSG = [{"role": "user", "content": "How much energy does this use?"}]
ENERGY_KEYS = {"request_id", "joules", "wh", "gco2e", "water_ml", "method", "settled", "gpus", "components",
               "window_ms", "prompt_tokens", "completion_tokens"}


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


def test_non_stream_round_trip_with_headers_and_body(stack, client):
    raw = client.chat.completions.with_raw_response.create(model="llama", messages=MSG, max_tokens=12)
    resp = raw.parse()
    h = raw.headers
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 12
    assert resp.id.startswith("chatcmpl-") and resp.model == SERVED
    energy = resp.model_extra["energy"]
    assert ENERGY_KEYS <= set(energy) and energy["method"] == "simulated" and energy["gpus"] == [0]
    assert energy["joules"] > 0 and energy["completion_tokens"] == 12
    assert h["x-energy-method"] == "simulated" and h["x-energy-gpus"] == "0"
    assert float(h["x-energy-joules"]) == pytest.approx(energy["joules"], rel=1e-5)
    assert float(h["x-energy-wh"]) == pytest.approx(energy["joules"] / 3600, rel=1e-5)
    assert float(h["x-carbon-gco2e"]) > 0 and float(h["x-water-ml"]) > 0
    assert h["x-grid-zone"] == "USA" and float(h["x-grid-intensity"]) > 0
    assert h["x-request-id"] == energy["request_id"]
    # Provisional, and it says so: the counter cannot have passed the end of the request yet.
    assert h["x-energy-settled"] == "false" and energy["settled"] is False
    # The upstream saw its own model name and no client key.
    assert stack.upstream.requests_seen[-1]["model"] == SERVED


def test_stream_relays_every_chunk_and_ends_with_energy(stack, client):
    raw = client.chat.completions.with_raw_response.create(model="llama", messages=MSG, max_tokens=10, stream=True)
    assert raw.headers["x-energy-method"] == "simulated" and raw.headers["x-request-id"]
    chunks = list(raw.parse())
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Energy per token falls as the batch grows , because "
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    last = chunks[-1]
    energy = last.model_extra["energy"]
    assert energy["completion_tokens"] == 10 and energy["joules"] > 0
    # The figures also where chat front ends and routers look, parsed by the SDK: usage (sent though the
    # client did not ask: it is the extra choices-less chunk already) and LiteLLM's provider fields.
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 10
    assert last.usage.model_extra == {"energy_j": energy["joules"], "energy_wh": energy["wh"],
                                      "gco2e": energy["gco2e"], "water_ml": energy["water_ml"],
                                      "energy_method": "simulated", "energy_settled": False,
                                      "energy_request_id": energy["request_id"]}
    assert last.model_extra["provider_specific_fields"] == {"energy": energy}
    # And on the finish chunk's delta, the one place LiteLLM's proxy keeps on a stream whatever the provider.
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert finish is chunks[-2] and finish.choices[0].delta.model_extra["provider_specific_fields"] == {"energy": energy}
    assert len({c.id for c in chunks}) == 1
    # The gateway asked the upstream for usage to learn exact counts.
    assert stack.upstream.requests_seen[-1]["stream_options"] == {"include_usage": True}


def test_stream_keeps_usage_when_client_asks(client):
    chunks = list(
        client.chat.completions.create(
            model="llama", messages=MSG, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage.completion_tokens == 5 and "energy" in chunks[-1].model_extra


def test_async_client_stream_and_non_stream(stack):
    async def run():
        c = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
        resp = await c.chat.completions.create(model="llama", messages=MSG, max_tokens=4)
        stream = await c.chat.completions.create(model="llama", messages=MSG, max_tokens=4, stream=True)
        last = None
        async for chunk in stream:
            last = chunk
        await c.close()
        return resp, last

    resp, last = asyncio.run(run())
    assert resp.model_extra["energy"]["completion_tokens"] == 4
    assert last.model_extra["energy"]["completion_tokens"] == 4


def test_completions_and_embeddings(client):
    comp = client.completions.create(model="llama", prompt="Say hi", max_tokens=6)
    assert comp.choices[0].text and comp.model_extra["energy"]["completion_tokens"] == 6
    chunks = list(client.completions.create(model="llama", prompt="Say hi", max_tokens=3, stream=True))
    assert chunks[-1].model_extra["energy"]["completion_tokens"] == 3
    emb = client.embeddings.create(model="llama", input=["a b c", "d e f"])
    assert len(emb.data) == 2 and emb.model_extra["energy"]["joules"] > 0


def test_settled_record_matches_and_concurrent_requests_share(stack, client):
    async def run():
        c = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
        out = await asyncio.gather(*(c.chat.completions.create(model="llama", messages=MSG, max_tokens=16)
                                     for _ in range(8)))
        await c.close()
        return out

    responses = asyncio.run(run())
    records = [stack.record(r.model_extra["energy"]["request_id"]) for r in responses]
    assert all(r["settled"] and r["method"] == "simulated" for r in records)
    for response, record in zip(responses, records):  # the record is the response's request, settled
        inline = response.model_extra["energy"]
        assert not inline["settled"] and inline["request_id"] == record["request_id"]
        assert (record["prompt_tokens"], record["completion_tokens"]) == (
            response.usage.prompt_tokens, response.usage.completion_tokens)
        assert record["joules"] == pytest.approx(inline["joules"], rel=0.25)  # provisional vs settled
    joules = [r["joules"] for r in records]
    # Identical concurrent requests: equal shares (they overlap almost entirely on the simulated GPU).
    assert max(joules) < 1.5 * min(joules)


def test_remote_model_is_estimated(client):
    raw = client.chat.completions.with_raw_response.create(model="remote", messages=MSG, max_tokens=8)
    energy = raw.parse().model_extra["energy"]
    assert raw.headers["x-energy-method"] == "estimate" and energy["method"] == "estimate" and energy["settled"]
    assert raw.headers["x-energy-gpus"] == "" and energy["joules"] > 0


def test_models_route(client):
    assert sorted(m.id for m in client.models.list()) == ["down", "llama", "remote"]


def test_energy_record_unknown_is_404(stack):
    r = httpx.get(f"{stack.url}/v1/energy/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_request_id_kept_or_replaced(stack):
    body = {"model": "llama", "messages": MSG, "max_tokens": 2}
    good = httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers={"x-request-id": "my-id.1:a_b"})
    assert good.headers["x-request-id"] == "my-id.1:a_b" == good.json()["energy"]["request_id"]
    bad = httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers={"x-request-id": "bad id/../" + "x" * 200})
    assert bad.status_code == 200 and bad.headers["x-request-id"].startswith("wg-")


def test_a_reused_client_request_id_gets_a_fresh_id_so_no_record_is_overwritten(stack):
    """A client that sends the same x-request-id again (in turn, or at once) gets one record per request."""
    body = {"model": "llama", "messages": MSG, "max_tokens": 2}
    one_by_one = [httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers={"x-request-id": "again-1"})
                  for _ in range(3)]
    ids = [r.headers["x-request-id"] for r in one_by_one]
    assert ids[0] == "again-1" and len(set(ids)) == 3 and all(i.startswith("wg-") for i in ids[1:])
    assert [r.json()["energy"]["request_id"] for r in one_by_one] == ids

    async def at_once() -> list[str]:
        async with httpx.AsyncClient(timeout=30) as client:
            async def one() -> str:
                stream = {**body, "stream": True, "max_tokens": 8}
                async with client.stream("POST", f"{stack.url}/v1/chat/completions", json=stream,
                                         headers={"x-request-id": "again-2"}) as r:
                    await r.aread()
                    return r.headers["x-request-id"]
            return await asyncio.gather(*(one() for _ in range(5)))

    together = asyncio.run(at_once())
    assert len(set(together)) == 5 and "again-2" in together
    for rid in ids + together:
        assert stack.record(rid)["method"] == "simulated"
    assert "internal" not in stack.meter.errors


def test_upstream_4xx_is_relayed_unchanged(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="llama", messages=MSG, max_tokens=100_000)
    # vLLM 0.32's own words and field (the simulated upstream mirrors them; tests/test_vllm.py checks vLLM's)
    assert "cannot be greater than max_model_len" in exc.value.message and exc.value.param == "max_tokens"


def test_upstream_5xx_is_relayed(client):
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "fault:500"}])


def test_upstream_down_is_502(stack):
    r = httpx.post(f"{stack.url}/v1/chat/completions", json={"model": "down", "messages": MSG})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"


def test_upstream_hung_is_504(stack):
    body = {"model": "llama", "messages": [{"role": "user", "content": "fault:hang"}]}
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"


def test_slow_first_token_still_streams(client):
    chunks = list(client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "fault:slow"}], max_tokens=3, stream=True))
    assert chunks[-1].model_extra["energy"]["completion_tokens"] == 3


def test_mid_stream_failure_is_forwarded_as_error_event(stack):
    body = {"model": "llama", "messages": [{"role": "user", "content": "fault:break"}], "stream": True}
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body) as r:
        text = r.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert '"error"' in events[-3] and '"energy"' in events[-2] and events[-1] == "data: [DONE]"
    rid = r.headers["x-request-id"]
    assert stack.record(rid)["status"] == "error"


def test_client_disconnect_closes_upstream_and_records_partial_window(stack):
    body = {"model": "llama", "messages": MSG, "stream": True, "max_tokens": 2000}
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, headers={"x-request-id": "gone-1"}) as r:
        it = r.iter_bytes()
        next(it)
        next(it)
    record = stack.record("gone-1")
    assert record["status"] == "client_closed" and 0 < record["completion_tokens"] < 2000
    deadline = time.monotonic() + 3
    while stack.gpu.batch and time.monotonic() < deadline:  # the upstream aborted its generation
        time.sleep(0.02)
    assert stack.gpu.batch == 0


def test_client_disconnect_before_the_first_token_is_noticed_at_once(stack):
    """A client that gives up during a long prefill frees the upstream without waiting for a token."""
    body = {"model": "llama", "messages": [{"role": "user", "content": "fault:very-slow"}], "stream": True}
    t0 = time.monotonic()
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, headers={"x-request-id": "gone-2"}):
        pass  # headers only: the first token is 30 s away
    record = stack.record("gone-2")
    assert record["status"] == "client_closed" and record["completion_tokens"] == 0
    assert time.monotonic() - t0 < 5


def test_browser_clients_get_cors_and_can_read_the_figures(stack):
    origin = {"origin": "https://playground.example"}
    pre = httpx.options(f"{stack.url}/v1/chat/completions", headers={
        **origin, "access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in ("*", origin["origin"])
    r = httpx.post(f"{stack.url}/v1/chat/completions", headers=origin,
                   json={"model": "llama", "messages": MSG, "max_tokens": 2})
    exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
    assert r.status_code == 200 and _figure_headers(r) <= exposed


def _figure_headers(r: httpx.Response) -> set[str]:
    return {h for h in r.headers if h.startswith(("x-energy", "x-carbon", "x-water", "x-grid", "x-request-id"))}


def test_metrics_exposed_with_zero_series(stack, client):
    client.chat.completions.create(model="llama", messages=MSG, max_tokens=2)
    text = httpx.get(f"{stack.url}/metrics").text
    for name in ("wattgate_requests_total", "wattgate_tokens_total", "wattgate_request_energy_joules_bucket",
                 "wattgate_energy_per_token_joules_bucket", "wattgate_carbon_grams_total",
                 "wattgate_water_liters_total", "wattgate_gpu_power_watts", "wattgate_gpu_energy_joules_total",
                 "wattgate_gpu_idle_energy_joules_total", "wattgate_gpu_unattributed_energy_joules_total",
                 "wattgate_upstream_latency_seconds_bucket", "wattgate_meter_errors_total",
                 "wattgate_event_loop_lag_seconds_bucket"):
        assert name in text, name
    assert 'wattgate_requests_total{model="remote",status="client_closed"} 0.0' in text


def test_health_and_readiness(stack):
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz")
    body = ready.json()
    assert body["upstreams"] == {"llama": True, "remote": True, "down": False} and ready.status_code == 503
    assert body["meter"]["method"] == "simulated" and body["meter"]["ok"] is True


def test_requests_that_bypass_the_gateway_are_unattributed(stack, client):
    """Direct calls to vLLM show in its /metrics; their energy is not pinned on gateway requests."""
    before = stack.meter.gpu_totals()[0].unattributed

    async def run():
        async with httpx.AsyncClient(timeout=30) as direct:
            body = {"model": SERVED, "messages": MSG, "max_tokens": 120, "stream": True}

            async def one():
                async with direct.stream("POST", f"{stack.upstream_url}/v1/chat/completions", json=body) as r:
                    async for _ in r.aiter_bytes():
                        pass

            gw = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
            await asyncio.gather(*(one() for _ in range(4)),
                                 gw.chat.completions.create(model="llama", messages=MSG, max_tokens=60))
            await gw.close()

    asyncio.run(run())
    wait_until(lambda: stack.meter.gpu_totals()[0].unattributed > before, what="foreign energy counted as unattributed")


def test_running_sequences_parses_vllm_metrics():
    from wattgate.proxy.foreign import running_sequences

    text = ('# TYPE vllm:num_requests_running gauge\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
            'vllm:num_requests_running{engine="1",model_name="m"} 2.0\n'
            'vllm:num_requests_running{engine="0",model_name="other"} 7.0\n')
    assert running_sequences(text, "m") == 5.0
    assert running_sequences("up 1\n", "m") is None
    for nonsense in ("NaN", "+Inf", "-3"):  # not a count: none running, and no crash in int()
        assert running_sequences(f'vllm:num_requests_running{{model_name="m"}} {nonsense}\n', "m") == 0.0


@pytest.mark.parametrize("in_usage", [True, False])
def test_the_figures_ride_in_usage_unless_the_registry_turns_it_off(in_usage):
    """A plain body's usage gets the flat keys too; with gateway.energy_in_usage false, usage is the
    upstream's own and a stream's last chunk has none the client did not ask for (the energy object stays)."""
    from wattgate.meter.sources.simulated import SimulatedGpu
    from wattgate.proxy.app import create_app
    from wattgate.proxy.serving import ServerThread
    from wattgate.proxy.settings import GatewaySettings, LedgerSettings, MeterSettings, Model, Settings
    from wattgate.proxy.simulated_upstream import SimulatedUpstream

    keys = {"energy_j", "energy_wh", "gco2e", "water_ml", "energy_method", "energy_settled", "energy_request_id"}
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED)) as up:
        settings = Settings(meter=MeterSettings(source="simulated"), ledger=LedgerSettings(enabled=False),
                            gateway=GatewaySettings(energy_in_usage=in_usage),
                            models={"llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])})
        with ServerThread(create_app(settings)) as gw:
            sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x")
            plain = sdk.chat.completions.create(model="llama", messages=MSG, max_tokens=4)
            *_, finish, last = sdk.chat.completions.create(model="llama", messages=MSG, max_tokens=4, stream=True)
    assert finish.choices[0].finish_reason == "length"
    assert ("provider_specific_fields" in finish.choices[0].delta.model_extra) is in_usage
    assert set(plain.usage.model_extra) == (keys if in_usage else set())
    assert plain.usage.model_extra.get("energy_j", plain.model_extra["energy"]["joules"]) == \
        plain.model_extra["energy"]["joules"]
    assert "energy" in last.model_extra
    if in_usage:
        assert set(last.usage.model_extra) == keys and "provider_specific_fields" in last.model_extra
    else:
        assert last.usage is None and "provider_specific_fields" not in last.model_extra

"""The gateway behind LiteLLM's real proxy: its figures survive LiteLLM's plain bodies and streams.

Opt-in: ``python tests/real_litellm/build_env.py`` builds the environment, then
``~/.cache/wattgate/litellm-env/bin/python -m pytest -m litellm tests/test_litellm.py`` runs this
suite (README, "Tests"). Elsewhere every test here is skipped, saying why.

Two proxies run, as users start them (``litellm --config``): the stock one, and one with
wattgate's callback (``wattgate.integrations.litellm``). Each has the gateway behind it twice, as
``openai/`` and ``hosted_vllm/`` models; the callback's proxy also has a gateway that keeps its
figures out of ``usage`` and the finish chunk (``gateway.energy_in_usage: false``), whose figures
the callback has to fetch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.litellm
litellm = pytest.importorskip(
    "litellm", reason="the LiteLLM environment is not installed: python tests/real_litellm/build_env.py")

from tests.conftest import SERVED, settled_records, stop_server
from tests.real_litellm import proxy as litellm_proxy
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.app import create_app
from wattgate.proxy.serving import ServerThread
from wattgate.proxy.settings import GatewaySettings, LedgerSettings, MeterSettings, Model, Settings
from wattgate.proxy.simulated_upstream import SimulatedUpstream

ROOT = Path(__file__).resolve().parents[1]
MSG = [{"role": "user", "content": "How much energy does one chat answer use?"}]
PROVIDERS = ["openai", "hosted_vllm"]
USAGE_KEYS = {"energy_j", "energy_wh", "gco2e", "water_ml", "energy_method", "energy_settled", "energy_request_id"}


@dataclass
class Proxy:
    url: str
    spend_log: Path  # one JSON line per call: the spend-log row LiteLLM built


@dataclass
class Stack:
    stock: Proxy
    with_callback: Proxy
    gateway: str  # the gateway's base URL (figures in usage and on the finish chunk)
    quiet: str  # a gateway with gateway.energy_in_usage: false


def _gateway(upstream: str, in_usage: bool) -> ServerThread:
    settings = Settings(meter=MeterSettings(source="simulated", settle_lag_ms=300), ledger=LedgerSettings(enabled=False),
                        gateway=GatewaySettings(energy_in_usage=in_usage),
                        models={"llama": Model(served_name=SERVED, upstream=f"{upstream}/v1", gpus=[0])})
    return ServerThread(create_app(settings))


def _proxy(home: Path, gateways: dict[str, str], callback: bool) -> tuple[subprocess.Popen, Proxy]:
    """A proxy with a model per provider and gateway (``{prefix}-{provider}``), and the spend probe."""
    models = {f"{prefix}-{provider}": f"{provider}/llama@{url}/v1" for prefix, url in gateways.items()
              for provider in PROVIDERS}
    callbacks = ["wattgate.integrations.litellm.energy_callback"] if callback else []
    spend_log = home / "spend.jsonl"
    env = {"PYTHONPATH": str(ROOT), "WATTGATE_URL": gateways.get("quiet", ""), "WATTGATE_SPEND_PROBE": str(spend_log)}
    proc, url = litellm_proxy.start(Path(sys.executable).parent / "litellm", home, models,
                                    [*callbacks, "tests.real_litellm.spend_probe.probe"], env)
    return proc, Proxy(url, spend_log)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED)) as up, \
            _gateway(up.url, True) as gw, _gateway(up.url, False) as quiet:
        started = [_proxy(tmp_path_factory.mktemp("litellm-stock"), {"wg": gw.url}, False)]
        try:
            started.append(_proxy(tmp_path_factory.mktemp("litellm-callback"), {"wg": gw.url, "quiet": quiet.url},
                                  True))
            yield Stack(started[0][1], started[-1][1], f"{gw.url}/v1", f"{quiet.url}/v1")
        finally:
            for proc, _ in started:
                stop_server(proc)


def _chat(proxy: Proxy, model: str, stream: bool, usage: bool = False) -> tuple[httpx.Headers, list[dict[str, Any]]]:
    """A call through ``proxy``: its headers and its body (one object), or its stream's chunks."""
    body: dict[str, Any] = {"model": model, "messages": MSG, "max_tokens": 8, "stream": stream}
    if usage:
        body["stream_options"] = {"include_usage": True}
    headers = {"authorization": f"Bearer {litellm_proxy.KEY}"}
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        text = r.read().decode()
        assert r.status_code == 200, text
    if not stream:
        return r.headers, [json.loads(text)]
    return r.headers, [json.loads(line[6:]) for line in text.splitlines()
                       if line.startswith("data: ") and line != "data: [DONE]"]


def _delta_energy(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["delta"]["provider_specific_fields"]["energy"] for chunk in chunks for c in chunk.get("choices", [])
            if (c.get("delta") or {}).get("provider_specific_fields", {}).get("energy")]


def _spend_row(proxy: Proxy, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The spend-log metadata LiteLLM built for the call the gateway knows as ``request_id``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.spend_log.exists():
            for line in proxy.spend_log.read_text().splitlines():
                spend = (json.loads(line)["metadata"] or {}).get("spend_logs_metadata") or {}
                if spend.get("energy_request_id") == request_id:
                    return spend
        time.sleep(0.2)
    pytest.fail(f"no spend-log row for {request_id}")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_stream_through_the_stock_proxy_keeps_the_figure(stack: Stack, provider: str):
    """No callback: the finish chunk's delta.provider_specific_fields.energy is what LiteLLM passes on."""
    _, chunks = _chat(stack.stock, f"wg-{provider}", stream=True)
    (energy,) = _delta_energy(chunks)
    assert energy["method"] == "simulated" and energy["joules"] > 0 and energy["completion_tokens"] == 8
    record = settled_records(stack.gateway.removesuffix("/v1"), [energy["request_id"]])[energy["request_id"]]
    assert record["completion_tokens"] == 8 and record["settled"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_plain_body_through_the_stock_proxy_keeps_the_figure(stack: Stack, provider: str):
    headers, (body,) = _chat(stack.stock, f"wg-{provider}", stream=False)
    assert float(headers["llm_provider-x-energy-joules"]) > 0 and headers["llm_provider-x-energy-method"] == "simulated"
    assert USAGE_KEYS <= set(body["usage"])  # LiteLLM keeps the usage keys of a plain body


@pytest.mark.parametrize("usage", [False, True], ids=["no-usage", "include-usage"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_callback_puts_the_figure_on_the_last_chunk_and_in_the_spend_log(stack: Stack, provider: str, usage: bool):
    _, chunks = _chat(stack.with_callback, f"wg-{provider}", stream=True, usage=usage)
    energy = chunks[-1]["energy"]
    assert energy["method"] == "simulated" and energy["completion_tokens"] == 8
    if usage:
        assert {k: chunks[-1]["usage"][k] for k in USAGE_KEYS} == {
            "energy_j": energy["joules"], "energy_wh": energy["wh"], "gco2e": energy["gco2e"],
            "water_ml": energy["water_ml"], "energy_method": "simulated", "energy_settled": False,
            "energy_request_id": energy["request_id"]}
    spend = _spend_row(stack.with_callback, energy["request_id"])
    assert spend["energy_wh"] == energy["wh"] and spend["gco2e"] == energy["gco2e"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_callback_puts_the_figure_on_a_plain_body_and_in_the_spend_log(stack: Stack, provider: str):
    _, (body,) = _chat(stack.with_callback, f"wg-{provider}", stream=False)
    energy = body["energy"]
    assert energy["method"] == "simulated" and body["usage"]["energy_wh"] == energy["wh"]
    assert _spend_row(stack.with_callback, energy["request_id"])["water_ml"] == energy["water_ml"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_callback_fetches_the_figure_a_quiet_gateway_kept_out_of_the_stream(stack: Stack, provider: str,
                                                                                  stream: bool):
    """Behind a gateway with energy_in_usage off, LiteLLM loses the energy object on a stream; the
    callback asks the gateway for its record by the x-request-id it sent."""
    _, chunks = _chat(stack.with_callback, f"quiet-{provider}", stream=stream)
    energy = chunks[-1].get("energy")
    if stream:
        assert not _delta_energy(chunks)
    assert energy is not None and energy["method"] == "simulated", chunks[-1]
    assert _spend_row(stack.with_callback, energy["request_id"])["energy_j"] == energy["joules"]

"""The gateway in front of the real vLLM server (its CPU build), serving a tiny model made on the spot.

Opt-in: ``python tests/real_vllm/build_env.py`` builds the environment, then
``~/.cache/wattgate/vllm-env/bin/python -m pytest -m vllm tests/test_vllm.py`` runs this
suite (README, "Tests"). Elsewhere every test here is skipped, saying why.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="the real-vLLM environment is not installed: python tests/real_vllm/build_env.py")

from tests.conftest import wait_serving, wait_until
from tests.real_vllm.tiny_model import build
from wattgate.proxy.app import create_app
from wattgate.proxy.serving import ServerThread, free_port
from wattgate.proxy.settings import LedgerSettings, MeterSettings, Model, Settings

START_S = 600  # vLLM's start-up on 2 cores: about 100 s
GREEDY = {"temperature": 0, "max_tokens": 12}
MSG = [{"role": "user", "content": "How much energy does one chat answer use?"}]


@dataclass
class Real:
    vllm: str  # vLLM's own base URL (…/v1)
    gateway: str  # the gateway's base URL (…/v1)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Real]:
    model = build(tmp_path_factory.mktemp("tiny-llama"))
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
           "tiny", "--dtype", "float32", "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_serving(proc, f"{base}/models", log, START_S, "vLLM")
        settings = Settings(
            meter=MeterSettings(source="simulated", foreign_poll_ms=200, settle_lag_ms=500),
            ledger=LedgerSettings(enabled=False),
            models={"tiny": Model(served_name="tiny", upstream=base, gpus=[0])},
        )
        with ServerThread(create_app(settings)) as gw:
            yield Real(base, f"{gw.url}/v1")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url, json=body, timeout=120, **kw)


def _stream_text(url: str, body: dict) -> tuple[str, list[dict]]:
    """The text of a stream and its parsed events (``[DONE]`` left out)."""
    events = []
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    text = "".join((c.get("delta", {}).get("content") or c.get("text") or "") for e in events for c in e.get("choices", []))
    return text, events


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_greedy_answers_are_vllms_own_streamed_and_not(real: Real, route: str):
    field = {"messages": MSG} if route == "chat/completions" else {"prompt": "How much energy does one answer use?"}
    direct = _post(f"{real.vllm}/{route}", {"model": "tiny", **field, **GREEDY}).json()
    via = _post(f"{real.gateway}/{route}", {"model": "tiny", **field, **GREEDY}).json()
    pick = (lambda c: c["message"]["content"]) if route == "chat/completions" else (lambda c: c["text"])
    assert pick(via["choices"][0]) == pick(direct["choices"][0])
    streamed, _ = _stream_text(f"{real.gateway}/{route}", {"model": "tiny", **field, **GREEDY})
    assert streamed == pick(direct["choices"][0])


USAGE_FIGURES = {"energy_j", "energy_wh", "gco2e", "water_ml", "energy_method", "energy_settled", "energy_request_id"}


def test_usage_and_the_energy_objects_token_counts_are_vllms(real: Real):
    direct = _post(f"{real.vllm}/chat/completions", {"model": "tiny", "messages": MSG, **GREEDY}).json()
    via = _post(f"{real.gateway}/chat/completions", {"model": "tiny", "messages": MSG, **GREEDY}).json()
    figures = {k: via["usage"].pop(k) for k in USAGE_FIGURES}  # the gateway's, beside vLLM's own keys
    assert via["usage"] == direct["usage"] and figures["energy_j"] == via["energy"]["joules"]
    assert (via["energy"]["prompt_tokens"], via["energy"]["completion_tokens"]) == (
        direct["usage"]["prompt_tokens"], direct["usage"]["completion_tokens"])


@pytest.mark.parametrize("include_usage", [True, False])
def test_the_usage_chunk_ends_the_stream_with_the_figures_whether_the_client_asked_or_not(real: Real,
                                                                                          include_usage: bool):
    body = {"model": "tiny", "messages": MSG, **GREEDY, "stream_options": {"include_usage": include_usage}}
    _, events = _stream_text(f"{real.gateway}/chat/completions", body)
    assert [i for i, e in enumerate(events) if e.get("usage")] == [len(events) - 1]  # only the last chunk
    last = events[-1]
    assert last.get("energy") and last["energy"]["completion_tokens"] == last["usage"]["completion_tokens"] >= 1
    assert USAGE_FIGURES <= set(last["usage"]) and last["provider_specific_fields"] == {"energy": last["energy"]}


def test_tools_and_response_format_pass_through(real: Real):
    """A named tool and a JSON schema reach vLLM as sent: its constrained answers come back the same."""
    tool = {"type": "function", "function": {"name": "energy", "description": "look up energy",
                                             "parameters": {"type": "object", "properties": {"joules": {"type": "number"}},
                                                            "required": ["joules"]}}}
    schema = {"type": "json_schema", "json_schema": {"name": "figure", "schema": {
        "type": "object", "properties": {"joules": {"type": "number"}}, "required": ["joules"]}}}
    for extra in ({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "energy"}}},
                  {"response_format": schema}):
        body = {"model": "tiny", "messages": MSG, **GREEDY, "max_tokens": 40, **extra}
        direct = _post(f"{real.vllm}/chat/completions", body)
        via = _post(f"{real.gateway}/chat/completions", body)
        assert via.status_code == direct.status_code, (extra, direct.text)
        if direct.status_code == 200:
            assert via.json()["choices"][0]["message"] == direct.json()["choices"][0]["message"]


def test_vllms_own_errors_come_back_unchanged(real: Real):
    too_long = {"model": "tiny", "messages": MSG, "max_tokens": 100_000}
    direct, via = _post(f"{real.vllm}/chat/completions", too_long), _post(f"{real.gateway}/chat/completions", too_long)
    assert via.status_code == direct.status_code == 400
    assert via.json()["error"] == direct.json()["error"]  # relayed as vLLM wrote it
    bad = {"model": "tiny", "messages": MSG, "temperature": -1}
    direct, via = _post(f"{real.vllm}/chat/completions", bad), _post(f"{real.gateway}/chat/completions", bad)
    assert via.status_code == direct.status_code >= 400 and via.json()["error"] == direct.json()["error"]
    # Embeddings from a generative model: vLLM 0.32 has no such route for it (404, Starlette's own
    # body). The gateway answers the same status, in OpenAI's error shape, quoting vLLM's body.
    embed = {"model": "tiny", "input": "How much energy?"}
    direct, via = _post(f"{real.vllm}/embeddings", embed), _post(f"{real.gateway}/embeddings", embed)
    assert via.status_code == direct.status_code
    if direct.status_code >= 400:
        error = via.json()["error"]
        assert error == direct.json()["error"] if "error" in direct.json() else direct.text in error["message"]


def test_sixteen_concurrent_streams_come_through_intact(real: Real):
    body = {"model": "tiny", "messages": MSG, **GREEDY}
    expected = _post(f"{real.vllm}/chat/completions", body).json()["choices"][0]["message"]["content"]

    async def one(client: httpx.AsyncClient) -> str:
        text = ""
        async with client.stream("POST", "/chat/completions", json={**body, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:]).get("choices", []):
                        text += c.get("delta", {}).get("content") or ""
        return text

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=real.gateway, timeout=300) as client:
            return await asyncio.gather(*(one(client) for _ in range(16)))

    assert asyncio.run(run()) == [expected] * 16


def _vllm_metric(real: Real, name: str) -> float:
    """The sum of one of vLLM's own metrics over its label sets, read from its real /metrics."""
    text = httpx.get(real.vllm.removesuffix("/v1") + "/metrics", timeout=5).text
    return sum(float(m) for m in re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.MULTILINE))


def test_a_client_that_leaves_stops_vllms_generation(real: Real):
    """Read to its end, this answer is 480 tokens (about 2 s alone on 2 cores). A client that
    leaves after a few chunks must stop vLLM's generation: its token counter stays far short."""
    def tokens() -> float:
        return _vllm_metric(real, "vllm:generation_tokens_total")

    before = tokens()
    body = {"model": "tiny", "messages": MSG, "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{real.gateway}/chat/completions", json=body, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    # An absence to check: long enough for the whole answer, had the generation gone on.
    time.sleep(3)
    assert tokens() - before < 240
    assert _vllm_metric(real, "vllm:num_requests_running") == 0


def test_readyz_reports_the_vllm_upstream(real: Real):
    ready = httpx.get(real.gateway.removesuffix("/v1") + "/readyz").json()
    assert ready["upstreams"] == {"tiny": True}


def test_direct_vllm_traffic_is_unattributed_energy(real: Real):
    gw_root = real.gateway.removesuffix("/v1")

    def unattributed() -> float:
        text = httpx.get(f"{gw_root}/metrics").text
        return float(re.search(r'^wattgate_gpu_unattributed_energy_joules_total\{gpu="0"\} ([0-9.e+]+)$', text, re.MULTILINE)[1])

    before = unattributed()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            direct = {"model": "tiny", "messages": MSG, "max_tokens": 200, "ignore_eos": True}
            await asyncio.gather(*(client.post(f"{real.vllm}/chat/completions", json=direct) for _ in range(4)),
                                 client.post(f"{real.gateway}/chat/completions", json={**direct, "max_tokens": 100}))

    asyncio.run(run())
    wait_until(lambda: unattributed() > before, timeout=10, what="direct vLLM traffic counted as unattributed")


def test_the_simulated_upstream_writes_what_vllm_writes(real: Real):
    """The fast suite tests the gateway against proxy/simulated_upstream.py: its answers must keep
    the shape of vLLM's (keys of the body, the choice, the message or delta; the usage chunk; the
    error for too many tokens), so that a change in vLLM shows up here."""
    from wattgate.meter.sources.simulated import SimulatedGpu
    from wattgate.proxy.simulated_upstream import SimulatedUpstream

    def shape(base: str) -> dict[str, object]:
        plain = _post(f"{base}/chat/completions", {"model": "tiny", "messages": MSG, **GREEDY}).json()
        _, events = _stream_text(f"{base}/chat/completions", {"model": "tiny", "messages": MSG, **GREEDY,
                                                              "ignore_eos": True, "stream_options": {"include_usage": True}})
        error = _post(f"{base}/chat/completions", {"model": "tiny", "messages": MSG, "max_tokens": 100_000}).json()
        token = events[1]  # the first token's chunk, after the role's
        return {
            "body": sorted(plain), "choice": sorted(plain["choices"][0]), "message": sorted(plain["choices"][0]["message"]),
            "usage": sorted(plain["usage"]), "first chunk": sorted(events[0]), "token chunk": sorted(token),
            "token choice": sorted(token["choices"][0]), "usage chunk": sorted(events[-1]),
            "error": sorted(error["error"]), "error param": error["error"]["param"],
        }

    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name="tiny", max_model_len=512)) as sim:
        assert shape(f"{sim.url}/v1") == shape(real.vllm)

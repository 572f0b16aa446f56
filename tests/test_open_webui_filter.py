"""The Open WebUI filter (integrations/open_webui_filter.py) against a real gateway, as Open WebUI calls it.

The file is loaded the way Open WebUI loads a Function (its text executed as a new module), so
it must stand alone. Chunks come from real calls to the gateway; ``usage`` is merged across a
stream's chunks as Open WebUI does (later keys win). The filter in the real Open WebUI, driven
in Chromium, is the opt-in suite tests/test_open_webui.py.
"""

from __future__ import annotations

import ast
import asyncio
import json
import types
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SERVED, Stack
from wattgate.proxy.equivalents import EQUIVALENTS, equivalent, sig3
from wattgate.proxy.figures import usage_fields
from wattgate.proxy.serving import free_port

FILE = Path(__file__).resolve().parents[1] / "integrations" / "open_webui_filter.py"
MSG = [{"role": "user", "content": "How much energy does one chat answer use?"}]


def load_filter() -> types.ModuleType:
    """The file as Open WebUI's ``load_function_module_by_id`` makes it: exec'd into a fresh module."""
    module = types.ModuleType("function_wattgate_energy")
    exec(compile(FILE.read_text(), str(FILE), "exec"), module.__dict__)  # noqa: S102  # what Open WebUI does
    return module


owui = load_filter()


def test_the_file_stands_alone_and_has_open_webuis_frontmatter() -> None:
    tree = ast.parse(FILE.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "asyncio", "logging", "math", "time", "collections", "typing", "aiohttp",
                        "pydantic"}, imported
    lines = FILE.read_text().splitlines()
    assert lines[0] == '"""' and any(line.startswith("title: ") for line in lines[1:6])


def test_its_keys_equivalent_and_numbers_are_the_gateways() -> None:
    energy = {"request_id": "chatcmpl-1", "joules": 99.5, "wh": 0.0276, "gco2e": 0.0159, "water_ml": 0.15,
              "method": "nvml", "settled": False}
    assert {k: energy[v] for k, v in owui.USAGE_KEYS.items()} == usage_fields(energy)
    assert owui.BULB in EQUIVALENTS
    for x in (0, 0.000123456, 0.0276, 1.0, 9.996, 12.5, 999.5, 123456.0):
        assert owui.sig3(x) == sig3(x)
    for wh in (0.0276, 0.5, 20.0, 123.0):
        assert f"{owui.BULB['what']} for {owui.bulb_time(wh)}" == equivalent(owui.BULB, {"wh": wh})


def test_inlet_asks_for_the_usage_chunk_only_on_streams() -> None:
    f = owui.Filter()
    assert f.inlet({"stream": True, "stream_options": {"x": 1}})["stream_options"] == {"x": 1, "include_usage": True}
    assert "stream_options" not in f.inlet({"stream": False})


ENERGY = {"request_id": "chatcmpl-7", "joules": 99.5, "wh": 0.0276, "gco2e": 0.0159, "water_ml": 0.15,
          "method": "simulated", "settled": False}


@pytest.mark.parametrize("chunk", [
    {"choices": [], "energy": ENERGY},  # the gateway's energy chunk
    {"choices": [], "provider_specific_fields": {"energy": ENERGY}},  # LiteLLM, openai/ models
    {"choices": [{"index": 0, "delta": {"provider_specific_fields": {"energy": ENERGY}}, "finish_reason": "stop"}]},
    {"choices": [{"index": 0, "message": {"content": "hi", "provider_specific_fields": {"energy": ENERGY}}}]},
], ids=["energy", "top-level-psf", "delta-psf", "message-psf"])
def test_stream_copies_the_figure_into_usage_wherever_it_came(chunk: dict[str, Any]) -> None:
    chunk = json.loads(json.dumps(chunk))
    chunk["usage"] = {"prompt_tokens": 3}
    out = owui.Filter().stream(chunk)
    assert out["usage"] == {"prompt_tokens": 3, **usage_fields(ENERGY)}


@pytest.mark.parametrize("chunk", [
    {"choices": [{"index": 0, "delta": {"content": "hi"}}]},
    {"choices": [], "usage": {"prompt_tokens": 3}},
    {"choices": [], "energy": {"wh": "lots"}},
    {"choices": [None, {"delta": None}], "provider_specific_fields": None},
], ids=["content", "usage", "not-a-figure", "odd"])
def test_stream_leaves_chunks_without_a_figure_alone(chunk: dict[str, Any]) -> None:
    assert owui.Filter().stream(json.loads(json.dumps(chunk))) == chunk


def _reply(url: str, stream: bool, key: str | None = None) -> dict[str, Any]:
    """A call to the gateway as Open WebUI makes it, through the filter's inlet and stream hooks:
    the reply's message as Open WebUI saves it (content, usage merged across chunks)."""
    f = owui.Filter()
    body = f.inlet({"model": "llama", "messages": MSG, "max_tokens": 6, "stream": stream})
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    if not stream:
        return {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"], "usage": r.json()["usage"]}
    usage: dict[str, Any] = {}
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            usage |= f.stream(json.loads(line[6:])).get("usage") or {}
    return {"role": "assistant", "content": "", "usage": usage}


async def _outlet(f: Any, messages: list[dict[str, Any]]) -> list[str]:
    events: list[dict[str, Any]] = []

    async def emit(event: dict[str, Any]) -> None:
        events.append(event)

    body = {"model": "llama", "messages": messages}
    assert await f.outlet(body, __event_emitter__=emit) is body
    await asyncio.gather(*f._following)
    assert all(e["type"] == "status" and e["data"]["done"] for e in events)
    return [e["data"]["description"] for e in events]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_outlet_writes_the_line_then_the_settled_line_with_the_total(stack: Stack, stream: bool) -> None:
    f = owui.Filter()
    f.valves.gateway_url = stack.url
    first, second = _reply(stack.url, stream), _reply(stack.url, stream)
    assert first["usage"]["energy_settled"] is False and first["usage"]["energy_method"] == "simulated"
    lines = asyncio.run(_outlet(f, [{"role": "user", "content": "q"}, first]))
    settled = stack.record(first["usage"]["energy_request_id"])
    assert lines == [owui.status_line(owui.figure_in(first["usage"]), [owui.figure_in(first["usage"])]),
                     owui.status_line(settled, [settled])]
    assert "(simulated, provisional)" in lines[0] and "(simulated, settled)" in lines[1]
    assert f"⚡ {sig3(settled['wh'])} Wh · {sig3(settled['gco2e'])} gCO2e · {sig3(settled['water_ml'])} mL" in lines[1]
    # The next reply's total counts the first at its settled figure, which the filter kept.
    lines = asyncio.run(_outlet(f, [{"role": "user", "content": "q"}, first, {"role": "user", "content": "q"}, second]))
    total = settled["wh"] + stack.record(second["usage"]["energy_request_id"])["wh"]
    assert lines[-1].endswith(f" · this chat: {sig3(total)} Wh, {equivalent(owui.BULB, {'wh': total})}")


def test_outlet_says_nothing_without_a_figure_and_only_the_first_line_without_a_gateway(stack: Stack) -> None:
    f = owui.Filter()
    assert asyncio.run(_outlet(f, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])) == []
    assert asyncio.run(_outlet(f, [{"role": "assistant", "content": "a", "usage": {"prompt_tokens": 2}}])) == []
    assert asyncio.run(_outlet(f, [])) == []
    reply = _reply(stack.url, True)
    assert len(asyncio.run(_outlet(f, [reply]))) == 1  # no gateway_url: the provisional line only
    f.valves.gateway_url, f.valves.settle_timeout_s = f"http://127.0.0.1:{free_port()}", 0.5  # nothing listens
    assert [line.endswith("provisional)") for line in asyncio.run(_outlet(f, [reply]))] == [True]


def test_outlet_reads_with_the_valves_key(tmp_path: Path) -> None:
    """A gateway with keys answers the follow-up only with a key of the call's team."""
    from wattgate.meter.sources.simulated import SimulatedGpu
    from wattgate.proxy.app import create_app
    from wattgate.proxy.serving import ServerThread
    from wattgate.proxy.settings import Auth, GatewaySettings, LedgerSettings, MeterSettings, Model, Settings
    from wattgate.proxy.simulated_upstream import SimulatedUpstream

    keys = tmp_path / "keys"
    keys.write_text("team-a:sk-team-a-0123456789abcdef\nteam-b:sk-team-b-0123456789abcdef\n")
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED)) as up:
        settings = Settings(meter=MeterSettings(source="simulated", settle_lag_ms=200),
                            ledger=LedgerSettings(enabled=False),
                            gateway=GatewaySettings(auth=Auth(keys_file=str(keys))),
                            models={"llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])})
        with ServerThread(create_app(settings)) as gw:
            reply = _reply(gw.url, True, key="sk-team-a-0123456789abcdef")
            f = owui.Filter()
            f.valves.gateway_url, f.valves.settle_timeout_s = gw.url, 2.0
            f.valves.gateway_api_key = "sk-team-b-0123456789abcdef"  # another team: the record is not theirs
            assert len(asyncio.run(_outlet(f, [reply]))) == 1
            f.valves.gateway_api_key = "sk-team-a-0123456789abcdef"
            assert asyncio.run(_outlet(f, [reply]))[-1].endswith("(simulated, settled)")

"""``wattgate demo``: the gateway in front of a simulated vLLM on a simulated H100, end to end.

No GPU, no network, no other server: everything runs in this process on
localhost, and every figure is labelled ``simulated``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam
from pydantic import HttpUrl

from wattgate.meter import Meter
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.app import create_app
from wattgate.proxy.ledger_file import data_dir
from wattgate.proxy.metering import build_meter
from wattgate.proxy.serving import ServerThread
from wattgate.proxy.settings import ConfigError, LedgerSettings, MeterSettings, Model, Settings, Site
from wattgate.proxy.simulated_upstream import SimulatedUpstream

MODEL = "llama-3.1-8b"
SERVED = "meta-llama/Llama-3.1-8B-Instruct"
QUESTIONS = [
    "How much energy does one chat answer use?",
    "Explain continuous batching in one paragraph.",
    "Why is the H100 energy counter updated only every 100 ms?",
    "What is PUE?",
]


def demo_ledger() -> Path:
    """The demo's own ledger: its simulated records never mix with a gateway's real ones."""
    return data_dir() / "demo-ledger.db"


def demo_settings(upstream_url: str, ledger: Path | None = None) -> Settings:
    return Settings(
        site=Site(grid_zone="USA"),
        ledger=LedgerSettings(path=ledger or demo_ledger()),
        meter=MeterSettings(source="simulated", interval_ms=50, settle_lag_ms=500),
        models={MODEL: Model(served_name=SERVED, upstream=HttpUrl(f"{upstream_url}/v1"), gpus=[0])},
    )


async def _one(client: openai.AsyncOpenAI, i: int, stream: bool, max_tokens: int) -> dict[str, Any]:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
    if stream:
        chunks = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=max_tokens, stream=True
        )
        energy = None
        async for chunk in chunks:
            energy = (chunk.model_extra or {}).get("energy") or energy
    else:
        resp = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)
        energy = (resp.model_extra or {}).get("energy")
    assert energy is not None
    return {"id": energy["request_id"], "mode": "stream" if stream else "json", "batch": 0,
            "inline_j": energy["joules"], **energy}


async def _workload(base_url: str) -> list[dict[str, Any]]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="demo", max_retries=0)
    results = []
    # Alone, then in growing batches: energy per token falls as the batch grows.
    for batch in (1, 4, 16, 48):
        wave = await asyncio.gather(
            *(_one(client, i, stream=i % 2 == 0, max_tokens=48 + 16 * (i % 3)) for i in range(batch))
        )
        for r in wave:
            r["batch"] = batch
        results += wave
        await asyncio.sleep(0.3)  # a short idle gap between waves
    await client.close()
    return results


def _settled(base_url: str, results: list[dict[str, Any]], timeout_s: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    out = []
    with httpx.Client(base_url=base_url) as http:
        for r in results:
            while True:
                rec = http.get(f"/v1/energy/{r['id']}").json()
                if rec.get("settled") or time.monotonic() > deadline:
                    out.append({**r, **rec})
                    break
                time.sleep(0.1)
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    """Settled figures per request, with the inline (provisional) figure the response carried beside them."""
    head = (f"{'request':<14}{'mode':<7}{'batch':>5}{'prompt':>7}{'compl':>6}{'inline J':>9}{'J':>9}{'diff':>7}"
            f"{'J/tok':>7}{'Wh':>10}{'gCO2e':>9}{'mL':>8}  method")
    lines = [head, "-" * len(head)]
    for r in rows:
        jpt = r["joules"] / max(r["completion_tokens"], 1)
        diff = f"{r['inline_j'] / r['joules'] - 1:+.1%}" if r["joules"] else "-"
        lines.append(
            f"{r['id'][-12:]:<14}{r['mode']:<7}{r['batch']:>5}{r['prompt_tokens']:>7}{r['completion_tokens']:>6}"
            f"{r['inline_j']:>9.2f}{r['joules']:>9.2f}{diff:>7}{jpt:>7.3f}{r['wh']:>10.5f}{r['gco2e']:>9.4f}"
            f"{r['water_ml']:>8.3f}  {r['method']}" + ("" if r.get("settled") else " (not settled yet)")
        )
    return "\n".join(lines)


@contextmanager
def demo_stack(port: int = 0, ledger: Path | None = None) -> Iterator[tuple[str, Meter]]:
    """The demo's gateway (its URL, its meter) in front of a simulated vLLM on a simulated H100."""
    gpu = SimulatedGpu()
    upstream = SimulatedUpstream(gpu, served_name=SERVED)
    with ServerThread(upstream) as up:
        settings = demo_settings(up.url, ledger)
        # The registry's wiring, with the upstream's simulated GPU as the one metered.
        meter, drive = build_meter(settings, simulated_gpus={0: gpu})
        with ServerThread(create_app(settings, meter=meter, drive=drive), port=port or None) as gw:
            print(f"wattgate demo: gateway {gw.url} -> simulated vLLM {up.url} on a simulated H100 (method=simulated)")
            yield gw.url, meter


def _port_free(port: int) -> None:
    """A busy ``--port`` is said in one line, before anything starts (uvicorn would log it and exit)."""
    try:
        with socket.create_server(("127.0.0.1", port)):
            pass
    except OSError as e:
        raise ConfigError(f"--port {port}: cannot listen on 127.0.0.1:{port} ({e.strerror}); "
                          "pick another, or leave --port out for a free one") from None


def run_demo(keep_serving: bool = False, port: int = 0) -> int:
    if port:
        _port_free(port)
    with demo_stack(port) as (url, meter):
        print("sending 69 chat requests (streamed and not) in waves of 1, 4, 16 and 48 concurrent...\n")
        rows = _settled(url, asyncio.run(_workload(url)))
        print(_table(rows))
        _totals(rows, meter)
        if keep_serving:
            _snippets(url)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def _totals(rows: list[dict[str, Any]], meter: Meter) -> None:
    joules = sum(r["joules"] for r in rows)
    tokens = sum(r["completion_tokens"] for r in rows)
    diffs = sorted(abs(r["inline_j"] / r["joules"] - 1) for r in rows if r["joules"])
    if diffs:
        print(f"\ninline figures (headers, body, last stream chunk) against settled ones: median {diffs[len(diffs) // 2]:.1%}, "
              f"95th percentile {diffs[min(len(diffs) - 1, int(0.95 * len(diffs)))]:.1%}, worst {diffs[-1]:.1%} off")
    print(
        f"\ntotal: {len(rows)} requests, {tokens} completion tokens, {joules:.1f} J = {joules / 3600:.4f} Wh, "
        f"{sum(r['gco2e'] for r in rows):.4f} gCO2e, {sum(r['water_ml'] for r in rows):.3f} mL water "
        f"(grid {rows[0]['grid_zone']} {rows[0]['grid_intensity_g_per_kwh']:.0f} g/kWh, PUE {rows[0]['pue']})"
    )
    for batch in sorted({r["batch"] for r in rows}):
        wave = [r for r in rows if r["batch"] == batch]
        jpt = sum(r["joules"] for r in wave) / max(sum(r["completion_tokens"] for r in wave), 1)
        print(f"  batch {batch:>2}: {jpt:.3f} J per completion token")
    for gpu, t in meter.gpu_totals().items():
        print(
            f"GPU {gpu} (simulated): measured {t.measured:.1f} J = attributed {t.attributed:.1f} J"
            f" + idle {t.idle:.1f} J + unattributed {t.unattributed:.1f} J"
        )
    print("All figures are simulated: no GPU was measured. Point `wattgate serve` at vLLM for measured ones.")
    print(f"Settled records are in the demo's own ledger {demo_ledger()}, with those of earlier demo runs: "
          f"try `wattgate report --ledger {demo_ledger()} --since 5m` for this run's.")


def _snippets(url: str) -> None:
    print(
        f"""
The gateway stays up at {url} (Ctrl+C to stop).

  Chat in a browser, with each reply's energy under it:  {url}/chat

Or try:

  curl -si {url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}]}}' | grep -i '^x-\\|energy'

  python -c "import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='x'); \\
r = c.chat.completions.create(model='{MODEL}', messages=[{{'role': 'user', 'content': 'hi'}}]); \\
print(r.model_extra['energy'])"

  curl -s {url}/metrics | grep wattgate_
""",
        flush=True,  # the demo then waits: what it printed must reach a pipe now, not at exit
    )

"""How close the inline figures (headers, the body's and the stream's ``energy``) are to the settled ones.

    python -m bench.inline [--mode gateway|trace|both|gpu] [--runs 3] [--spaced-json]

The workload of issue 12: waves of 1, 8, 1, 16, 2, 1, 4, 12, 1 concurrent chat
requests, alternately streamed and plain, of 24 to 72 tokens (so concurrency
also changes inside a wave), on a simulated H100 decoding at 5 ms per token.

- ``gateway``: ``wattgate serve`` (the registry's default meter settings,
  ``meter.source: simulated``) in front of ``wattgate simulate-upstream``, each
  in its own process, as a user would run them. Each request's inline figure
  (``x-energy-joules`` for plain requests, the last chunk's ``energy`` for
  streams) is compared with its settled record from ``GET /v1/energy/{id}``.
- ``trace``: the same waves on a scripted GPU (an H100-like counter stepping
  every 100 ms, power every 10 ms) replayed into the meter on a scripted clock:
  no HTTP and no timing noise, the same figures every run. Once with the counter
  read every second (what ``auto`` chose on the H200 host), once every poll.
  The GPU idles ``LEAD_S`` first, as a gateway's sampler runs from start-up.
- ``gpu`` (on a host with an NVIDIA GPU, PyTorch and transformers; issue 19):
  the gateway with ``meter.source: nvml`` in front of a transformer on GPU 0
  (``tests/gpu_upstream.py``; requests take turns step by step), the same waves.
  Also prints the settled figures' sum against GPU 0's energy counter read
  around the workload.

Prints p50, p95 and worst of |inline / settled - 1| for streams and plain
requests separately. Targets (issue 12): p95 <= 5 %, worst <= 15 %.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.overhead import _stop, _wait, _wait_workers
from tests.replay import (
    ARRIVAL_GAP_S,
    LEAD_S,
    PHASES,
    PROFILE,
    SPARSE_COUNTER_S,
    Planned,
    Replayed,
    run_trace,
    summary,
    workload,
)
from wattgate.proxy.serving import ServerThread, free_port

MODEL = "llama"
SERVED = "meta-llama/Llama-3.1-8B-Instruct"
CLI = [sys.executable, "-m", "wattgate.proxy.cli"]


def show(title: str, pairs: list[tuple[bool, float, float]], target: bool = True) -> None:
    print(title)
    for kind, s in summary(pairs).items():
        ok = "meets" if s["p95"] <= 0.05 and s["worst"] <= 0.15 else "MISSES"
        verdict = f"  ({ok} p95 <= 5 %, worst <= 15 %)" if target else ""
        print(f"  {kind:<7}n={s['n']:<4.0f}p50 {s['p50']:6.1%}  p95 {s['p95']:6.1%}  worst {s['worst']:6.1%}{verdict}")


# -- through the gateway ---------------------------------------------------------------------------


async def _send(client: httpx.AsyncClient, p: Planned) -> tuple[str, float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about energy, briefly."}],
            "max_tokens": p.max_tokens, "stream": p.stream}
    if not p.stream:
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        energy = r.json()["energy"]
        assert math.isclose(float(r.headers["x-energy-joules"]), energy["joules"], rel_tol=1e-5, abs_tol=1e-6)
        return energy["request_id"], energy["joules"]
    energy = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"energy"' in line:
                energy = orjson.loads(line[6:]).get("energy") or energy
    assert energy is not None
    return energy["request_id"], energy["joules"]


async def _gateway_workload(url: str) -> list[tuple[bool, str, float]]:
    out = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for wave in workload():
            got = await asyncio.gather(*(_send(client, p) for p in wave))
            out += [(p.stream, rid, joules) for p, (rid, joules) in zip(wave, got)]
            await asyncio.sleep(0.05)
    return out


def _settled(url: str, ids: list[str], timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """The settled records of ``ids`` (those that settle within ``timeout_s``)."""
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url) as http:
        while len(found) < len(ids) and time.monotonic() < deadline:
            for rid in ids:
                if rid not in found and (rec := http.get(f"/v1/energy/{rid}").json()).get("settled"):
                    found[rid] = rec
            time.sleep(0.1)
    return found


@contextmanager
def _gateway(upstream: str, meter: str, workers: int) -> Iterator[str]:
    """``wattgate serve`` (with ``--workers``) in its own process in front of ``upstream``, as a user runs
    it, with ``meter`` as the registry's meter settings; its URL once every worker is connected."""
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="wattgate-inline-"))
    registry = home / "registry.yaml"
    registry.write_text(
        f"models:\n  {MODEL}:\n    served_name: {SERVED}\n    upstream: {upstream}/v1\n"
        f"    gpus: [0]\nmeter: {meter}\nledger: {{path: {home / 'ledger.db'}}}\n"
    )
    gateway = subprocess.Popen([*CLI, "serve", "--config", str(registry), "--port", str(port), "--log-level", "warning",
                                "--workers", str(workers)])
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/healthz")
        _wait_workers(url, workers)
        yield url
    finally:
        _stop(gateway)
        shutil.rmtree(home, ignore_errors=True)


def _inline_and_settled(url: str) -> tuple[list[tuple[bool, float, float]], set[str]]:
    """The workload through the gateway at ``url``: ``(stream, inline J, settled J)`` per request, and the
    methods the settled figures were obtained by."""
    inline = asyncio.run(_gateway_workload(url))
    settled = _settled(url, [rid for _, rid, _ in inline])
    missing = [rid for _, rid, _ in inline if rid not in settled]
    if missing:
        raise RuntimeError(f"{len(missing)} requests did not settle")
    pairs = [(stream, joules, settled[rid]["joules"]) for stream, rid, joules in inline]
    return pairs, {rec["method"] for rec in settled.values()}


def run_gateway(spaced_json: bool = False, workers: int = 1) -> list[tuple[bool, float, float]]:
    """The workload through the gateway (simulated meter) in front of ``wattgate simulate-upstream``."""
    up_port = free_port()
    upstream_cmd = [*CLI, "simulate-upstream", "--port", str(up_port), "--itl-ms", str(PROFILE.itl_1_s * 1000)]
    upstream = subprocess.Popen([*upstream_cmd, *(["--spaced-json"] if spaced_json else [])])
    try:
        _wait(f"http://127.0.0.1:{up_port}/v1/models")
        with _gateway(f"http://127.0.0.1:{up_port}", "{source: simulated}", workers) as url:
            return _inline_and_settled(url)[0]
    finally:
        _stop(upstream)


def run_gpu(power_lag_ms: int | None, workers: int = 1) -> tuple[list[tuple[bool, float, float]], set[str], float]:
    """The workload through the gateway (NVML meter) in front of a transformer on GPU 0
    (``tests/gpu_upstream.py``): the pairs, the settled figures' methods, and GPU 0's counter over the workload."""
    from tests.gpu_upstream import TorchUpstream, counter_j

    lag = "" if power_lag_ms is None else f", power_lag_ms: {power_lag_ms}"
    with ServerThread(TorchUpstream(served_name=SERVED, max_model_len=2048)) as up, \
            _gateway(up.url, f"{{source: nvml{lag}}}", workers) as url:
        time.sleep(LEAD_S)  # the sampler learns the counter's steps before requests come, as in a running gateway
        e0 = counter_j()
        pairs, methods = _inline_and_settled(url)
        e1 = counter_j()
    return pairs, methods, e1 - e0


# -- on a scripted clock ---------------------------------------------------------------------------


def show_trace(title: str, results: list[Replayed]) -> None:
    show(f"{title}\n inline vs settled:", [(r.stream, r.inline.joules, r.settled.joules) for r in results])
    for name, figure in (("settled", lambda r: r.settled.joules), ("inline", lambda r: r.inline.joules)):
        show(f" {name} vs what each drew on the scripted GPU (no target):",
             [(r.stream, figure(r), r.own_j) for r in results], target=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["gateway", "trace", "both", "gpu"], default="both")
    parser.add_argument("--runs", type=int, default=3, help="gateway runs (the summary pools them)")
    parser.add_argument("--spaced-json", action="store_true", help="the upstream writes JSON with spaces")
    parser.add_argument("--workers", type=int, default=1, help="gateway: wattgate serve --workers")
    parser.add_argument("--scale-tokens", type=int, default=1, help="trace: requests this many times longer")
    parser.add_argument("--arrival-gap-ms", type=float, default=ARRIVAL_GAP_S * 1000,
                        help="trace: time between a wave's requests reaching the GPU")
    parser.add_argument("--power-lag-ms", type=int, help="gpu: meter.power_lag_ms (default: the registry's)")
    args = parser.parse_args()
    if args.mode == "gpu":
        pairs, methods, counter = run_gpu(args.power_lag_ms, args.workers)
        settled_j = sum(settled for _, _, settled in pairs)
        lag = "the registry's default" if args.power_lag_ms is None else f"{args.power_lag_ms} ms"
        show(f"gpu (wattgate serve --workers {args.workers}, NVML meter at its defaults, power_lag_ms {lag}, a "
             "transformer on GPU 0):", pairs)
        print(f"  settled, all requests: {settled_j:.1f} J; GPU 0's energy counter over the workload: {counter:.1f} J "
              f"({settled_j / counter:.3f}; the gaps between waves are idle, no request's); methods {sorted(methods)}")
    if args.mode in ("trace", "both"):
        waves, gap = workload(scale=args.scale_tokens), args.arrival_gap_ms / 1000
        phases = f"polls at {len(PHASES)} phases of the counter's steps, pooled"
        show_trace(f"trace, counter read every {SPARSE_COUNTER_S:g} s (as `auto` chose on the H200 host), {phases}:",
                   run_trace(waves, gap, counter_every_s=SPARSE_COUNTER_S))
        show_trace(f"trace, counter read every poll, {phases}:", run_trace(waves, gap))
    if args.mode in ("gateway", "both"):
        style = "spaced" if args.spaced_json else "compact"
        pooled = []
        for i in range(args.runs):
            pairs = run_gateway(args.spaced_json, args.workers)
            show(f"gateway run {i + 1} (wattgate serve --workers {args.workers}, simulated meter, upstream JSON "
                 f"{style}):", pairs)
            pooled += pairs
        if args.runs > 1:
            show(f"gateway, {args.runs} runs pooled:", pooled)


if __name__ == "__main__":
    main()

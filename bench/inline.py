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
  (``bench/gpu_upstream.py``; requests take turns step by step), the same waves.
  Also prints the settled figures' sum against GPU 0's energy counter read
  around the workload.

Prints p50, p95 and worst of |inline / settled - 1| for streams and plain
requests separately. Targets (issue 12): p95 <= 5 %, worst <= 15 %.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bench.overhead import _stop, _wait, _wait_workers
from wattgate.meter import Measurement, Meter
from wattgate.meter.sources.simulated import GpuProfile
from wattgate.meter.sources.trace import TraceSource
from wattgate.proxy.serving import ServerThread, free_port

WAVES = (1, 8, 1, 16, 2, 1, 4, 12, 1)
PROFILE = GpuProfile(itl_1_s=0.005)  # 5 ms per token alone (issue 12's workload)
MODEL = "llama"
SERVED = "meta-llama/Llama-3.1-8B-Instruct"
PROMPT_TOKENS = 12
SPARSE_COUNTER_S = 1.0  # what `counter_interval_ms: auto` chose on the H200 host (a read cost 4 ms of CPU)
PHASES = (0.0, 0.0137, 0.0251, 0.0377)  # poll times past the counter's 100 ms steps (s): a poll can see a step at once or late
ARRIVAL_GAP_S = 0.0005  # a wave's requests reach the GPU one after another, as through one gateway
# The scripted GPU idles this long before the first wave: a gateway's sampler runs from start-up, and
# has learnt when the counter steps (about 2.5 s, see meter.counter_steps) before requests come.
LEAD_S = 4.0
CLI = [sys.executable, "-m", "wattgate.proxy.cli"]


@dataclass(frozen=True, slots=True)
class Planned:
    """One request of the workload."""

    stream: bool
    max_tokens: int


def workload(waves: tuple[int, ...] = WAVES, scale: int = 1) -> list[list[Planned]]:
    """The requests of each wave: alternately streamed and plain, 24 to 72 tokens (times ``scale``)."""
    out, k = [], 0
    for size in waves:
        wave = []
        for i in range(size):
            wave.append(Planned(stream=k % 2 == 0, max_tokens=(24 + 12 * (i % 5)) * scale))
            k += 1
        out.append(wave)
    return out


def summary(pairs: list[tuple[bool, float, float]]) -> dict[str, dict[str, float]]:
    """p50/p95/worst of |inline / settled - 1| per kind, from ``(stream, inline J, settled J)``."""
    out = {}
    for kind, stream in (("stream", True), ("plain", False)):
        errs = sorted(abs(i / s - 1) for st, i, s in pairs if st is stream and s > 0)
        if errs:
            out[kind] = {
                "n": len(errs),
                "p50": statistics.median(errs),
                "p95": errs[min(len(errs) - 1, math.ceil(0.95 * len(errs)) - 1)],
                "worst": errs[-1],
            }
    return out


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
    (``bench/gpu_upstream.py``): the pairs, the settled figures' methods, and GPU 0's counter over the workload."""
    from bench.gpu_upstream import TorchUpstream, counter_j

    lag = "" if power_lag_ms is None else f", power_lag_ms: {power_lag_ms}"
    with ServerThread(TorchUpstream(served_name=SERVED, max_model_len=2048)) as up, \
            _gateway(up.url, f"{{source: nvml{lag}}}", workers) as url:
        time.sleep(LEAD_S)  # the sampler learns the counter's steps before requests come, as in a running gateway
        e0 = counter_j()
        pairs, methods = _inline_and_settled(url)
        e1 = counter_j()
    return pairs, methods, e1 - e0


# -- on a scripted clock ---------------------------------------------------------------------------


@dataclass(slots=True)
class Scripted:
    """One request on the scripted GPU: when it began, its tokens' times, when it ended."""

    rid: str
    stream: bool
    max_tokens: int
    start: float
    first_at: float  # when its prefill ends and decoding starts
    progress: float = 0.0  # fraction of the next token done
    tokens: list[float] = field(default_factory=list)
    end: float | None = None
    own_j: float = 0.0  # what it drew on the scripted GPU: its share of power, split evenly in the batch


@dataclass(frozen=True, slots=True)
class Replayed:
    """What the meter said of one scripted request."""

    rid: str
    stream: bool
    start: float
    end: float
    inline: Measurement
    settled: Measurement
    window_j: float  # the GPU's energy over the window as the meter saw it when the request ended
    own_j: float  # what it drew on the scripted GPU (see ``Scripted``)
    # The sensors' agreement (counter over power) when it ended: read sparsely, what the meter scales
    # the power since the counter's last step by (None: no counter interval yet).
    agreement: float | None = None


def simulate(
    waves: list[list[Planned]] | None = None,
    profile: GpuProfile = PROFILE,
    dt: float = 0.0005,
    gap_s: float = 0.05,
    arrival_gap_s: float = ARRIVAL_GAP_S,
) -> tuple[list[Scripted], list[tuple[float, float, float]]]:
    """A GPU serving ``waves`` (default: the workload) in fixed steps, each wave once the last one is
    done, its requests ``arrival_gap_s`` apart: each request's token times, and the GPU's trace: an
    H100's counter (it steps every 100 ms) and its instantaneous power (every 10 ms)."""
    seqs: list[Scripted] = []
    energy, t = 5_000.0, LEAD_S
    # Idle at first, the counter stepping every 100 ms as it does afterwards.
    lead = round(LEAD_S / 0.01)
    trace = [(round(0.01 * k, 9), energy + profile.idle_w * 0.1 * (k // 10), profile.idle_w) for k in range(lead)]
    energy += profile.idle_w * LEAD_S
    next_step = next_power = LEAD_S
    counter = energy
    waves_left = list(workload() if waves is None else waves)
    running: list[Scripted] = []
    wave_done_at: float | None = t
    idle_until = math.inf  # once the last wave is done: 4 s idle, while everything settles
    while t < idle_until:
        if not waves_left and not running and idle_until == math.inf:
            idle_until = t + 4.0
        if not running and wave_done_at is not None and t >= wave_done_at + gap_s and waves_left:
            for i, p in enumerate(waves_left.pop(0)):
                start = t + arrival_gap_s * i
                seq = Scripted(f"r{len(seqs)}", p.stream, p.max_tokens, start, start + PROMPT_TOKENS / 20_000 + 0.002)
                running.append(seq)
                seqs.append(seq)
            wave_done_at = None
        batch = sum(1 for s in running if s.start <= t)
        power = profile.power_w(batch)
        for seq in running:
            if seq.start <= t:
                seq.own_j += power * dt / batch
            if t >= seq.first_at:
                seq.progress += dt / profile.inter_token_s(batch) if seq.tokens else 1.0
                if seq.progress >= 1.0:
                    seq.progress -= 1.0 if seq.tokens else seq.progress
                    seq.tokens.append(t + dt)
                    if len(seq.tokens) == seq.max_tokens:
                        seq.end = t + dt + 0.0005  # the usage chunk and [DONE] follow the last token
        if running and all(s.end is not None for s in running):
            wave_done_at = max(s.end for s in running if s.end is not None)
        running = [s for s in running if s.end is None]
        energy += power * dt
        t = round(t + dt, 9)
        if t >= next_power - 1e-9:  # power updates every 10 ms, the counter every 100 ms
            if t >= next_step - 1e-9:
                counter = energy
                next_step = round(next_step + 0.1, 9)
            trace.append((t, counter, power))
            next_power = round(next_power + 0.01, 9)
    return seqs, trace


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _events(seqs: list[Scripted]) -> Iterator[tuple[float, int, str, Scripted]]:
    """``(time, order, what, seq)`` in time order: begin, token, end."""
    heap: list[tuple[float, int, str, Scripted]] = []
    for i, s in enumerate(seqs):
        assert s.end is not None
        heap.append((s.start, 3 * i, "begin", s))
        if s.stream:
            heap += [(t, 3 * i + 1, "token", s) for t in s.tokens]
        heap.append((s.end, 3 * i + 2, "end", s))
    heapq.heapify(heap)
    while heap:
        yield heapq.heappop(heap)


def replay(
    seqs: list[Scripted], trace: list[tuple[float, float, float]], phase_s: float = 0.0, **meter_kw: Any
) -> list[Replayed]:
    """Replay scripted requests into a meter reading ``trace`` on a scripted clock, polling every
    ``interval_s`` (``phase_s`` after its multiples) as the sampler thread would; streams report
    each token, plain ones their count at the end, as the gateway does."""
    clock = _Clock()
    settled: dict[str, Measurement] = {}
    meter = Meter(TraceSource({0: trace}, clock), [0], clock=clock, on_settled=lambda m: settled.__setitem__(m.request_id, m),
                  **meter_kw)
    assert meter.sampler is not None
    next_poll = meter.sampler.interval_s + phase_s
    inline: dict[str, tuple[Measurement, float, float | None]] = {}
    windows: dict[str, Any] = {}

    def poll_until(t: float) -> None:
        nonlocal next_poll
        while next_poll <= t:
            clock.t = next_poll
            meter.sampler.poll()  # type: ignore[union-attr]
            meter.sampler.after_poll()  # type: ignore[union-attr,misc]
            next_poll = round(next_poll + meter.sampler.next_delay(), 9)  # type: ignore[union-attr]

    for t, _, what, seq in _events(seqs):
        poll_until(t)
        clock.t = t
        if what == "begin":
            windows[seq.rid] = meter.begin(seq.rid, [0], prompt_tokens=PROMPT_TOKENS)
        elif what == "token":
            windows[seq.rid].tokens(1, t)
        else:
            w = windows.pop(seq.rid)
            if not seq.stream:
                w.completed(len(seq.tokens))
            w.usage(PROMPT_TOKENS, len(seq.tokens))
            curve = meter.sampler.energy_curve(0, None, until=t)
            e0, e1 = np.interp([seq.start, t], [p[0] for p in curve], [p[1] for p in curve])
            inline[seq.rid] = (w.end(t=t), float(e1 - e0), meter.sampler.power_vs_counter(0))
    poll_until(trace[-1][0])
    meter.advance()
    return [Replayed(s.rid, s.stream, s.start, s.end or s.start, inline[s.rid][0], settled[s.rid], inline[s.rid][1],
                     s.own_j, inline[s.rid][2]) for s in seqs]


def run_trace(
    waves: list[list[Planned]] | None = None, arrival_gap_s: float = ARRIVAL_GAP_S, **meter_kw: Any
) -> list[Replayed]:
    """The workload replayed into a meter on a scripted clock, once per poll phase in ``PHASES``."""
    seqs, trace = simulate(waves, arrival_gap_s=arrival_gap_s)
    return [r for phase in PHASES for r in replay(seqs, trace, phase_s=phase, **meter_kw)]


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

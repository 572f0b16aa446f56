"""Relay throughput and CPU with ``wattgate serve --workers N``.

    python -m bench.workers [--workers 1 2 4] [--levels 64 256] [--requests-per-level 2]
                            [--gateway-cores 0] [--upstreams 1] [--clients 1] [--apart] [--spread kernel]
    python -m bench.workers --hub-alone [--levels 64 256] [--token-gap-ms 10] [--seconds 10]

For each N, one gateway (N = 1: the single process; N > 1: a hub and N relay
workers) in front of fast simulated upstreams (``--itl-ms``, 1 ms per token by
default, so that the gateway is the bottleneck), streamed 128-token answers at
each concurrency. The gateway is pinned to ``--gateway-cores`` (give it one thread of
each physical core: the bench prints which of them share one); the upstreams and
the load generators (``--clients`` processes) to the other cores. Both are
``tests/load_side.py``'s bare protocols (aiohttp clients and ``simulate-upstream``
capped the curve at about 55k tokens/s on 13 cores); even so each costs about
11-12 us of CPU per chunk, two thirds of it in the kernel, against the gateway's
25-35 (2-core VM, 2026-11-28), so N workers need nearly as many cores again for
their load.

``--spread``: how the gateway's connections reach its workers (``wattgate serve
--spread``: dealt in turn, the default, or by the kernel's hash).

``--apart``: for each N > 1, also N separate single-process gateways, each its own
meter, the load split evenly over them. They share nothing, so their throughput
is what N processes relay on this host with this load side: the ceiling for N
workers, whatever limits it (the load side, the kernel, the cores' clock).

Prints, per N and level: tokens (chunks) relayed per second, the CPU of all the
gateway's processes per chunk (from /proc, their idle CPU taken off: the meter's
sampler runs whatever the load) and the share of it spent in the kernel, the
hub's CPU per chunk on its own (its event loop, which reads the workers' events;
its other threads, the meter's passes and the ledger), the throughput against
N = 1 at the same level, the busiest and the mean relay process's share of a
core over the load (with ``--spread kernel`` some get more streams than others:
the busiest sets the pace, the others then idle), the busiest load-side
process's share of a core (near 100 %, the load side is the limit), the median
stream's time from request to end (the upstream alone takes 128 x ``--itl-ms``),
and the time from a stream's last token to its end (the gap between its last two
reads: the inline energy object rides on the last chunk, so with workers it
includes the round trip to the hub), median and p95.

``--hub-alone``: the hub with no relay around it, fed the events one worker sends
for that many streams by a synthetic worker on the other cores; its CPU per token
event, without the noise of the relays sharing its core. Not a test; results go to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson
import uvloop
import yaml

from bench.overhead import _cpu_s, _cpu_times, _hub_and_workers, _pinned, _wait, _wait_workers
from tests.load_side import Streamed, split, stream_requests
from wattgate.proxy import hub_protocol as hp
from wattgate.proxy.children import run_hub
from wattgate.proxy.hub import events_path
from wattgate.proxy.hub_connection import FLUSH_S
from wattgate.proxy.serving import free_port

SERVED = "meta-llama/Llama-3.1-8B-Instruct"
TOKENS = 128
IDLE_S = 2.0


async def _streams(ports: list[int], models: list[str], concurrency: int, n: int) -> Streamed:
    """``n`` streamed requests, ``concurrency`` at a time, split evenly over the gateways at ``ports``."""
    return Streamed.merged(await asyncio.gather(*(
        stream_requests("127.0.0.1", port, "/v1/chat/completions", models, c, k, TOKENS)
        for port, c, k in zip(ports, split(concurrency, len(ports)), split(n, len(ports)), strict=True))))


def _client_process(ports: list[int], models: list[str], concurrency: int, n: int, cores: list[int], go: Any,
                    out: Any) -> None:
    os.sched_setaffinity(0, cores)
    go.wait()  # every client imported and ready: the load starts together
    t0, cpu0 = time.monotonic(), time.process_time()
    got = uvloop.run(_streams(ports, models, concurrency, n))
    t1 = time.monotonic()
    out.put((got, t0, t1, (time.process_time() - cpu0) / (t1 - t0)))


def _load(ports: list[int], models: list[str], concurrency: int, n: int, clients: int,
          cores: list[int]) -> tuple[Streamed, float, float]:
    """What the clients received, seconds taken (from the first client's start to the last one's end: the
    processes' own start-up left out) and the busiest client's share of a core; the load split over
    ``clients`` processes, and each client's over the gateways at ``ports``."""
    if concurrency < clients * len(ports):  # else some connections would get no streams, and drop requests
        raise ValueError(f"{concurrency} streams cannot be split over {clients} clients x {len(ports)} gateways")
    ctx = multiprocessing.get_context("spawn")
    out, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_client_process, args=(ports, models, c, k, cores, go, out))
             for c, k in zip(split(concurrency, clients), split(n, clients), strict=True)]
    for p in procs:
        p.start()
    time.sleep(0.5 + 0.2 * clients)  # let them import
    go.set()
    results = [out.get(timeout=600) for _ in procs]  # a client that failed raised in its own process
    for p in procs:
        p.join()
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    return Streamed.merged(r[0] for r in results), wall, max(r[3] for r in results)


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else float("nan")


def _hub_cpu(hub: int | None) -> tuple[float, float]:
    """CPU seconds of the hub's event loop (its main thread: the workers' events) and of its other
    threads (the meter's sampler and passes, the ledger's writer)."""
    if hub is None:
        return 0.0, 0.0
    loop = _cpu_s(hub, hub)
    return loop, _cpu_s(hub) - loop


def _gateway_pids(url: str, supervisor: int, workers: int) -> tuple[list[int], int | None]:
    """The gateway's processes that relay and meter (the supervisor, which only deals connections, left
    out) and its hub (None: one process)."""
    if workers == 1:
        return [supervisor], None
    hub, pids = _hub_and_workers(url)
    return [hub, *pids.values()], hub


def _registry(models: dict[str, Any]) -> Path:
    """A scratch folder holding a registry for ``models`` on the simulated meter (its ledger there too)."""
    tmp = Path(tempfile.mkdtemp(prefix="wattgate-bench-"))
    registry = {"meter": {"source": "simulated", "foreign_poll_ms": 0}, "ledger": {"path": str(tmp / "ledger.db")},
                "models": models}
    (tmp / "registry.yaml").write_text(yaml.safe_dump(registry))
    return tmp


def _start_gateway(args: argparse.Namespace, models: dict[str, Any], workers: int
                   ) -> tuple[subprocess.Popen[bytes], int]:
    """A gateway of ``workers`` on the gateway cores, with its own registry and ledger; it and its port."""
    port = free_port()
    tmp = _registry(models)
    cmd = [sys.executable, "-m", "wattgate.proxy.cli", "serve", "--config", str(tmp / "registry.yaml"),
           "--port", str(port), "--workers", str(workers), "--log-level", "warning",
           "--spread", args.spread]
    return subprocess.Popen(_pinned(args.gateway_cores, cmd)), port


def _level(args: argparse.Namespace, level: int, ports: list[int], models: list[str], pids: list[int],
           hub: int | None, upstreams: list[int], other: list[int]) -> dict[str, float]:
    """One level of load on the gateway's processes ``pids`` (its hub, if any), fed by ``upstreams``."""

    def cpu_now() -> tuple[dict[int, tuple[float, float]], tuple[float, float], list[float], float]:
        return {p: _cpu_times(p) for p in pids}, _hub_cpu(hub), [_cpu_s(p) for p in upstreams], time.monotonic()

    # Idle CPU first (the meter's sampler, the upstreams' tickers: a wake-up costs ~200 us on the 2-core
    # VM), to be taken off what the load costs.
    gateway0, hub0, up0, t0 = cpu_now()
    time.sleep(IDLE_S)
    gateway1, hub1, up1, t1 = cpu_now()
    gateway_idle = {p: (sum(gateway1[p]) - sum(gateway0[p])) / (t1 - t0) for p in pids}
    hub_idle = [(b - a) / (t1 - t0) for a, b in zip(hub0, hub1, strict=True)]
    up_idle = [(b - a) / (t1 - t0) for a, b in zip(up0, up1, strict=True)]
    gateway0, hub0, up0, t0 = cpu_now()
    got, wall, client_busy = _load(ports, models, level, level * args.requests_per_level, args.clients, other)
    gateway1, hub1, up1, t1 = cpu_now()
    chunks = got.events
    spent = t1 - t0  # the clients' start-up too: idle CPU comes off over all of it
    used = {p: sum(gateway1[p]) - sum(gateway0[p]) for p in pids}
    cpu = sum(used.values()) - sum(gateway_idle.values()) * spent
    loop, meter = (b - a - idle * spent for a, b, idle in zip(hub0, hub1, hub_idle, strict=True))
    up_busy = max((b - a - idle * (spent - wall)) / wall for a, b, idle in zip(up0, up1, up_idle, strict=True))
    # Each relay process's share of a core over the load: with connections spread unevenly over the
    # workers (--spread kernel hashes them to the port's sockets), the busiest sets the pace while the others idle.
    relays = [(used[p] - gateway_idle[p] * (spent - wall)) / wall for p in pids if p != hub]
    return {"tokens_per_s": chunks / wall, "us_per_chunk": cpu / chunks * 1e6,
            "kernel_share": sum(gateway1[p][1] - gateway0[p][1] for p in pids) / sum(used.values()),
            "hub_loop_us": loop / chunks * 1e6, "hub_meter_us": meter / chunks * 1e6,
            "relay_busiest": max(relays), "relay_mean": sum(relays) / len(relays),
            "load_busiest": max(up_busy, client_busy), "stream_ms": _quantile(got.seconds, 0.5) * 1e3,
            "end_gap_ms": _quantile(got.end_gaps, 0.5) * 1e3, "end_gap_p95_ms": _quantile(got.end_gaps, 0.95) * 1e3}


def _run(args: argparse.Namespace, workers: int, apart: bool, upstreams: dict[int, int], other: list[int]
         ) -> dict[int, dict[str, float]]:
    """One gateway of ``workers`` (``apart``: that many single-process gateways, each its own meter) in
    front of ``upstreams`` (port: pid), loaded at each level."""
    models = {f"m{i}": {"served_name": SERVED, "upstream": f"http://127.0.0.1:{p}/v1", "gpus": [0]}
              for i, p in enumerate(upstreams)}
    per_gateway = 1 if apart else workers
    gateways = [_start_gateway(args, models, per_gateway) for _ in range(workers // per_gateway)]
    ports = [port for _, port in gateways]
    out: dict[int, dict[str, float]] = {}
    try:
        pids: list[int] = []
        hub = None
        for gateway, port in gateways:
            url = f"http://127.0.0.1:{port}"
            _wait(f"{url}/readyz")
            _wait_workers(url, per_gateway)
            gateway_pids, hub = _gateway_pids(url, gateway.pid, per_gateway)
            pids += gateway_pids
        _load(ports, list(models), 8 * len(ports), 16 * len(ports), 1, other)  # warm up
        for level in args.levels:
            out[level] = _level(args, level, ports, list(models), pids, hub, list(upstreams.values()), other)
    finally:
        for gateway, _ in gateways:
            gateway.terminate()
        for gateway, _ in gateways:
            gateway.wait(timeout=60)
    return out


async def _feed_hub(path: Path, streams: int, seconds: float, token_gap_s: float) -> int:
    """Act as one worker with ``streams`` streams of TOKENS tokens each, one every ``token_gap_s``, a new
    stream replacing each that ends; send for ``seconds`` what a worker sends; the tokens sent."""
    reader, writer = await asyncio.open_unix_connection(str(path))

    async def drain() -> None:
        while await reader.readline():
            pass

    drainer = asyncio.create_task(drain())
    writer.write(orjson.dumps([[], [hp.encode(hp.Hello(1, os.getpid()))]]) + b"\n")
    left: dict[int, int] = {}  # tokens left per open stream
    next_cid, sent, tick = 0, 0, 0
    per_tick = FLUSH_S / token_gap_s  # tokens per stream per flush
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now, tokens = time.monotonic(), cast(list[Any], [])
        for cid in list(left):
            due = min(int((tick + 1 + cid) * per_tick) - int((tick + cid) * per_tick), left[cid])
            for _ in range(due):  # one event per token, as a worker reading them one by one sends
                tokens += (cid, 1, now)
            sent += due
            left[cid] -= due
            if due and not left[cid]:  # an event that needs a reply ends its batch
                del left[cid]
                writer.write(orjson.dumps([tokens, [hp.encode(hp.End(cid, "ok", now, 1.0))]]) + b"\n")
                tokens = []
        while len(left) < streams:
            left[next_cid] = TOKENS
            opening = hp.Open(next_cid, f"r{next_cid}", False, "m0", None, 16, now)
            writer.write(orjson.dumps([tokens, [hp.encode(opening)]]) + b"\n")
            tokens, next_cid = [], next_cid + 1
        writer.write(orjson.dumps([tokens, []]) + b"\n")
        tick += 1
        await asyncio.sleep(FLUSH_S)
    writer.close()
    drainer.cancel()
    return sent


def _hub_alone(args: argparse.Namespace, other: list[int]) -> None:
    """The hub on its own, fed by a synthetic worker on other cores: its CPU per token event."""
    tmp = _registry({"m0": {"upstream": "http://127.0.0.1:9/v1", "gpus": [0]}})
    ctx = multiprocessing.get_context("spawn")
    hub = ctx.Process(target=run_hub, args=(str(tmp / "registry.yaml"), str(tmp), "warning"))
    hub.start()
    assert hub.pid is not None
    os.sched_setaffinity(hub.pid, args.gateway_cores)
    try:
        while not events_path(tmp).exists():
            time.sleep(0.05)
        time.sleep(1.0)
        print(f"hub alone on cores {args.gateway_cores}, fed by one synthetic worker: streams of {TOKENS} tokens, "
              f"one every {args.token_gap_ms:g} ms each, events flushed every {FLUSH_S * 1000:g} ms")
        print(f"{'streams':>8}{'tokens/s':>10}{'events':>8}{'meter':>7}{'total':>7}  (hub us CPU per token)")
        for streams in args.levels:
            idle0, t0 = _hub_cpu(hub.pid), time.monotonic()
            time.sleep(IDLE_S)
            idle = [(b - a) / (time.monotonic() - t0) for a, b in zip(idle0, _hub_cpu(hub.pid), strict=True)]
            cpu0, t0 = _hub_cpu(hub.pid), time.monotonic()
            sent = asyncio.run(_feed_hub(events_path(tmp), streams, args.seconds, args.token_gap_ms / 1000))
            wall = time.monotonic() - t0
            loop, meter = ((b - a - i * wall) / sent * 1e6 for a, b, i in zip(cpu0, _hub_cpu(hub.pid), idle, strict=True))
            print(f"{streams:>8}{sent / wall:>10.0f}{loop:>8.1f}{meter:>7.1f}{loop + meter:>7.1f}", flush=True)
    finally:
        hub.terminate()
        hub.join(30)


def _siblings(cpu: int) -> set[int]:
    """The CPUs that share ``cpu``'s physical core (SMT), itself included, as Linux lists them."""
    try:
        listed = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
    except OSError:
        return {cpu}
    out: set[int] = set()
    for part in listed.split(","):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--levels", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--requests-per-level", type=int, default=2, help="streams per concurrent slot")
    parser.add_argument("--gateway-cores", type=lambda s: [int(c) for c in s.split(",")], default=[0],
                        help="cores the gateway runs on, e.g. 0,1,2,3")
    parser.add_argument("--upstreams", type=int, default=1, help="simulated upstream processes")
    parser.add_argument("--clients", type=int, default=1, help="load generator processes")
    parser.add_argument("--itl-ms", type=float, default=1.0, help="upstream's time between two tokens")
    parser.add_argument("--spread", choices=("even", "kernel"), default="even",
                        help="how connections reach the workers (wattgate serve --spread)")
    parser.add_argument("--apart", action="store_true",
                        help="for each N > 1, also N single-process gateways sharing nothing, the load split "
                             "evenly over them: what N processes reach on this host, the workers' ceiling")
    parser.add_argument("--hub-alone", action="store_true", help="measure the hub alone, fed by a synthetic worker")
    parser.add_argument("--token-gap-ms", type=float, default=10.0, help="--hub-alone: time between two tokens")
    parser.add_argument("--seconds", type=float, default=10.0, help="--hub-alone: seconds per level")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    # The load side off the gateway's physical cores: a process on the other thread of a gateway core
    # would take part of that core's speed from the gateway.
    other = ([c for c in cores if not _siblings(c) & set(args.gateway_cores)]
             or [c for c in cores if c not in args.gateway_cores] or cores)
    os.sched_setaffinity(0, other)
    if args.hub_alone:
        _hub_alone(args, other)
        return
    up_ports = [free_port() for _ in range(args.upstreams)]
    exe = [sys.executable, "-m", "tests.load_side", "upstream", "--itl-ms", str(args.itl_ms)]
    ups = [subprocess.Popen(_pinned(other, [*exe, "--port", str(p)]), stdout=subprocess.DEVNULL) for p in up_ports]
    try:
        for p in up_ports:
            _wait(f"http://127.0.0.1:{p}/v1/models")
        # Two processes on the two threads of one physical core each run at a fraction of its speed, so
        # their CPU per chunk looks higher: say which cores share one.
        shared = [c for c in args.gateway_cores if len(_siblings(c) & set(args.gateway_cores)) > 1]
        print(f"gateway cores sharing a physical core: {shared or 'none'}; "
              f"CPUs per physical core: {len(_siblings(args.gateway_cores[0]))}")
        print(f"gateway on cores {args.gateway_cores}, connections spread {args.spread}; upstreams ({args.upstreams}) and clients ({args.clients}) "
              f"on {other}; {TOKENS}-token streams, upstream {args.itl_ms:g} ms per token")
        print(f"{'N':>3}{'how':>7}{'c':>6}{'tok/s':>9}{'vs N=1':>8}{'us CPU/chunk':>14}{'kernel':>8}"
              f"{'hub: events':>13}{'meter':>7}{'relays: max':>13}{'mean':>6}{'load':>6}{'stream ms':>11}"
              f"{'end gap ms':>12}{'p95':>6}")
        print("  (how: hub = a hub and N workers, apart = N single-process gateways; us per chunk; kernel: the "
              "gateway's CPU spent in the kernel; relays: the busiest relay process's and the mean one's share "
              "of a core; load: the busiest upstream or client process's; stream: the median stream's time from "
              "request to end; end gap: from a stream's last token to its end, median and p95)")
        base: dict[int, float] = {}
        runs = [(n, apart) for n in args.workers for apart in ([False, True] if args.apart and n > 1 else [False])]
        for n, apart in runs:
            results = _run(args, n, apart, {p: u.pid for p, u in zip(up_ports, ups, strict=True)}, other)
            for level, r in results.items():
                if n == 1:
                    base[level] = r["tokens_per_s"]
                ratio = r["tokens_per_s"] / base[level] if level in base else float("nan")
                how = "one" if n == 1 else "apart" if apart else "hub"
                hub = f"{r['hub_loop_us']:>13.1f}{r['hub_meter_us']:>7.1f}" if how == "hub" else f"{'-':>13}{'-':>7}"
                print(f"{n:>3}{how:>7}{level:>6}{r['tokens_per_s']:>9.0f}{ratio:>8.2f}{r['us_per_chunk']:>14.1f}"
                      f"{r['kernel_share']:>8.0%}{hub}{r['relay_busiest']:>13.0%}{r['relay_mean']:>6.0%}"
                      f"{r['load_busiest']:>6.0%}{r['stream_ms']:>11.0f}{r['end_gap_ms']:>12.1f}"
                      f"{r['end_gap_p95_ms']:>6.1f}", flush=True)
    finally:
        for u in ups:
            u.terminate()
            u.wait(timeout=10)


if __name__ == "__main__":
    main()

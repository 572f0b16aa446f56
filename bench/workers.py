"""Relay throughput and CPU with ``wattgate serve --workers N``.

    python -m bench.workers [--workers 1 2 4] [--levels 64 256] [--requests-per-level 2]
                            [--gateway-cores 0] [--upstreams 1] [--clients 1]

For each N, one gateway (N = 1: the single process; N > 1: a hub and N relay
workers) in front of fast simulated upstreams (``--itl-ms``, 1 ms per token by
default, so that the gateway is the bottleneck), streamed 128-token answers at
each concurrency. The gateway is pinned to ``--gateway-cores``; the upstreams and
the load generators (``--clients`` processes, aiohttp) to the other cores.

Prints, per N and level: tokens (chunks) relayed per second, the CPU of all the
gateway's processes per chunk (from /proc, their idle CPU taken off: the meter's
sampler runs whatever the load), the hub's CPU per chunk on its own, and the
throughput against N = 1 at the same level. Not a test; results go to
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
from typing import Any

import aiohttp
import httpx
import yaml

from bench.overhead import _cpu_s, _wait
from wattgate.proxy.serving import free_port

SERVED = "meta-llama/Llama-3.1-8B-Instruct"
TOKENS = 128
IDLE_S = 2.0


def _taskset(cores: list[int], cmd: list[str]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cores)), *cmd]


async def _client(url: str, models: list[str], concurrency: int, n: int) -> int:
    """``n`` streams, ``concurrency`` at a time; the data chunks received."""
    body = {"messages": [{"role": "user", "content": "Tell me about energy."}], "max_tokens": TOKENS, "stream": True}
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def one(i: int) -> int:
            chunks = 0
            async with sem, session.post(url, json={**body, "model": models[i % len(models)]}) as r:
                async for line in r.content:
                    chunks += line.startswith(b"data: {")
            return chunks

        return sum(await asyncio.gather(*(one(i) for i in range(n))))


def _client_process(url: str, models: list[str], concurrency: int, n: int, cores: list[int],
                    out: Any) -> None:
    os.sched_setaffinity(0, cores)
    out.put(asyncio.run(_client(url, models, concurrency, n)))


def _load(url: str, models: list[str], concurrency: int, n: int, clients: int, cores: list[int]) -> tuple[int, float]:
    """Chunks relayed and seconds taken, the load split over ``clients`` processes."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(url, models, concurrency // clients, n // clients, cores, out))
             for _ in range(clients)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    chunks = sum(out.get(timeout=600) for _ in procs)  # a client that failed raised in its own process
    wall = time.monotonic() - t0
    for p in procs:
        p.join()
    return chunks, wall


def _gateway_pids(url: str, supervisor: int, workers: int) -> tuple[list[int], int | None]:
    """The gateway's processes (all of them) and its hub (None: one process)."""
    if workers == 1:
        return [supervisor], None
    ready = httpx.get(f"{url}/readyz", timeout=10).json()
    return [ready["hub_pid"], *(w["pid"] for w in ready["workers"])], ready["hub_pid"]


def _run(args: argparse.Namespace, workers: int, upstreams: list[int], other: list[int]) -> dict[int, dict[str, float]]:
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="wattgate-bench-"))
    models = {f"m{i}": {"served_name": SERVED, "upstream": f"http://127.0.0.1:{p}/v1", "gpus": [0]}
              for i, p in enumerate(upstreams)}
    registry = {"meter": {"source": "simulated", "foreign_poll_ms": 0}, "ledger": {"path": str(tmp / "ledger.db")},
                "models": models}
    (tmp / "registry.yaml").write_text(yaml.safe_dump(registry))
    cmd = [sys.executable, "-m", "wattgate.proxy.cli", "serve", "--config", str(tmp / "registry.yaml"),
           "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    gateway = subprocess.Popen(_taskset(args.gateway_cores, cmd))
    url = f"http://127.0.0.1:{port}"
    out: dict[int, dict[str, float]] = {}
    try:
        _wait(f"{url}/readyz")
        deadline = time.monotonic() + 30
        while workers > 1 and len(httpx.get(f"{url}/readyz").json().get("workers", [])) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not connect to the hub")
            time.sleep(0.2)
        pids, hub = _gateway_pids(url, gateway.pid, workers)
        _load(f"{url}/v1/chat/completions", list(models), 8, 16, 1, other)  # warm up
        for level in args.levels:
            cpu0, t0 = sum(_cpu_s(p) for p in pids), time.monotonic()
            hub0 = _cpu_s(hub) if hub else 0.0
            time.sleep(IDLE_S)
            idle_rate = (sum(_cpu_s(p) for p in pids) - cpu0) / (time.monotonic() - t0)
            hub_idle = ((_cpu_s(hub) if hub else 0.0) - hub0) / (time.monotonic() - t0)
            cpu0, hub0 = sum(_cpu_s(p) for p in pids), _cpu_s(hub) if hub else 0.0
            chunks, wall = _load(f"{url}/v1/chat/completions", list(models), level,
                                 level * args.requests_per_level, args.clients, other)
            cpu = sum(_cpu_s(p) for p in pids) - cpu0 - idle_rate * wall
            hub_cpu = (_cpu_s(hub) - hub0 - hub_idle * wall) if hub else 0.0
            out[level] = {"tokens_per_s": chunks / wall, "us_per_chunk": cpu / chunks * 1e6,
                          "hub_us_per_chunk": hub_cpu / chunks * 1e6, "chunks": chunks}
    finally:
        gateway.terminate()
        gateway.wait(timeout=60)
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
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    other = [c for c in cores if c not in args.gateway_cores] or cores
    os.sched_setaffinity(0, other)
    up_ports = [free_port() for _ in range(args.upstreams)]
    exe = [sys.executable, "-m", "wattgate.proxy.cli", "simulate-upstream", "--itl-ms", str(args.itl_ms)]
    ups = [subprocess.Popen(_taskset(other, [*exe, "--port", str(p)]), stdout=subprocess.DEVNULL) for p in up_ports]
    try:
        for p in up_ports:
            _wait(f"http://127.0.0.1:{p}/v1/models")
        print(f"gateway on cores {args.gateway_cores}; upstreams ({args.upstreams}) and clients ({args.clients}) "
              f"on {other}; {TOKENS}-token streams, upstream {args.itl_ms:g} ms per token")
        print(f"{'N':>3}{'c':>5}{'tok/s':>9}{'vs N=1':>8}{'us CPU/chunk':>14}{'hub us/chunk':>14}")
        base: dict[int, float] = {}
        for n in args.workers:
            for level, r in _run(args, n, up_ports, other).items():
                if n == 1:
                    base[level] = r["tokens_per_s"]
                ratio = r["tokens_per_s"] / base[level] if level in base else float("nan")
                hub = f"{r['hub_us_per_chunk']:.1f}" if n > 1 else "-"
                print(f"{n:>3}{level:>5}{r['tokens_per_s']:>9.0f}{ratio:>8.2f}{r['us_per_chunk']:>14.1f}{hub:>14}",
                      flush=True)
    finally:
        for u in ups:
            u.terminate()
            u.wait(timeout=10)


if __name__ == "__main__":
    main()

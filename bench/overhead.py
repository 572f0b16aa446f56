"""Gateway overhead: the same streaming workload direct to the upstream and through the gateway.

    python -m bench.overhead [--requests-per-level 4]

One run measures both paths at concurrency 1, 16 and 64 with 128-token answers
paced like an H100 serving Llama-3.1-8B (the simulated upstream). On a 2-core
machine the gateway is pinned to core 0 and the upstream plus this load
generator to core 1 (taskset), so the gateway's CPU figures are its own.
Reports gateway CPU microseconds per relayed chunk (from /proc; also net of the
gateway's idle CPU, the meter's sampler, measured just before), added TTFT and
latency at p50/p99, throughput ratio and gateway RSS. Not a test; results go to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from wattgate.proxy.serving import free_port

MODEL = "bench"
SERVED = "meta-llama/Llama-3.1-8B-Instruct"
TOKENS = 128


def _pinned(cores: Sequence[int], cmd: list[str]) -> list[str]:
    """``cmd`` run on ``cores`` (taskset), where there is more than one core to choose from."""
    multi = shutil.which("taskset") and (os.cpu_count() or 1) > 1
    return ["taskset", "-c", ",".join(map(str, cores)), *cmd] if multi else cmd


def _wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _wait_workers(url: str, workers: int) -> None:
    """Until every relay worker of the gateway at ``url`` is connected to its hub (else a worker's first
    calls are estimates); nothing to wait for with one process."""
    deadline = time.monotonic() + 30
    while workers > 1 and len(httpx.get(f"{url}/readyz").json().get("workers", [])) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not connect to the hub")
        time.sleep(0.1)


def _hub_and_workers(url: str) -> tuple[int, dict[int, int]]:
    """The pids of the hub of the gateway at ``url`` (``--workers`` above 1) and of each worker, by index."""
    ready = httpx.get(f"{url}/readyz", timeout=10).json()
    return ready["hub_pid"], {w["index"]: w["pid"] for w in ready["workers"]}


def _cpu_times(pid: int, thread: int | None = None) -> tuple[float, float]:
    """User and system CPU seconds of a process, or of one of its threads."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int, thread: int | None = None) -> float:
    """CPU seconds of a process (user + system), or of one of its threads."""
    return sum(_cpu_times(pid, thread))


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    """Stop the processes a benchmark started."""
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _stream(client: httpx.AsyncClient, url: str, model: str) -> tuple[float, float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me about energy."}],
            "max_tokens": TOKENS, "stream": True}
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    async with client.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
                if ttft is None and '"content":"' in line and '"content":""' not in line:
                    ttft = time.perf_counter() - t0
    return ttft or 0.0, time.perf_counter() - t0, chunks


async def _level(url: str, model: str, concurrency: int, n: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await _stream(client, url, model)  # warm the connection
        sem = asyncio.Semaphore(concurrency)

        async def one() -> tuple[float, float, int]:
            async with sem:
                return await _stream(client, url, model)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    lat = sorted(r[1] for r in results)
    chunks = sum(r[2] for r in results)

    def pct(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))]

    return {"ttft_p50": statistics.median(ttft), "ttft_p99": pct(ttft, 0.99), "lat_p50": statistics.median(lat),
            "lat_p99": pct(lat, 0.99), "tokens_per_s": chunks / wall, "chunks": chunks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests-per-level", type=int, default=4, help="requests per concurrent stream")
    parser.add_argument("--meter", default="simulated", choices=["simulated", "none"], help="gateway's meter source")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64], help="concurrency levels")
    args = parser.parse_args()
    up_port, gw_port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "registry.yaml").write_text(
        f"meter: {{source: {args.meter}}}\nmodels:\n  {MODEL}:\n    served_name: {SERVED}\n"
        f"    upstream: http://127.0.0.1:{up_port}/v1\n    gpus: [0]\n"
    )
    os.sched_setaffinity(0, {1 % (os.cpu_count() or 1)})
    exe = [sys.executable, "-m", "wattgate.proxy.cli"]
    upstream = subprocess.Popen(_pinned([1], [*exe, "simulate-upstream", "--port", str(up_port)]))
    gateway = subprocess.Popen(
        _pinned([0], [*exe, "serve", "--config", str(tmp / "registry.yaml"), "--port", str(gw_port), "--log-level", "warning"])
    )
    try:
        _wait(f"http://127.0.0.1:{up_port}/v1/models")
        _wait(f"http://127.0.0.1:{gw_port}/healthz")
        print(f"{'c':>3} {'path':<8}{'TTFT p50':>10}{'p99':>8}{'lat p50':>9}{'p99':>8}{'tok/s':>8}  gateway")
        for c in args.levels:
            n = c * args.requests_per_level
            direct = asyncio.run(_level(f"http://127.0.0.1:{up_port}/v1/chat/completions", SERVED, c, n))
            # The gateway's CPU while idle (the meter's sampler), to tell it from the cost of relaying.
            cpu0, t0 = _cpu_s(gateway.pid), time.monotonic()
            time.sleep(3.0)
            idle_rate = (_cpu_s(gateway.pid) - cpu0) / (time.monotonic() - t0)
            cpu0, t0 = _cpu_s(gateway.pid), time.monotonic()
            via = asyncio.run(_level(f"http://127.0.0.1:{gw_port}/v1/chat/completions", MODEL, c, n))
            cpu = _cpu_s(gateway.pid) - cpu0
            us_per_chunk = cpu / via["chunks"] * 1e6
            us_net = (cpu - idle_rate * (time.monotonic() - t0)) / via["chunks"] * 1e6
            for name, r in (("direct", direct), ("gateway", via)):
                print(f"{c:>3} {name:<8}{r['ttft_p50'] * 1e3:>9.1f}ms{r['ttft_p99'] * 1e3:>6.1f}ms"
                      f"{r['lat_p50']:>8.3f}s{r['lat_p99']:>7.3f}s{r['tokens_per_s']:>8.0f}", end="")
                print("" if name == "direct" else
                      f"  {us_per_chunk:.0f} us CPU/chunk ({us_net:.0f} net of idle), +{(via['ttft_p50'] - direct['ttft_p50']) * 1e3:.2f} ms TTFT p50, "
                      f"+{(via['lat_p50'] - direct['lat_p50']) * 1e3:.1f} ms latency p50, "
                      f"throughput x{via['tokens_per_s'] / direct['tokens_per_s']:.3f}, RSS {_rss_mb(gateway.pid):.0f} MB")
    finally:
        _stop(gateway, upstream)


if __name__ == "__main__":
    main()

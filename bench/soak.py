"""Memory of a long-running gateway: RSS growth over many requests, with the ledger on.

    python -m bench.soak [--requests 100000] [--concurrency 32] [--workers 1]

``wattgate serve`` (simulated meter, ledger in a scratch directory) in front of
``wattgate simulate-upstream``, each in its own process, as a user runs them.
Half the requests are streamed, all of 4 tokens. The gateway's RSS is read from
``/proc`` after a warm-up of 2,000 requests (allocator pools, imports, the first
settled records) and then every 10,000. Target (issue 13): growth over 100,000
requests <= 30 MB. Afterwards, no window may be open and every request must
have its ledger row. With ``--workers N``: each process's RSS (the supervisor,
the hub, the workers), and the growth of the one that grew most.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.overhead import _hub_and_workers, _rss_mb, _stop, _wait, _wait_workers
from wattgate.proxy.serving import free_port

SERVED = "meta-llama/Llama-3.1-8B-Instruct"
WARM_UP = 2_000


async def send(url: str, n: int, concurrency: int, first: int) -> Counter[str]:
    """``n`` requests, ``concurrency`` at a time, alternately streamed and plain; what went wrong, counted."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    failures: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        queue = iter(range(first, first + n))

        async def worker() -> None:
            for i in queue:
                body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                        "stream": i % 2 == 0}
                try:
                    r = await client.post("/v1/chat/completions", json=body)
                    if r.status_code != 200:
                        failures[f"HTTP {r.status_code}"] += 1
                except httpx.TransportError as exc:
                    failures[type(exc).__name__] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


def _processes(url: str, supervisor: int, workers: int) -> dict[str, int]:
    """The gateway's processes by name: the one process, or the supervisor, the hub and each worker."""
    if workers == 1:
        return {"gateway": supervisor}
    hub, pids = _hub_and_workers(url)
    return {"supervisor": supervisor, "hub": hub, **{f"worker {index}": pid for index, pid in pids.items()}}


def _rss_line(rss: dict[str, float]) -> str:
    return ", ".join(f"{name} {mb:.1f} MB" if len(rss) > 1 else f"{mb:.1f} MB" for name, mb in rss.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="wattgate serve --workers")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="wattgate-soak-"))
    up_port, gw_port = free_port(), free_port()
    registry = scratch / "registry.yaml"
    registry.write_text(
        f"models:\n  llama:\n    served_name: {SERVED}\n    upstream: http://127.0.0.1:{up_port}/v1\n"
        f"    gpus: [0]\nmeter: {{source: simulated}}\nledger: {{path: {scratch / 'ledger.db'}}}\n"
    )
    cli = [sys.executable, "-m", "wattgate.proxy.cli"]
    upstream = subprocess.Popen([*cli, "simulate-upstream", "--port", str(up_port), "--itl-ms", "1"])
    gateway = subprocess.Popen([*cli, "serve", "--config", str(registry), "--port", str(gw_port),
                                "--log-level", "warning", "--workers", str(args.workers)])
    url = f"http://127.0.0.1:{gw_port}"
    try:
        _wait(f"http://127.0.0.1:{up_port}/v1/models")
        _wait(f"{url}/healthz")
        _wait_workers(url, args.workers)
        failures = asyncio.run(send(url, WARM_UP, args.concurrency, 0))
        pids = _processes(url, gateway.pid, args.workers)
        base = {name: _rss_mb(pid) for name, pid in pids.items()}
        print(f"after {WARM_UP:,} requests (warm-up): RSS {_rss_line(base)}")
        done, t0 = 0, time.monotonic()
        while done < args.requests:
            step = min(10_000, args.requests - done)
            failures += asyncio.run(send(url, step, args.concurrency, WARM_UP + done))
            done += step
            if _processes(url, gateway.pid, args.workers) != pids:
                print("a worker or the hub was replaced: its growth is not comparable", flush=True)
            rss = {name: _rss_mb(pid) for name, pid in pids.items()}
            name, grew = max(((n, rss[n] - base[n]) for n in rss), key=lambda item: item[1])
            print(f"+{done:,} requests ({done / (time.monotonic() - t0):.0f}/s): RSS {_rss_line(rss)}, "
                  f"growth {grew:+.1f} MB ({grew / done * 1000:+.3f} MB per 1,000){f' in {name}' if len(rss) > 1 else ''}",
                  flush=True)
        total = WARM_UP + done
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            open_requests = httpx.get(f"{url}/readyz").json()["meter"]["open_requests"]
            with sqlite3.connect(scratch / "ledger.db") as db:
                rows = db.execute("select count(*) from requests").fetchone()[0]
            if open_requests == 0 and rows == total:
                break
            time.sleep(0.5)
        print(f"afterwards: {open_requests} windows open, {rows:,} ledger rows for {total:,} requests; "
              f"failed requests: {dict(failures) or 'none'}")
    finally:
        _stop(gateway, upstream)


if __name__ == "__main__":
    main()

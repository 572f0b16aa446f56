"""Memory of a long-running gateway: RSS growth over many requests, with the ledger on.

    python -m bench.soak [--requests 100000] [--concurrency 32]

``wattgate serve`` (simulated meter, ledger in a scratch directory) in front of
``wattgate simulate-upstream``, each in its own process, as a user runs them.
Half the requests are streamed, all of 4 tokens. The gateway's RSS is read from
``/proc`` after a warm-up of 2,000 requests (allocator pools, imports, the first
settled records) and then every 10,000. Target (issue 13): growth over 100,000
requests <= 30 MB. Afterwards, no window may be open and every request must
have its ledger row.
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

from bench.overhead import _rss_mb, _stop, _wait
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32)
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
                                "--log-level", "warning"])
    url = f"http://127.0.0.1:{gw_port}"
    try:
        _wait(f"http://127.0.0.1:{up_port}/v1/models")
        _wait(f"{url}/healthz")
        failures = asyncio.run(send(url, WARM_UP, args.concurrency, 0))
        base = _rss_mb(gateway.pid)
        print(f"after {WARM_UP:,} requests (warm-up): RSS {base:.1f} MB")
        done, t0 = 0, time.monotonic()
        while done < args.requests:
            step = min(10_000, args.requests - done)
            failures += asyncio.run(send(url, step, args.concurrency, WARM_UP + done))
            done += step
            rss = _rss_mb(gateway.pid)
            print(f"+{done:,} requests ({done / (time.monotonic() - t0):.0f}/s): RSS {rss:.1f} MB, "
                  f"growth {rss - base:+.1f} MB ({(rss - base) / done * 1000:+.3f} MB per 1,000)", flush=True)
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

"""The split judged against a truth the gateway cannot see (issue 34): the gateway on its NVML source in front
of tests/truth_rig.py's lockstep upstream, whose stand-in GPU draws power by what the upstream runs. Each
request's settled and inline joules against its equal share of the energy of the steps it ran in.

Usage::

    python -m bench.truth                    # 5, 10 and 20 ms per token, 10 waves each
    python -m bench.truth --step-ms 5 --waves 20 --seed 3

Waves of 1, 8, 1, 16, 2, 1, 4, 12, 1, 6 concurrent requests start together, half streamed, half plain,
each sized for a window class (< 0.1 s, 0.1-0.6 s, 0.6-2 s, > 2 s) at the step time; an idle pause
separates the waves. Printed per window class and per kind (stream, plain): p50, p95 and worst of
|figure - truth| / truth, for the settled and the inline figure, and the class's aggregate bias
(sum of settled / sum of truth - 1). By default the gateway, the upstream and the client share this
process (and its GIL): the gateway sees token times as a loaded host would. With ``--workers N`` the
gateway is ``wattgate serve --workers N`` in processes of its own, reading the GPU the upstream writes
through a file (so ``--workers 1`` is one gateway process, away from the upstream and the client).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from tests.fake_nvml import FakeGpu, FakeNvml
from tests.truth_rig import GpuModel, LockstepGpu, LockstepUpstream
from wattgate.proxy.serving import ServerThread, free_port
from wattgate.proxy.settings import LedgerSettings, MeterSettings, Model, Settings

ROOT = Path(__file__).resolve().parents[1]
WAVES = (1, 8, 1, 16, 2, 1, 4, 12, 1, 6)
CLASSES = ((0.0, 0.1, "< 0.1 s"), (0.1, 0.6, "0.1-0.6 s"), (0.6, 2.0, "0.6-2 s"), (2.0, float("inf"), "> 2 s"))
TARGET_S = (0.05, 0.3, 1.2, 3.0)  # one window per class, varied by +-30 %


@dataclass
class Result:
    rid: str
    stream: bool
    window_s: float
    inline_j: float
    settled_j: float = 0.0
    truth_j: float = 0.0


async def _one(client: httpx.AsyncClient, rid: str, stream: bool, tokens: int) -> Result:
    body = {"model": "truth", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
            "stream": stream}
    headers = {"x-request-id": rid}
    if not stream:
        r = await client.post("/v1/chat/completions", json=body, headers=headers)
        energy = r.json()["energy"]
    else:
        energy = {}
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"energy"' in line:
                    chunk = orjson.loads(line[6:])
                    energy = chunk.get("energy") or energy
    return Result(rid, stream, energy["window_ms"] / 1000, energy["joules"])


Plan = list[list[tuple[bool, int]]]  # waves of (streamed, tokens), each wave's requests started together


def mixed_plan(step_s: float, waves: int, rng: random.Random) -> Plan:
    """WAVES' sizes, every window class, streamed and plain in turn."""
    plan = []
    for w in range(waves):
        wave = []
        for i in range(WAVES[w % len(WAVES)]):
            seconds = TARGET_S[(w + i) % len(TARGET_S)] * rng.uniform(0.7, 1.3)
            wave.append(((w + i // len(TARGET_S) + i) % 2 == 0, max(int(seconds / step_s), 1)))
        plan.append(wave)
    return plan


def symmetry_plan(rounds: int) -> Plan:
    """The issue's check of streams against plain calls: 8 x 40 tokens started together, 4 of each."""
    return [[(i % 2 == 0, 40) for i in range(8)] for _ in range(rounds)]


async def _waves(url: str, plan: Plan) -> list[Result]:
    results: list[Result] = []
    # Idle connections are let go before uvicorn's 5 s keep-alive ends them: a connection reused just as
    # the server closes it fails the request (one such httpx.ReadError was seen mid-wave).
    limits = httpx.Limits(keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for wave in plan:
            calls = [_one(client, f"truth-{uuid.uuid4().hex[:12]}", stream, tokens) for stream, tokens in wave]
            results += await asyncio.gather(*calls)
            await asyncio.sleep(0.5)  # idle between waves
        for r in results:  # the settled figures
            deadline = time.monotonic() + 60
            while True:
                e = (await client.get(f"/v1/energy/{r.rid}")).json()
                if e.get("settled"):
                    r.settled_j = e["joules"]
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{r.rid} did not settle")
                await asyncio.sleep(0.2)
    return results


def _quantiles(errors: list[float]) -> str:
    if not errors:
        return "   -"
    s = sorted(errors)
    p = lambda q: s[min(int(q * len(s)), len(s) - 1)]
    return f"p50 {p(0.5) * 100:5.1f}%  p95 {p(0.95) * 100:5.1f}%  worst {s[-1] * 100:5.1f}%"


def report(results: list[Result]) -> list[str]:
    lines = []
    for lo, hi, name in CLASSES:
        for kind in ("stream", "plain", "both"):
            rows = [r for r in results if lo <= r.window_s < hi and (kind == "both" or r.stream == (kind == "stream"))]
            if not rows:
                continue
            settled = [abs(r.settled_j - r.truth_j) / r.truth_j for r in rows]
            inline = [abs(r.inline_j - r.truth_j) / r.truth_j for r in rows]
            bias = sum(r.settled_j for r in rows) / sum(r.truth_j for r in rows) - 1
            lines.append(f"  {name:>9} {kind:6} n={len(rows):3}  settled {_quantiles(settled)}  "
                         f"inline {_quantiles(inline)}  bias {bias * 100:+5.1f}%")
    return lines


def run(step_ms: float, plan: Plan, interval_ms: int = 50, workers: int = 0) -> list[Result]:
    """One run; ``workers``: 0 for the gateway in this process, else ``wattgate serve --workers N`` in
    processes of its own, reading the GPU through a file the upstream writes."""
    with tempfile.TemporaryDirectory() as tmp:
        gpu = LockstepGpu(GpuModel(), time.monotonic(), Path(tmp) / "gpu.f64" if workers else None)
        upstream = LockstepUpstream(gpu, step_ms / 1000, served_name="truth-model")
        with ServerThread(upstream.app) as up:
            meter = MeterSettings(source="nvml", foreign_poll_ms=0, interval_ms=interval_ms)
            settings = Settings(meter=meter, ledger=LedgerSettings(enabled=False),
                                models={"truth": Model(served_name="truth-model", upstream=f"{up.url}/v1", gpus=[0])})
            with _gateway(settings, gpu, workers, Path(tmp)) as url:
                results = asyncio.run(_waves(url, plan))
    for r in results:
        r.truth_j = upstream.truth[r.rid]
    return results


@contextmanager
def _gateway(settings: Settings, gpu: LockstepGpu, workers: int, tmp: Path) -> Iterator[str]:
    if not workers:
        sys.modules["pynvml"] = FakeNvml([FakeGpu(follows=gpu)]).module()  # NVML's seam: the driver module
        from wattgate.proxy.app import create_app

        with ServerThread(create_app(settings)) as gw:
            yield gw.url
        return
    # The stand-in driver on the gateway's path, reading the GPU the upstream writes (tests/test_workers.py
    # puts tests/fake_nvml.py there the same way).
    (tmp / "pynvml.py").write_text(
        "from pathlib import Path\nfrom tests.fake_nvml import FakeGpu, FakeNvml\n"
        "from tests.truth_rig import GpuModel, LockstepGpu\n"
        f"gpu = LockstepGpu.reading(Path({str(tmp / 'gpu.f64')!r}), GpuModel())\n"
        "globals().update(vars(FakeNvml([FakeGpu(follows=gpu)]).module()))\n")
    registry = tmp / "registry.yaml"
    registry.write_text(settings.model_dump_json(exclude_unset=True))  # JSON is YAML
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(tmp), str(ROOT)))}
    proc = subprocess.Popen([sys.executable, "-m", "wattgate.proxy.cli", "serve", "--config", str(registry),
                             "--port", str(port), "--workers", str(workers), "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz").json().get("meter", {}).get("method") == "nvml":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the gateway did not start")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def symmetry(results: list[Result], per_round: int = 8) -> list[str]:
    """Streams against plain calls of the same work, round by round: how far apart their settled means
    are, and each kind against its truth."""
    lines, apart = [], []
    for i in range(0, len(results), per_round):
        rows = results[i:i + per_round]
        mean = {kind: sum(r.settled_j for r in rows if r.stream == kind) / sum(1 for r in rows if r.stream == kind)
                for kind in (True, False)}
        truth = {kind: sum(r.truth_j for r in rows if r.stream == kind) / sum(1 for r in rows if r.stream == kind)
                 for kind in (True, False)}
        apart.append(mean[True] / mean[False] - 1)
        lines.append(f"  round {i // per_round + 1}: streams {apart[-1] * 100:+5.1f}% against plain calls "
                     f"(streams {(mean[True] / truth[True] - 1) * 100:+5.1f}%, plain {(mean[False] / truth[False] - 1) * 100:+5.1f}% "
                     "against truth)")
    worst = max(apart, key=abs)
    lines.append(f"  worst round {worst * 100:+.1f}%, mean {sum(apart) / len(apart) * 100:+.1f}%")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-ms", type=float, nargs="+", default=[5.0, 10.0, 20.0], help="time per token")
    parser.add_argument("--waves", type=int, default=len(WAVES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--interval-ms", type=int, default=50, help="the meter's power poll (meter.interval_ms)")
    parser.add_argument("--workers", type=int, default=0,
                        help="0: the gateway in this process; N: `wattgate serve --workers N` in its own processes")
    parser.add_argument("--symmetry", type=int, default=0, metavar="ROUNDS",
                        help="instead of the mixed waves: ROUNDS of 8 x 40 tokens started together, 4 streamed, 4 plain")
    args = parser.parse_args()
    where = "in this process" if not args.workers else f"serve --workers {args.workers}"
    for step_ms in args.step_ms:
        plan = symmetry_plan(args.symmetry) if args.symmetry else mixed_plan(step_ms / 1000, args.waves,
                                                                             random.Random(args.seed))
        results = run(step_ms, plan, args.interval_ms, args.workers)
        if args.symmetry:
            print(f"{step_ms:g} ms per token, gateway {where}: streams against plain calls of the same work")
            print("\n".join(symmetry(results)))
            continue
        print(f"{step_ms:g} ms per token, gateway {where}, power polled every {args.interval_ms} ms, "
              f"{len(results)} requests in {args.waves} waves "
              "(|figure - truth| / truth; bias: sum settled / sum truth - 1):")
        print("\n".join(report(results)))
        total = sum(r.settled_j for r in results) / sum(r.truth_j for r in results) - 1
        print(f"  all settled against all truth: {total * 100:+.2f}%")


if __name__ == "__main__":
    main()

"""The gateway on its NVML source in front of tests/truth_rig.py's lockstep upstream, and each request's
settled and inline joules beside its truth: the runs that ``python -m bench.truth`` reports and
tests/test_truth_rig.py bounds.

By default the gateway, the upstream and the client share this process (and its GIL): the gateway sees
token times as a loaded host would. With ``workers`` the gateway is ``wattgate serve --workers N`` in
processes of its own, reading the GPU the upstream writes through a file (so ``workers=1`` is one gateway
process, away from the upstream and the client).
"""

from __future__ import annotations

import asyncio
import os
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

# Waves of (streamed, tokens, prompt words), each wave's requests started together.
Plan = list[list[tuple[bool, int, int]]]


def symmetry_plan(rounds: int) -> Plan:
    """Issue 34's check of streams against plain calls: 8 x 40 tokens started together, 4 of each."""
    return [[(i % 2 == 0, 40, 1) for i in range(8)] for _ in range(rounds)]


@dataclass
class Result:
    rid: str
    stream: bool
    window_s: float
    inline_j: float
    settled_j: float = 0.0
    truth_j: float = 0.0


async def _one(client: httpx.AsyncClient, rid: str, stream: bool, tokens: int, words: int) -> Result:
    body = {"model": "truth", "messages": [{"role": "user", "content": " ".join(["hi"] * words)}],
            "max_tokens": tokens, "stream": stream}
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


async def waves(url: str, plan: Plan) -> list[Result]:
    results: list[Result] = []
    # Idle connections are let go before uvicorn's 5 s keep-alive ends them: a connection reused just as
    # the server closes it fails the request (one such httpx.ReadError was seen mid-wave).
    limits = httpx.Limits(keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for wave in plan:
            calls = [_one(client, f"truth-{uuid.uuid4().hex[:12]}", *request) for request in wave]
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
                    raise RuntimeError(f"{r.rid} did not settle")
                await asyncio.sleep(0.2)
    return results


def run(step_ms: float, plan: Plan, interval_ms: int = 50, workers: int = 0,
        prefill_weight: float | None = None, prefill_tokens_per_step: float = 0.0) -> list[Result]:
    """One run; ``workers``: 0 for the gateway in this process, else ``wattgate serve --workers N`` in
    processes of its own, reading the GPU through a file the upstream writes; ``prefill_weight``: the
    model's in the registry (None: the registry's default); ``prefill_tokens_per_step``: the rig's
    (tests/truth_rig.py; 0: prompts cost its GPU nothing)."""
    with tempfile.TemporaryDirectory() as tmp:
        gpu = LockstepGpu(GpuModel(), time.monotonic(), Path(tmp) / "gpu.f64" if workers else None)
        upstream = LockstepUpstream(gpu, step_ms / 1000, served_name="truth-model",
                                    prefill_tokens_per_step=prefill_tokens_per_step)
        with ServerThread(upstream.app) as up:
            meter = MeterSettings(source="nvml", foreign_poll_ms=0, interval_ms=interval_ms)
            weight = {} if prefill_weight is None else {"prefill_weight": prefill_weight}
            settings = Settings(meter=meter, ledger=LedgerSettings(enabled=False),
                                models={"truth": Model(served_name="truth-model", upstream=f"{up.url}/v1", gpus=[0],
                                                       **weight)})
            with serving(settings, gpu, workers, Path(tmp)) as url:
                results = asyncio.run(waves(url, plan))
    for r in results:
        r.truth_j = upstream.truth[r.rid]
    return results


@contextmanager
def serving(settings: Settings, gpu: LockstepGpu, workers: int, tmp: Path) -> Iterator[str]:
    """The gateway's URL, the gateway reading ``gpu`` through the stand-in driver: in this process
    (``workers`` 0: the driver module replaced for good), or ``wattgate serve --workers N``."""
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
                raise RuntimeError("the gateway did not start")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def against_truth(results: list[Result]) -> dict[bool, float]:
    """Streams' (True) and plain calls' (False) settled joules against their truth: sum / sum - 1."""
    return {kind: sum(r.settled_j for r in results if r.stream == kind) / sum(r.truth_j for r in results if r.stream == kind) - 1
            for kind in (True, False)}

"""``wattgate serve --workers 2`` as real processes: figures as with one process, whatever worker
serves a call; a worker or the hub killed mid-flight loses nothing settled; a stalled hub never
stalls a stream. The upstream is the simulated vLLM on localhost; the hub's meter drives its own
simulated GPU from the calls' windows (``meter.source: simulated``)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests.conftest import SERVED, settled_records, wait_until
from wattgate.proxy.hub_connection import REPLY_TIMEOUT_S
from wattgate.proxy.hub_link import HUB_ROUTE_WAIT_S
from wattgate.proxy.serving import ServerThread, free_port
from wattgate.proxy.simulated_upstream import SimulatedUpstream

WORKERS = 2
BODY = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 48}


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]

    def ready(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/readyz", timeout=10).json()

    def all_workers_connected(self, timeout: float = 30.0) -> dict[str, Any]:
        """The hub's /readyz once every worker is connected to it."""
        state: dict[str, Any] = {}

        def connected() -> bool:
            nonlocal state
            try:
                state = self.ready()
            except httpx.HTTPError:
                return False
            return len(state.get("workers", [])) == WORKERS

        wait_until(connected, timeout, what=f"{WORKERS} workers connected to the hub")
        return state

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@contextmanager
def _serving(home: Path, registry: dict[str, Any], env: dict[str, str] | None = None,
             options: tuple[str, ...] = ()) -> Iterator[Gateway]:
    """``wattgate serve --workers 2`` with ``registry`` (and ``options``), as a user starts it; stopped with SIGTERM."""
    (home / "registry.yaml").write_text(yaml.safe_dump(registry))
    port = free_port()
    cmd = [sys.executable, "-m", "wattgate.proxy.cli", "serve", "--config", str(home / "registry.yaml"),
           "--port", str(port), "--workers", str(WORKERS), "--log-level", "warning", *options]
    process = subprocess.Popen(cmd, cwd=home, env={**os.environ, **(env or {})})
    gw = Gateway(f"http://127.0.0.1:{port}", process)
    try:
        gw.all_workers_connected()
        yield gw
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    with ServerThread(SimulatedUpstream(served_name=SERVED)) as up:
        yield f"{up.url}/v1"


def _registry(home: Path, upstream_url: str, source: str = "simulated", **more: Any) -> dict[str, Any]:
    """One model on ``upstream_url``, the meter on ``source`` settling fast, the ledger in ``home``; ``more``:
    other sections of the registry."""
    return {
        "meter": {"source": source, "settle_lag_ms": 300, "foreign_poll_ms": 0},
        "ledger": {"path": str(home / "ledger.db")},
        "models": {"llama": {"served_name": SERVED, "upstream": upstream_url, "gpus": [0]}},
        **more,
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream_url: str) -> Iterator[Gateway]:
    home = tmp_path_factory.mktemp("workers")
    registry = _registry(home, upstream_url)
    # The stalled-hub test stops the hub's whole process for over 5 s, its sampler with it. With the
    # default 2 s, whether the calls that ended meanwhile are measured would hang on which thread runs
    # first after SIGCONT (the sampler's fresh read, or the loop closing the window on a stale GPU).
    registry["meter"]["stale_after_ms"] = 30_000
    with _serving(home, registry) as gw:
        yield gw


async def _call(url: str, stream: bool, request_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """One call on its own connection (so the kernel may hand it to either worker): its id and inline energy."""
    headers = {"x-request-id": request_id} if request_id else {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        if not stream:
            r = await c.post("/v1/chat/completions", json=BODY, headers=headers)
            return r.headers["x-request-id"], r.json()["energy"]
        async with c.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}, headers=headers) as r:
            events = [e for e in (await r.aread()).decode().split("\n\n") if e]
            return r.headers["x-request-id"], orjson.loads(events[-2].removeprefix("data: "))["energy"]


async def _wave(url: str, n: int) -> list[tuple[str, dict[str, Any]]]:
    return list(await asyncio.gather(*(_call(url, i % 2 == 0) for i in range(n))))


def test_calls_on_both_workers_reach_one_meter_and_settle_as_with_one_process(gateway):
    before = {w["index"]: w["calls"] for w in gateway.all_workers_connected()["workers"]}
    results = [r for _ in range(3) for r in asyncio.run(_wave(gateway.url, 8))]
    ids = [rid for rid, _ in results]
    records = settled_records(gateway.url, ids)
    assert len(records) == len(ids)
    served = {w["index"]: w["calls"] - before.get(w["index"], 0) for w in gateway.ready()["workers"]}
    assert all(n > 0 for n in served.values()) and sum(served.values()) == len(ids), served

    # Symmetry: streamed and plain calls doing the same work get the same settled figure (the bound is
    # as loose as the single process's through-the-gateway test, tests/test_relay_shapes.py).
    streams = statistics.mean(records[rid]["joules"] for rid, _ in results[0::2])
    plain = statistics.mean(records[rid]["joules"] for rid, _ in results[1::2])
    assert abs(streams / plain - 1) < 0.3, (streams, plain)
    # Inline figures: the request's own share, close to the settled one.
    diffs = sorted(abs(e["joules"] / records[rid]["joules"] - 1) for rid, e in results)
    assert statistics.median(diffs) < 0.1, diffs
    assert all(e["method"] == "simulated" and not e["settled"] for _, e in results)

    # Conservation at the hub: per GPU, attributed (the settled records) + idle + unattributed = measured.
    def conserved() -> bool:
        m = gateway.metrics()
        attributed = m['wattgate_request_energy_joules_sum{method="simulated",model="llama"}']
        measured = m['wattgate_gpu_energy_joules_total{gpu="0"}']
        rest = m['wattgate_gpu_idle_energy_joules_total{gpu="0"}'] + m[
            'wattgate_gpu_unattributed_energy_joules_total{gpu="0"}']
        return abs(attributed + rest - measured) <= 1e-3 * measured

    wait_until(conserved, 5, what="attributed + idle + unattributed = measured")


def test_connections_are_dealt_to_the_workers_in_turn(gateway):
    before = {w["pid"]: w["calls"] for w in gateway.all_workers_connected()["workers"]}
    for _ in range(3 * WORKERS):  # one connection each, one after another
        asyncio.run(_call(gateway.url, stream=True))
    served = [w["calls"] - before.get(w["pid"], 0) for w in gateway.ready()["workers"]]
    assert served == [3] * WORKERS, served


def _channel_capacity() -> int:
    """How many connections a dealer's channel (a Unix SEQPACKET pair) holds unread on this host."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    sent = 0
    with ours, theirs, socket.socket() as passed:
        try:
            while True:
                socket.send_fds(ours, [b"c"], [passed.fileno()])
                sent += 1
        except BlockingIOError:
            return sent


def test_a_burst_that_fills_every_workers_channel_is_served_whole(gateway):
    """A worker takes the connections dealt to it once per turn of its loop, and its channel holds a few
    hundred (as many as its socket buffer has room for). With both workers stopped, a burst fills both
    channels: the dealer must wait for room, not close the connections it cannot place yet."""
    count = WORKERS * (_channel_capacity() + 1) + 10
    pids = [w["pid"] for w in gateway.all_workers_connected()["workers"]]
    port = int(gateway.url.rsplit(":", 1)[1])

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /no-such-route HTTP/1.1\r\nhost: wattgate\r\nconnection: close\r\n\r\n")
        try:
            return await asyncio.wait_for(reader.read(), 30)
        finally:
            writer.close()

    async def burst() -> list[bytes]:
        answers = [asyncio.create_task(one()) for _ in range(count)]
        await asyncio.sleep(1.0)  # every channel full by now, the rest waiting on the dealer
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        return list(await asyncio.gather(*answers))

    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        answers = asyncio.run(burst())
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    closed = [a for a in answers if not a.startswith(b"HTTP/1.1 404")]
    assert not closed, f"{len(closed)} of {count} connections closed unanswered"


def test_a_worker_killed_mid_stream_has_its_call_recorded_and_comes_back(gateway):
    gateway.all_workers_connected()

    async def long_stream() -> str:
        body = {**BODY, "max_tokens": 2000, "stream": True}
        try:
            async with (httpx.AsyncClient(base_url=gateway.url, timeout=30) as c,
                        c.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"x-request-id": "killed-worker-1"}) as r):
                async for _ in r.aiter_bytes():
                    pass
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return "ended"

    async def kill_its_worker() -> int:
        for _ in range(100):
            await asyncio.sleep(0.05)
            busy = [w for w in gateway.ready()["workers"] if w["open_calls"]]
            if busy:
                os.kill(busy[0]["pid"], signal.SIGKILL)
                return int(busy[0]["pid"])
        raise AssertionError("no worker had the stream open")

    async def both() -> tuple[str, int]:
        stream = asyncio.create_task(long_stream())
        killed = await kill_its_worker()  # it polls until a worker has the stream open
        return await stream, killed

    outcome, killed = asyncio.run(both())
    assert outcome != "ended"  # the connection broke with its worker
    record = settled_records(gateway.url, ["killed-worker-1"])["killed-worker-1"]
    assert record["status"] == "client_closed" and record["method"] == "simulated" and record["joules"] > 0
    workers = gateway.all_workers_connected()["workers"]
    assert killed not in [w["pid"] for w in workers]  # restarted: a new process in its place
    # and is dealt connections again once it says it is ready (calls one after another: each /readyz
    # below is a connection too, dealt in turn)
    def dealt_to_both() -> bool:
        before = {w["pid"]: w["calls"] for w in gateway.ready()["workers"]}
        for _ in range(2 * WORKERS):
            asyncio.run(_call(gateway.url, stream=False))
        return all(w["calls"] > before.get(w["pid"], 0) for w in gateway.ready()["workers"])

    wait_until(dealt_to_both, 30, what="the restarted worker dealt connections")


def test_the_workers_refuse_a_head_over_its_cap(gateway):
    """The HTTP limits hold on the workers' connections too (dealt to them by the supervisor)."""
    with socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])), timeout=10) as sock:
        try:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it was all sent
        assert sock.recv(100).startswith(b"HTTP/1.1 431 ")
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200


def test_a_stalled_hub_never_stalls_a_stream(gateway):
    gateway.all_workers_connected()

    def timed_stream(request_id: str) -> tuple[float, float, dict[str, Any]]:
        """Seconds for the whole stream, the longest gap between two reads before the last, and the inline energy."""
        gaps, last = [], time.monotonic()
        start = last
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json={**BODY, "stream": True},
                          headers={"x-request-id": request_id}, timeout=30) as r:
            body = b""
            for chunk in r.iter_bytes():
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                body += chunk
        events = [e for e in body.decode().split("\n\n") if e]
        return time.monotonic() - start, max(gaps[1:-1]), orjson.loads(events[-2].removeprefix("data: "))["energy"]

    def timed_get(path: str) -> tuple[float, httpx.Response]:
        start = time.monotonic()
        r = httpx.get(f"{gateway.url}{path}", timeout=30)
        return time.monotonic() - start, r

    normal, _, _ = timed_stream("hub-running")
    hub = gateway.ready()["hub_pid"]
    os.kill(hub, signal.SIGSTOP)
    try:
        stalled, worst_gap, energy = timed_stream("hub-stalled")
        ready_s, ready = timed_get("/readyz")
        metrics_s, metrics = timed_get("/metrics")
    finally:
        os.kill(hub, signal.SIGCONT)
    # Tokens flow as usual. Only the client's id (checked by the hub) and the figure wait for the hub:
    # the first wait that times out marks the hub stalled, so the call loses REPLY_TIMEOUT_S at most,
    # and its figure is estimated.
    assert worst_gap < 0.25
    assert stalled < normal + REPLY_TIMEOUT_S + 0.3, (stalled, normal)
    assert energy["method"] == "estimate" and not energy["settled"]
    # Readiness answers from the worker's own view within a probe's second, and stays ready.
    assert ready_s < 1.0 and ready.status_code == 200, (ready_s, ready.text)
    assert ready.json()["meter"]["hub"] == "stalled" and ready.json()["upstreams"] == {"llama": True}
    # The hub's other routes answer 503 with retry-after after a bounded wait.
    assert metrics_s < HUB_ROUTE_WAIT_S + 0.5 and metrics.status_code == 503, (metrics_s, metrics.text)
    assert metrics.headers["retry-after"] == "1" and metrics.json()["error"]["type"] == "service_unavailable"
    # The hub, back, meters the call from the events it was sent: its record is a measurement.
    record = settled_records(gateway.url, ["hub-stalled"])["hub-stalled"]
    assert record["method"] == "simulated" and record["completion_tokens"] == 48
    assert httpx.get(f"{gateway.url}/metrics").status_code == 200


def test_the_hub_killed_calls_are_still_served_and_nothing_settled_is_lost(gateway):
    gateway.all_workers_connected()
    before = [rid for rid, _ in asyncio.run(_wave(gateway.url, 4))]
    assert len(settled_records(gateway.url, before)) == 4  # settled: in the ledger
    hub = gateway.ready()["hub_pid"]
    os.kill(hub, signal.SIGKILL)

    missed: list[httpx.Response] = []

    def hub_missed() -> bool:
        r = httpx.get(f"{gateway.url}/readyz")
        missed[:] = [r]
        return r.json()["meter"].get("hub") == "unreachable"

    wait_until(hub_missed, what="the hub missed")
    # Still ready: the workers serve calls (with estimates) while the hub restarts.
    assert missed[0].status_code == 200 and missed[0].json()["upstreams"] == {"llama": True}

    during = asyncio.run(_wave(gateway.url, 4))
    assert all(e["method"] == "estimate" and not e["settled"] for _, e in during)

    state = gateway.all_workers_connected()
    assert state["hub_pid"] != hub
    # What settled before the kill is read back from the ledger; what was served meanwhile reaches it too.
    assert len(settled_records(gateway.url, before)) == 4
    after = settled_records(gateway.url, [rid for rid, _ in during])
    assert len(after) == 4 and all(r["method"] == "estimate" for r in after.values())
    errors = gateway.metrics()['wattgate_meter_errors_total{kind="unreachable"}']
    assert errors >= 4


def test_workers_on_sockets_of_their_own_serve_and_one_killed_is_replaced(tmp_path: Path, upstream_url: str):
    with _serving(tmp_path, _registry(tmp_path, upstream_url), options=("--spread", "kernel")) as gw:
        ids = [rid for rid, _ in asyncio.run(_wave(gw.url, 8))]
        assert len(settled_records(gw.url, ids)) == len(ids)
        victim = gw.ready()["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        # The kernel takes its socket out of the port's group: the other worker takes every call meanwhile.
        ids = [rid for rid, _ in asyncio.run(_wave(gw.url, 8))]
        assert len(settled_records(gw.url, ids)) == len(ids)
        pids = [w["pid"] for w in gw.all_workers_connected()["workers"]]
        assert victim not in pids and len(pids) == WORKERS
        ids = [rid for rid, _ in asyncio.run(_wave(gw.url, 8))]
        assert len(settled_records(gw.url, ids)) == len(ids)


def test_the_supervisor_refuses_a_port_in_use(tmp_path: Path):
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": {"m": {"upstream": "http://127.0.0.1:9/v1"}}}))
    with ServerThread(SimulatedUpstream()) as taken:
        cmd = [sys.executable, "-m", "wattgate.proxy.cli", "serve", "--config", str(registry),
               "--port", str(taken.port), "--workers", "2"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=tmp_path,
                              check=False)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{taken.port}" in done.stderr


def test_keys_teams_ids_and_cors_behave_as_with_one_process(tmp_path: Path, upstream_url: str):
    """Calls are checked by the worker that takes them; records, ids and metrics by the hub, whichever
    worker asks (tests/test_gateway_modes.py holds one process to the same)."""
    registry = _registry(tmp_path, upstream_url,
                         gateway={"auth": {"keys_env": "WG_TEST_KEYS", "metrics_aliases": ["prometheus"]},
                                  "cors_allow_origins": ["https://app.example"]})
    keys = {"WG_TEST_KEYS": "team-a:sk-a,team-b:sk-b,prometheus:sk-scrape"}
    with _serving(tmp_path, registry, keys) as gw:
        def call(key: str, rid: str, tokens: int) -> httpx.Response:
            body = {**BODY, "max_tokens": tokens}
            return httpx.post(f"{gw.url}/v1/chat/completions", json=body,
                              headers={"authorization": f"Bearer {key}", "x-request-id": rid})

        def get(path: str, key: str | None = None) -> httpx.Response:
            headers = {"origin": "https://app.example"} | ({"authorization": f"Bearer {key}"} if key else {})
            return httpx.get(f"{gw.url}{path}", headers=headers)

        assert call("sk-wrong", "x-1", 2).status_code == 401
        for path in ("/metrics", "/v1/energy/x-1", "/v1/models"):
            assert get(path).status_code == 401, path
        # Several calls, so that both workers take some: the ids are checked by the hub all the same.
        a = [call("sk-a", f"shared-{i}", 2) for i in range(6)]
        b = [call("sk-b", f"shared-{i}", 5) for i in range(6)]
        assert all(r.headers["x-request-id"] == f"shared-{i}" for rs in (a, b) for i, r in enumerate(rs))
        assert all(w["calls"] for w in gw.ready()["workers"])  # both workers took some
        again = call("sk-a", "shared-0", 1)
        assert again.headers["x-request-id"].startswith("wg-")  # a team's reused id gets a fresh one
        settled_a = settled_records(gw.url, [f"shared-{i}" for i in range(6)], key="sk-a")
        assert {r["completion_tokens"] for r in settled_a.values()} == {2}
        assert get("/v1/energy/shared-0", "sk-b").json()["completion_tokens"] == 5
        assert get("/v1/energy/never-sent", "sk-b").status_code == 404

        # The ledger's totals, from the hub with the query string: the caller's team only.
        def totals() -> list[tuple[str, int, int]]:
            rows = get("/v1/energy?by=model&since=1d", "sk-b").json()["data"]
            return [(t["model"], t["requests"], t["completion_tokens"]) for t in rows]

        wait_until(lambda: totals() == [("llama", 6, 30)], timeout=10, what="team-b's six calls in its ledger totals")
        assert get("/v1/energy?by=team", "sk-b").json()["error"]["param"] == "by"
        assert get("/chat").status_code == 200 and get("/widget.js").status_code == 200  # static: any worker, no key

        energy = get(f"/v1/energy/{again.headers['x-request-id']}", "sk-b")
        assert energy.status_code == 404  # another team's id: not found, as if it did not exist
        # CORS on the API, whoever answers: the figures' headers are exposed to the page.
        assert again.headers.get("access-control-allow-origin") is None  # no origin sent
        cors = get("/v1/energy/shared-0", "sk-a")
        assert cors.headers["access-control-allow-origin"] == "https://app.example"
        preflight = httpx.options(f"{gw.url}/v1/chat/completions", headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type"})
        assert preflight.status_code == 200
        # Teams see their own series only; the scrape key sees every team's.
        team_series = [line for line in get("/metrics", "sk-a").text.splitlines()
                       if line.startswith("wattgate_team_energy_joules_total")]
        assert team_series and all('team="team-a"' in line for line in team_series)
        assert 'team="team-b"' in get("/metrics", "sk-scrape").text



def test_the_hub_meters_through_nvml_and_its_figures_reach_every_worker(tmp_path: Path, upstream_url: str):
    """``meter.source: nvml`` in the hub, with tests/fake_nvml.py standing in for the driver (as
    ``pynvml`` on the processes' path): calls on both workers get ``nvml`` figures, inline and settled."""
    (tmp_path / "pynvml.py").write_text("from tests.fake_nvml import FakeGpu, FakeNvml\n\n"
                                        "globals().update(vars(FakeNvml([FakeGpu()]).module()))\n")
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(tmp_path), str(root), os.environ.get("PYTHONPATH")) if p)
    with _serving(tmp_path, _registry(tmp_path, upstream_url, source="nvml"), {"PYTHONPATH": path}) as gw:
        results = asyncio.run(_wave(gw.url, 8))
        records = settled_records(gw.url, [rid for rid, _ in results])
        meter = gw.ready()["meter"]
    assert all(e["method"] == "nvml" and e["joules"] > 0 for _, e in results)
    assert len(records) == 8 and all(r["method"] == "nvml" and r["settled"] for r in records.values())
    assert meter["ok"] is True and meter["errors"] == {}

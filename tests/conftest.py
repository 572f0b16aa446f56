"""A real stack on localhost: a vLLM-like simulated upstream and the gateway, each under uvicorn."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from wattgate.meter import Meter
from wattgate.meter.sources.simulated import SimulatedGpu, SimulatedSource
from wattgate.proxy.app import create_app
from wattgate.proxy.serving import ServerThread, free_port
from wattgate.proxy.settings import GatewaySettings, MeterSettings, Model, Settings, Timeouts
from wattgate.proxy.simulated_upstream import Scenario, SimulatedUpstream

# Ledgers of the apps under test go to a scratch directory, never the user's, removed at exit.
os.environ["WATTGATE_DATA_DIR"] = tempfile.mkdtemp(prefix="wattgate-test-")
atexit.register(shutil.rmtree, os.environ["WATTGATE_DATA_DIR"], ignore_errors=True)

SERVED = "meta-llama/Llama-3.1-8B-Instruct"
#: Files a test keeps for people to look at (screenshots); the run's summary lists them.
ARTIFACTS: list[Path] = []
FAULTS = {
    "fault:slow": Scenario(first_token_delay_s=0.3),
    "fault:very-slow": Scenario(first_token_delay_s=30.0),
    "fault:500": Scenario(status=500),
    "fault:break": Scenario(break_after_tokens=3),
    "fault:hang": Scenario(hang=True),
}


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s (rather than sleep a fixed time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.02)


def wait_serving(proc: subprocess.Popen, url: str, log: Path, timeout: float, what: str) -> None:
    """Wait until a real server that ``proc`` started answers 200 at ``url``; fail with the end of its
    ``log`` if it exits first or takes longer than ``timeout`` s (an opt-in suite's vLLM, LiteLLM, ...)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start ({proc.returncode=}); its log ends:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a real server that ``proc`` started: asked to, then killed if it takes over 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def scenario(body: dict[str, Any]) -> Scenario:
    messages = body.get("messages") or [{}]
    text = messages[0].get("content") if isinstance(messages[0], dict) else None
    return FAULTS.get(text if isinstance(text, str) else "", Scenario())


def settled_records(url: str, ids: list[str], timeout: float = 10.0, key: str | None = None) -> dict[str, dict[str, Any]]:
    """The settled records of ``ids`` from a gateway at ``url`` (read with gateway ``key``); fails, naming
    those still unsettled and what the gateway last said of one, unless all settle within ``timeout``."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    records: dict[str, dict[str, Any]] = {}
    last: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while True:
        for rid in (rid for rid in ids if rid not in records):
            last = httpx.get(f"{url}/v1/energy/{rid}", headers=headers).json()
            if last.get("settled"):
                records[rid] = last
        if len(records) == len(set(ids)):
            return records
        if time.monotonic() > deadline:
            missing = [rid for rid in ids if rid not in records]
            raise AssertionError(f"{len(missing)} of {len(ids)} records did not settle within {timeout} s: "
                                 f"{missing[:5]}; the last answer: {last}")
        time.sleep(0.1)


@dataclass
class Stack:
    url: str
    upstream_url: str
    upstream: SimulatedUpstream
    gpu: SimulatedGpu
    meter: Meter

    def record(self, request_id: str, settled: bool = True, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            r = httpx.get(f"{self.url}/v1/energy/{request_id}")
            if r.status_code == 200 and (r.json()["settled"] or not settled):
                return r.json()
            if time.monotonic() > deadline:
                raise AssertionError(f"no settled record for {request_id}: {r.status_code} {r.text}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def stack():
    gpu = SimulatedGpu()
    upstream = SimulatedUpstream(gpu, served_name=SERVED, default_max_tokens=16, scenario=scenario)
    with ServerThread(upstream) as up:
        settings = Settings(
            meter=MeterSettings(source="simulated", settle_lag_ms=200, foreign_poll_ms=100),
            gateway=GatewaySettings(timeouts=Timeouts(read_s=1.0, connect_s=1.0), max_body_bytes=64 * 1024),
            models={
                "llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0]),
                "remote": Model(served_name=SERVED, upstream=f"{up.url}/v1", estimate={"active_params_b": 70}),
                "down": Model(upstream=f"http://127.0.0.1:{free_port()}/v1", gpus=[0]),
            },
        )
        meter = Meter(SimulatedSource({0: gpu}), [0], interval_s=0.02, settle_lag_s=0.2)
        with ServerThread(create_app(settings, meter=meter)) as gw:
            yield Stack(gw.url, up.url, upstream, gpu, meter)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium (tests/chromium.py) for a module of browser tests; they skip without one."""
    from tests.chromium import CHROMIUM, CHROMIUM_ARGS  # only the browser suites need Playwright

    with pytest.importorskip("playwright.sync_api").sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def artifacts() -> list[Path]:
    """Where a test lists the files it keeps (the same list the summary prints: import would copy it)."""
    return ARTIFACTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if ARTIFACTS:
        terminalreporter.write_sep("-", "artifacts kept by the tests")
        for path in ARTIFACTS:
            terminalreporter.write_line(str(path))

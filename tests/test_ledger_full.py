"""A ledger on a disk that really fills (issue 30): a record is settled only once committed, the records
wait while the disk is full and are stored once it has room, those given up say `stored: false`, `/readyz`
says how the ledger stands while staying ready, and the log says so in a few lines, not one per record.

Two ways to fill it, each a real write failure the gateway cannot tell from a full disk: a 16 MiB tmpfs
mounted for the test (the kernel's ENOSPC; root only, skipped, saying why, elsewhere), and a gateway in
its own process whose file-size limit (RLIMIT_FSIZE) is lowered under its ledger's files and raised
again (EFBIG; any user, on Linux)."""

from __future__ import annotations

import logging
import resource
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import SERVED, stop_server, wait_until
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.app import create_app
from wattgate.proxy.ledger_store import LedgerUnavailable
from wattgate.proxy.serving import ServerThread, free_port
from wattgate.proxy.settings import LedgerSettings, MeterSettings, Model, Settings
from wattgate.proxy.simulated_upstream import SimulatedUpstream

CHAT = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    # 16 MiB: room for the ledger's database and its WAL (SQLite checkpoints it at about 4 MiB).
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=False,
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """A file that takes every free byte of ``disk``."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 9):  # then the last few blocks
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return filler


@dataclass
class Gateway:
    """A gateway whose ledger's disk the test fills and frees, and the ledger's log lines so far."""

    url: str
    fill: Callable[[], None]
    free: Callable[[], None]
    ledger_log: Callable[[], list[str]]


def _settings(ledger: Path, upstream: str, queue_size: int) -> Settings:
    return Settings(meter=MeterSettings(source="simulated", settle_lag_ms=100),
                    ledger=LedgerSettings(path=ledger, queue_size=queue_size),
                    models={"llama": Model(served_name=SERVED, upstream=f"{upstream}/v1", gpus=[0])})


@contextmanager
def _on_tmpfs(disk: Path, queue_size: int, caplog: pytest.LogCaptureFixture) -> Iterator[Gateway]:
    caplog.set_level(logging.INFO, logger="wattgate.proxy.ledger")
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED)) as upstream, \
            ServerThread(create_app(_settings(disk / "ledger.db", upstream.url, queue_size))) as gw:
        filler = disk / "filler"
        yield Gateway(gw.url, fill=lambda: _fill(disk), free=filler.unlink,
                      ledger_log=lambda: [r.getMessage() for r in caplog.records if r.name == "wattgate.proxy.ledger"])


@contextmanager
def _under_a_file_size_limit(folder: Path, queue_size: int) -> Iterator[Gateway]:
    # A write at or past the soft limit fails with EFBIG (Python ignores SIGXFSZ), whatever the file's size;
    # 4 KiB is under the database's second page and the WAL's first frame. The hard limit stays where it
    # was, so any user may raise the soft one again.
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED)) as upstream:
        registry = folder / "registry.yaml"
        registry.write_text(f"meter: {{source: simulated, settle_lag_ms: 100}}\n"
                            f"ledger: {{path: '{folder / 'ledger.db'}', queue_size: {queue_size}}}\n"
                            f"models: {{llama: {{served_name: {SERVED}, upstream: '{upstream.url}/v1', gpus: [0]}}}}\n")
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "wattgate.proxy.cli", "serve", "--config", str(registry),
                                 "--port", str(port), "--log-level", "info"],
                                stderr=subprocess.PIPE, text=True)  # a pipe: the limit is for regular files
        lines: list[str] = []
        assert proc.stderr is not None
        drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
        drain.start()
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

        def limit(soft: int) -> None:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (soft, hard))

        url = f"http://127.0.0.1:{port}"

        def serving() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the gateway exited ({proc.returncode}): {''.join(lines)[-2000:]}")
            try:
                return httpx.get(f"{url}/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(serving, 20, what="the gateway serving")
            yield Gateway(url, fill=lambda: limit(4096), free=lambda: limit(hard),
                          ledger_log=lambda: [line for line in lines if "wattgate.proxy.ledger:" in line])
        finally:
            stop_server(proc)


@pytest.fixture(params=["tmpfs", "file_size_limit"])
def gateway_on(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., AbstractContextManager[Gateway]]:
    """``gateway_on(queue_size=...)``: a gateway whose ledger's disk can be filled, each way."""
    if request.param == "tmpfs":
        disk = request.getfixturevalue("small_disk")
        caplog = request.getfixturevalue("caplog")
        return lambda queue_size=10_000: _on_tmpfs(disk, queue_size, caplog)
    if not hasattr(resource, "prlimit"):
        pytest.skip("resource.prlimit is Linux only")
    return lambda queue_size=10_000: _under_a_file_size_limit(tmp_path, queue_size)


def _calls(url: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 200  # a ledger that cannot write never fails a request
        ids.append(r.headers["x-request-id"])
    return ids


def test_a_full_disk_keeps_records_unsettled_then_stores_them_once_it_has_room(gateway_on):
    with gateway_on() as gw:
        _calls(gw.url, 1)
        wait_until(lambda: httpx.get(f"{gw.url}/readyz").json()["ledger"]["stored"] == 1, 5, what="the first stored")
        gw.fill()
        ids = _calls(gw.url, 20)
        ledger: dict = {}

        def failing() -> bool:
            nonlocal ledger
            ready = httpx.get(f"{gw.url}/readyz")
            ledger = ready.json()["ledger"]
            assert ready.status_code == 200  # degraded, still serving: still ready
            return ledger["state"] == "failing" and ledger["waiting"] >= 20

        wait_until(failing, 10, what="the ledger failing with the 20 records waiting")
        assert ledger["last_error"] and ledger["dropped"] == 0  # "database or disk is full", "disk I/O error"
        for rid in ids:  # final figures, but not yet durable: not settled
            record = httpx.get(f"{gw.url}/v1/energy/{rid}").json()
            assert record["settled"] is False and "stored" not in record
        gw.free()
        wait_until(lambda: all(httpx.get(f"{gw.url}/v1/energy/{rid}").json()["settled"] for rid in ids), 15,
                   what="every waiting record settled once the disk had room")
        ledger = httpx.get(f"{gw.url}/readyz").json()["ledger"]
        assert ledger["state"] == "ok" and ledger["waiting"] == 0 and ledger["stored"] == 21
        lines = gw.ledger_log()
    assert 2 <= len(lines) <= 4, lines  # failing, (a summary,) writing again
    assert "cannot write to" in lines[0] and "writing to" in lines[-1]


def test_records_beyond_what_can_wait_are_given_up_counted_and_say_not_stored(gateway_on):
    with gateway_on(queue_size=5) as gw:
        gw.fill()
        ids = _calls(gw.url, 12)
        wait_until(lambda: httpx.get(f"{gw.url}/readyz").json()["ledger"]["dropped"] >= 7, 10,
                   what="the records beyond the bound given up")
        given_up = [rid for rid in ids if httpx.get(f"{gw.url}/v1/energy/{rid}").json().get("stored") is False]
        assert len(given_up) == 7  # the oldest to settle (the meter settles them about in order)
        assert all(httpx.get(f"{gw.url}/v1/energy/{rid}").json()["settled"] is False for rid in given_up)
        assert "wattgate_ledger_dropped_records_total 7.0" in httpx.get(f"{gw.url}/metrics").text
        gw.free()
        kept = [rid for rid in ids if rid not in given_up]
        wait_until(lambda: all(httpx.get(f"{gw.url}/v1/energy/{rid}").json()["settled"] for rid in kept), 15,
                   what="the records that waited settled")


def test_an_unwritable_ledger_is_refused_at_start_up_naming_it(small_disk):
    _fill(small_disk)
    for path, reason in ((small_disk / "ledger.db", ".*full"), (small_disk / "filler" / "ledger.db", f"{small_disk}/filler is not a directory")):
        settings = Settings(ledger=LedgerSettings(path=path), meter=MeterSettings(source="none"),
                            models={"m": Model(upstream="http://127.0.0.1:9/v1")})
        with pytest.raises(LedgerUnavailable, match=f"cannot open the ledger {path}: {reason}"):
            create_app(settings)

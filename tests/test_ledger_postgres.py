"""A fleet's ledger on a real PostgreSQL (issue 33): gateways that share ``ledger.url`` are one fleet for
records, reads and reports; team isolation holds across them; a database restarted under load loses
no record; a gateway killed keeps what it committed; the schema is made once however many gateways
start together; SQLite and PostgreSQL give the same totals for the same records.

The server is Debian's (``tests/postgres.py`` makes a private cluster); without one these skip, saying why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import SERVED, settled_records, stop_server, wait_serving, wait_until
from tests.postgres import Cluster, cluster
from tests.test_ledger import energy  # the made-up settled figures the SQLite tests use
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.app import create_app
from wattgate.proxy.figures import ENERGY_KEYS, energy_from_record
from wattgate.proxy.ledger_file import SqliteStore
from wattgate.proxy.ledger_postgres import MIGRATIONS, PostgresStore
from wattgate.proxy.ledger_rows import from_row, to_row
from wattgate.proxy.ledger_store import LedgerUnavailable
from wattgate.proxy.serving import ServerThread, free_port
from wattgate.proxy.settings import Auth, GatewaySettings, LedgerSettings, MeterSettings, Model, Settings
from wattgate.proxy.simulated_upstream import SimulatedUpstream

CHAT = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
KEYS = "team-a:sk-a,team-b:sk-b"


@pytest.fixture(scope="module")
def pg() -> Iterator[Cluster]:
    try:
        with cluster() as c:
            yield c
    except RuntimeError as exc:
        if os.environ.get("WATTGATE_REQUIRE_POSTGRES"):  # CI, which installs the server: these must run
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture
def db_url(pg: Cluster, request: pytest.FixtureRequest) -> str:
    """A database of this test's own."""
    return pg.create_database(f"t{abs(hash(request.node.nodeid)) % 10**9}")


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED)) as up:
        yield f"{up.url}/v1"


def _settings(url: str, upstream: str, gateway: str, keys: bool = True) -> Settings:
    return Settings(
        meter=MeterSettings(source="simulated", settle_lag_ms=100),
        ledger=LedgerSettings(url=url),
        gateway=GatewaySettings(id=gateway, auth=Auth(keys_env="WG_PG_KEYS") if keys else None),
        models={"llama": Model(served_name=SERVED, upstream=upstream, gpus=[0])},
    )


@contextmanager
def _gateways(url: str, upstream: str, *names: str) -> Iterator[list[ServerThread]]:
    os.environ["WG_PG_KEYS"] = KEYS
    servers = [ServerThread(create_app(_settings(url, upstream, name))) for name in names]
    try:
        for s in servers:
            s.__enter__()
        yield servers
    finally:
        for s in servers:
            s.__exit__(None, None, None)
        os.environ.pop("WG_PG_KEYS", None)


def _call(url: str, key: str, request_id: str | None = None) -> str:
    headers = {"authorization": f"Bearer {key}", **({"x-request-id": request_id} if request_id else {})}
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.headers["x-request-id"]


def _rows(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as db:
        return db.execute("SELECT request_id, team, gateway, settled FROM requests ORDER BY request_id").fetchall()


def test_two_gateways_on_one_ledger_are_one_fleet_for_records_reads_and_reports(db_url, upstream):
    with _gateways(db_url, upstream, "gw-a", "gw-b") as (a, b):
        on_a = [_call(a.url, "sk-a") for _ in range(3)]
        on_b = [_call(b.url, "sk-a") for _ in range(2)] + [_call(b.url, "sk-b")]
        settled_records(a.url, on_a, key="sk-a")
        settled_records(b.url, on_b[:2], key="sk-a")
        settled_records(b.url, on_b[2:], key="sk-b")
        rows = _rows(db_url)
        assert sorted((gw, team) for _, team, gw, _ in rows) == sorted(
            [("gw-a", "team-a")] * 3 + [("gw-b", "team-a")] * 2 + [("gw-b", "team-b")])
        # Any replica answers for the fleet: a call served by A, read on B (B never had it in memory).
        for rid in on_a:
            read = httpx.get(f"{b.url}/v1/energy/{rid}", headers={"authorization": "Bearer sk-a"})
            assert read.status_code == 200 and read.json()["settled"] and read.json()["request_id"] == rid
            # Team isolation holds across the fleet: another team's key does not see it.
            assert httpx.get(f"{b.url}/v1/energy/{rid}", headers={"authorization": "Bearer sk-b"}).status_code == 404
        by_gateway = httpx.get(f"{a.url}/v1/energy", params={"by": "gateway"},
                               headers={"authorization": "Bearer sk-a"}).json()["data"]
        assert {r["gateway"]: r["requests"] for r in by_gateway} == {"gw-a": 3, "gw-b": 2}  # team-a's, fleet-wide
    report = subprocess.run([sys.executable, "-m", "wattgate.proxy.cli", "report", "--ledger", db_url, "--by",
                             "gateway", "--format", "json"], capture_output=True, text=True, check=True)
    totals = {r["gateway"]: r for r in json.loads(report.stdout)}
    assert {g: r["requests"] for g, r in totals.items()} == {"gw-a": 3, "gw-b": 3}
    with psycopg.connect(db_url) as db:
        joules = db.execute("SELECT SUM(joules) FROM requests").fetchone()[0]
    assert sum(r["joules"] for r in totals.values()) == pytest.approx(joules, rel=1e-12)


def test_a_database_restarted_under_load_loses_no_record(pg, db_url, upstream):
    ids: list[str] = []
    stop = threading.Event()
    with _gateways(db_url, upstream, "gw-a") as (gw,):
        def load() -> None:
            while not stop.is_set():
                ids.append(_call(gw.url, "sk-a"))  # a ledger away never fails a request

        worker = threading.Thread(target=load)
        worker.start()
        try:
            wait_until(lambda: len(ids) >= 10, 20, what="calls before the restart")
            pg.stop("fast")
            wait_until(lambda: httpx.get(f"{gw.url}/readyz").json()["ledger"]["state"] == "failing", 20,
                       what="the ledger seen failing")
            during = len(ids)
            wait_until(lambda: len(ids) >= during + 10, 20, what="calls while the database is away")
            unsettled = httpx.get(f"{gw.url}/v1/energy/{ids[-1]}", headers={"authorization": "Bearer sk-a"}).json()
            assert unsettled["settled"] is False  # final, but not yet committed
            pg.start()
        finally:
            stop.set()
            worker.join()
        settled_records(gw.url, ids, timeout=60, key="sk-a")
        ledger = httpx.get(f"{gw.url}/readyz").json()["ledger"]
        assert ledger["state"] == "ok" and ledger["dropped"] == 0 and ledger["url"] == db_url
    assert sorted(r[0] for r in _rows(db_url)) == sorted(ids)


def test_a_gateway_killed_keeps_the_records_it_committed(db_url, upstream, tmp_path):
    registry = tmp_path / "registry.yaml"
    registry.write_text(f"meter: {{source: simulated, settle_lag_ms: 100}}\nledger: {{url: '{db_url}'}}\n"
                        f"models: {{llama: {{served_name: {SERVED}, upstream: '{upstream}', gpus: [0]}}}}\n")
    port = free_port()
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "wattgate.proxy.cli", "serve", "--config", str(registry),
                                 "--port", str(port), "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(proc, f"{url}/healthz", log, 30, "the gateway")
        ids = [_call(url, "none") for _ in range(5)]
        settled_records(url, ids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        stop_server(proc)
    rows = _rows(db_url)
    assert sorted(r[0] for r in rows) == sorted(ids) and {r[2] for r in rows} == {f"{os.uname().nodename}:{port}"}


def test_gateways_starting_together_make_the_schema_once(db_url):
    stores: list[PostgresStore] = []
    threads = [threading.Thread(target=lambda: stores.append(PostgresStore(db_url))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stores) == 4
    with psycopg.connect(db_url) as db:
        assert db.execute("SELECT version FROM wattgate_schema").fetchall() == [(len(MIGRATIONS),)]
    for s in stores:
        s.close()


def test_sqlite_and_postgresql_give_the_same_totals_for_the_same_records(db_url, tmp_path):
    rows = [to_row(energy(f"r{i}", 1.0 + i % 7, ("nvml", "estimate", "simulated")[i % 3]), f"m{i % 3}",
                   ("team-a", "team-b", None)[i % 3], 1_700_000_000 + i * 5000, {0: 1.0}, 0.1 * i, f"gw-{i % 2}")
            for i in range(60)]
    lite, pg = SqliteStore(tmp_path / "l.db"), PostgresStore(db_url)
    try:
        for store in (lite, pg):
            store.write(rows)
            store.write(rows[:5])  # the same team's ids again: replaced, not added
        for by in ("model", "team", "day", "method", "gateway"):
            assert _rounded(pg.totals(by, None, None)) == _rounded(lite.totals(by, None, None)), by
        assert _rounded(pg.totals("model", None, "team-a")) == _rounded(lite.totals("model", None, "team-a"))
        assert pg.rows(None) == lite.rows(None)
        assert pg.get("r4", "team-b", False) == lite.get("r4", "team-b", False) is not None
        assert pg.get("r4", "team-a", False) is lite.get("r4", "team-a", False) is None
        assert pg.prune(1, delete=False) == lite.prune(1, delete=False) == 60
    finally:
        lite.close()
        pg.close()


def _rounded(value: Any) -> Any:
    """Sums in another order differ in the last bits."""
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def test_an_unreachable_database_is_refused_at_start_up_in_one_line_without_its_password(monkeypatch):
    monkeypatch.setenv("WG_PG_PASSWORD", "hunter2")
    url = f"postgresql://wattgate@127.0.0.1:{free_port()}/fleet"
    with pytest.raises(LedgerUnavailable) as refused:
        create_app(Settings(ledger=LedgerSettings(url=url, password_env="WG_PG_PASSWORD"),
                            models={"m": Model(upstream="http://127.0.0.1:9/v1")}))
    message = str(refused.value)
    assert message.startswith(f"cannot open the ledger {url}: ") and "\n" not in message and "hunter2" not in message


def test_a_ledger_away_makes_reads_a_503_and_calls_go_on(pg, db_url, upstream):
    with _gateways(db_url, upstream, "gw-a") as (gw,):
        pg.stop("fast")
        try:
            rid = _call(gw.url, "sk-a")  # served; its record waits for the database
            late = httpx.get(f"{gw.url}/v1/energy/not-in-memory", headers={"authorization": "Bearer sk-a"})
            assert late.status_code == 503 and late.headers["retry-after"]
            assert "127.0.0.1" not in late.text  # the database's address stays in the log
            summary = httpx.get(f"{gw.url}/v1/energy", headers={"authorization": "Bearer sk-a"})
            assert summary.status_code == 503
        finally:
            pg.start()
        settled_records(gw.url, [rid], timeout=60, key="sk-a")


def test_energy_object_keys_survive_the_round_trip(db_url):
    """GET /v1/energy/{id} reads back from PostgreSQL the same keys as from memory."""
    e = energy("k1", 2.0, "nvml")
    store = PostgresStore(db_url)
    try:
        store.write([to_row(e, "m", "t", time.time(), {0: 2.0}, 0.0, "gw")])
        row = store.get("k1", "t", False)
        assert row is not None
        back = energy_from_record(from_row(row))
        assert tuple(back) == ENERGY_KEYS
        assert back["joules"] == e["joules"] and back["request_id"] == "k1" and back["grid"] == e["grid"]
    finally:
        store.close()

"""The ledger: durable settled records, restart, full queue, report arithmetic, and the API over it."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time

import httpx
import pytest

from tests.conftest import SERVED, wait_until
from wattgate.proxy.cli import main
from wattgate.proxy.ledger import Ledger
from wattgate.proxy.ledger_file import MIGRATIONS, SqliteStore, connect
from wattgate.proxy.ledger_rows import to_row
from wattgate.proxy.serving import ServerThread
from wattgate.proxy.settings import LedgerSettings, MeterSettings, Model, Settings
from wattgate.proxy.simulated_upstream import SimulatedUpstream
from wattgate.proxy.totals import parse_duration, totals


def energy(rid: str, joules: float, method: str = "nvml", completion: int = 10, prompt: int = 5) -> dict:
    return {"request_id": rid, "status": "ok", "method": method, "settled": True, "prompt_tokens": prompt,
            "completion_tokens": completion, "window_ms": 100, "joules": joules, "wh": joules / 3600,
            "gco2e": joules / 3.6e6 * 1.2 * 56.0, "water_ml": joules / 3.6e6 * 4.22 * 1000, "gpus": [0],
            "components": {"gpu": joules}, "pue": 1.2, "grid_zone": "FRA", "grid_intensity_g_per_kwh": 56.0,
            "gco2e_location": joules / 3.6e6 * 1.2 * 56.0, "embodied_gco2e": joules / 100, "gpu_seconds": joules / 10,
            "sci": {"e_kwh": joules / 3.6e6 * 1.2, "i_g_per_kwh": 56.0, "m_g": joules / 100,
                    "sci_g": joules / 3.6e6 * 1.2 * 56.0 + joules / 100,
                    "tiers_wh": {"accelerators": joules / 3600, "with_host": joules / 3600, "with_idle": joules / 3600,
                                 "facility": joules / 3600 * 1.2}},
            "grid": {"location": {"source": "codecarbon", "signal": "average", "zone": "FRA", "g_per_kwh": 56.0,
                                  "at": None, "fallback_for": None, "estimated": None}, "market": None}}


def test_concurrent_writes_all_land_and_survive_restart(tmp_path):
    path = tmp_path / "l.db"
    ledger = Ledger(SqliteStore(path))

    def writer(w: int) -> None:
        for i in range(200):
            assert ledger.submit(to_row(energy(f"w{w}-{i}", 1.0), "m", None, time.time()))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger.close()
    reopened = Ledger(SqliteStore(path))
    assert reopened.store.db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 1600
    assert reopened.get("w3-17")["joules"] == 1.0 and reopened.get("nope") is None
    assert reopened.store.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    reopened.close()


def test_old_ledger_is_migrated_and_keeps_its_records(tmp_path):

    path = tmp_path / "v2.db"
    old = sqlite3.connect(path)
    for statement in MIGRATIONS[:2]:
        old.execute(statement)
    old.execute("PRAGMA user_version=2")
    old.execute("INSERT INTO requests VALUES ('r1', 1.0, 'm', NULL, 'ok', 'nvml', 1, 1, 2, 100, 3.0, 0.001, 0.1,"
                " 0.2, '[0]', '{\"gpu\": 3.0}', 1.2, 'FRA', 56.0)")
    old.commit()
    old.close()
    old = sqlite3.connect(path)  # and one whose intensity was the site's own (market-based)
    old.execute("INSERT INTO requests VALUES ('r0', 1.0, 'm', NULL, 'ok', 'nvml', 1, 1, 2, 100, 3.0, 0.001, 0.05,"
                " 0.2, '[0]', '{\"gpu\": 3.0}', 1.2, 'override', 20.0)")
    old.commit()
    old.close()
    ledger = Ledger(SqliteStore(path))
    rec = ledger.get("r1")
    assert rec["joules"] == 3.0 and rec["gpu_joules"] == {} and rec["ts_start"] is None
    # The zone's average was location-based: carried over. An override's zone figure was never kept: unknown.
    assert (rec["gco2e_location"], rec["grid_location_g_per_kwh"], rec["grid_source"]) == (0.1, 56.0, "codecarbon")
    assert ledger.get("r0")["gco2e_location"] is None and ledger.get("r0")["gco2e"] == 0.05
    ledger.submit(to_row(energy("r2", 2.0), "m", None, 10.0, {0: 2.0}))
    ledger.close()
    reopened = Ledger(SqliteStore(path))
    rec2 = reopened.get("r2")
    reopened.close()
    assert rec2["gpu_joules"] == {"0": 2.0} and rec2["ts_start"] == pytest.approx(9.9)


def test_a_request_id_is_unique_within_a_team_only(tmp_path):
    """From version 5 on: two teams' records under one id both stay; one team's second replaces its first.
    A ledger of version 4 (one id, one record) keeps its rows."""

    path = tmp_path / "v4.db"
    old = sqlite3.connect(path)
    for statement in MIGRATIONS[:4]:
        old.execute(statement)
    old.execute("PRAGMA user_version=4")
    old.commit()
    old.close()
    ledger = Ledger(SqliteStore(path))
    ledger.submit(to_row(energy("same", 1.0), "m", "team-a", 10.0))
    ledger.submit(to_row(energy("same", 2.0), "m", "team-b", 11.0))
    ledger.submit(to_row(energy("same", 3.0), "m", None, 12.0))
    ledger.submit(to_row(energy("same", 4.0), "m", "team-b", 13.0))  # the same team's id again: replaced
    ledger.close()
    reopened = Ledger(SqliteStore(path))
    try:
        assert reopened.store.db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 3
        assert reopened.get("same", "team-a")["joules"] == 1.0
        assert reopened.get("same", "team-b")["joules"] == 4.0
        assert reopened.get("same")["joules"] == 3.0 and reopened.get("same", "team-c") is None
        assert reopened.get("same", any_team=True)["joules"] == 4.0  # the latest
    finally:
        reopened.close()


@contextlib.contextmanager
def held(path):
    """Another connection's write transaction on the ledger's file: its writer waits inside a commit
    until this ends, as behind a slow disk or another process's long write."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_full_queue_serves_on_and_counts_the_drop(tmp_path):
    drops = []
    ledger = Ledger(SqliteStore(tmp_path / "l.db"), queue_size=2, on_drop=lambda: drops.append(1))
    with held(tmp_path / "l.db"):
        results = [ledger.submit(to_row(energy(f"r{i}", 1.0), "m", None, time.time())) for i in range(20)]
    assert not all(results) and len(drops) == results.count(False) == ledger.dropped
    ledger.close()


def test_closing_under_a_stuck_writer_says_so_and_leaves_it_to_finish(tmp_path, caplog):
    """A writer that outlasts close's wait (a slow disk) is not pulled from under: the database stays
    open for it, and what it was committing lands."""
    ledger = Ledger(SqliteStore(tmp_path / "l.db"))
    release = threading.Event()
    ledger.submit(to_row(energy("slow", 1.0), "m", None, time.time()), after=lambda stored: release.wait())  # runs on the writer
    ledger.close(timeout=0.2)
    assert "ledger: still writing after 0.2 s" in caplog.text
    release.set()
    ledger._thread.join(5)
    reopened = Ledger(SqliteStore(tmp_path / "l.db"))
    try:
        assert reopened.get("slow")["joules"] == 1.0
    finally:
        reopened.close()


def test_a_row_the_database_refuses_costs_only_itself(tmp_path):
    """A bad row (here a model of None) must not drop its batch nor leave a transaction open for good."""
    drops = []
    ledger = Ledger(SqliteStore(tmp_path / "l.db"), on_drop=lambda: drops.append(1))
    done = []
    with held(tmp_path / "l.db"):  # the rows queue up behind the writer and are committed together
        for i in range(5):
            model = None if i == 2 else "m"
            ledger.submit(to_row(energy(f"r{i}", 1.0), model, None, time.time()), after=done.append)
    ledger.submit(to_row(energy("later", 1.0), "m", None, time.time()))
    ledger.close()
    reopened = Ledger(SqliteStore(tmp_path / "l.db"))
    ids = {r[0] for r in reopened.store.db.execute("SELECT request_id FROM requests")}
    reopened.close()
    assert ids == {"r0", "r1", "r3", "r4", "later"} and len(drops) == 1
    assert done == [True, True, False, True, True]  # the refused row is reported not stored


def test_report_arithmetic(tmp_path):
    path = tmp_path / "l.db"
    ledger = Ledger(SqliteStore(path))
    day = 86400 * 20000.0
    rows = [("a", "m1", "t1", 36.0, "nvml", day), ("b", "m1", "t2", 72.0, "estimate", day),
            ("c", "m2", "t1", 3.6, "nvml", day + 86400)]
    for rid, model, team, joules, method, ts in rows:
        ledger.submit(to_row(energy(rid, joules, method), model, team, ts))
    ledger.close()
    db = connect(path)
    by_model = {r["model"]: r for r in totals(db, "model")}
    m1 = by_model["m1"]
    assert m1["requests"] == 2 and m1["completion_tokens"] == 20 and m1["prompt_tokens"] == 10
    assert m1["joules"] == pytest.approx(108.0) and m1["wh"] == pytest.approx(0.03)
    assert m1["wh_per_1000_queries"] == pytest.approx(15.0) and m1["joules_per_token"] == pytest.approx(5.4)
    assert m1["measured_share"] == pytest.approx(1 / 3)
    assert m1["gco2e"] == pytest.approx(108 / 3.6e6 * 1.2 * 56.0)
    assert m1["gco2e_location"] == pytest.approx(m1["gco2e"])  # no site figure: location-based is the one used
    assert [r["team"] for r in totals(db, "team")] == ["t1", "t2"]
    assert [r["requests"] for r in totals(db, "model", team="t1")] == [1, 1]
    assert [r["requests"] for r in totals(db, "day")] == [2, 1]
    assert totals(db, "model", since_s=3600) == []  # all of them are from 1970s-era timestamps
    db.close()
    assert parse_duration("7d") == 604800 and parse_duration("90m") == 5400
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_report_totals_equal_the_records_the_api_returns(tmp_path, capsys):
    path = tmp_path / "ledger.db"
    with ServerThread(SimulatedUpstream(served_name=SERVED, default_max_tokens=8)) as up:
        settings = Settings(
            meter=MeterSettings(source="simulated", settle_lag_ms=200),
            ledger=LedgerSettings(path=path),
            models={"llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])},
        )
        from wattgate.proxy.app import create_app

        with ServerThread(create_app(settings)) as gw:
            ids = []
            for i in range(5):
                r = httpx.post(f"{gw.url}/v1/chat/completions", json={
                    "model": "llama", "messages": [{"role": "user", "content": "hi"}], "stream": i % 2 == 0})
                assert r.status_code == 200
                ids.append(r.headers["x-request-id"])
            records = []
            deadline = time.monotonic() + 10
            for rid in ids:
                while not (rec := httpx.get(f"{gw.url}/v1/energy/{rid}").json()).get("settled"):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                records.append(rec)
        # The gateway has stopped; a new one serves the same records from the ledger.
        with ServerThread(create_app(settings)) as gw2:
            again = httpx.get(f"{gw2.url}/v1/energy/{ids[0]}")
            assert again.status_code == 200 and again.json()["joules"] == records[0]["joules"]
    config = tmp_path / "registry.yaml"
    config.write_text(f"ledger: {{path: '{path}'}}\nmodels: {{llama: {{upstream: 'http://x/v1'}}}}\n")
    assert main(["report", "--config", str(config), "--by", "model", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == "llama" and row["requests"] == 5
    assert row["joules"] == pytest.approx(sum(r["joules"] for r in records), rel=1e-9)
    assert row["gco2e"] == pytest.approx(sum(r["gco2e"] for r in records), rel=1e-9)
    assert main(["report", "--config", str(config), "--format", "table"]) == 0
    assert "llama" in capsys.readouterr().out


def test_kill_9_under_load_loses_no_settled_record(tmp_path):
    """A record the API called settled is in the ledger even when the gateway is killed with SIGKILL."""
    import os
    import signal
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from wattgate.proxy.serving import free_port

    path = tmp_path / "ledger.db"
    with ServerThread(SimulatedUpstream(served_name=SERVED, default_max_tokens=20)) as up:
        port = free_port()
        config = tmp_path / "registry.yaml"
        config.write_text(
            f"meter: {{source: simulated, settle_lag_ms: 200}}\nledger: {{path: '{path}'}}\n"
            f"models: {{llama: {{served_name: '{SERVED}', upstream: '{up.url}/v1', gpus: [0]}}}}\n"
        )
        proc = subprocess.Popen([sys.executable, "-m", "wattgate.proxy.cli", "serve", "--config", str(config),
                                 "--port", str(port), "--log-level", "warning"])
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{url}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, "gateway did not start"
                    time.sleep(0.1)
            body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}

            def one(i: int) -> str | None:
                try:
                    r = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": i % 2 == 0}, timeout=10)
                    return r.headers.get("x-request-id")
                except httpx.HTTPError:
                    return None  # in flight when killed

            seen: dict[str, float] = {}
            with ThreadPoolExecutor(16) as pool:
                ids = list(pool.map(one, range(32)))
                later = [pool.submit(one, i) for i in range(32, 96)]  # keep the gateway busy
                for rid in ids:
                    rec = httpx.get(f"{url}/v1/energy/{rid}").json()
                    if rec.get("settled"):
                        seen[rid] = rec["joules"]
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                for f in later:
                    f.result()
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
    assert seen, "no record settled before the kill"
    ledger = Ledger(SqliteStore(path))
    for rid, joules in seen.items():
        stored = ledger.get(rid)
        assert stored is not None and stored["settled"] and stored["joules"] == joules
    ledger.close()


def test_export_and_retention(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WATTGATE_DATA_DIR", str(tmp_path))
    ledger = Ledger(SqliteStore(tmp_path / "ledger.db"))
    now = time.time()
    ledger.submit(to_row(energy("old", 1.0), "m", "t", now - 100 * 86400))
    ledger.submit(to_row(energy("new", 2.0), "m", "t", now))
    ledger.close()
    assert main(["report", "--format", "jsonl"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["request_id"] for r in lines] == ["old", "new"] and lines[1]["components"] == {"gpu": 2.0}
    assert main(["report", "--format", "export-csv", "--since", "1d"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("request_id,") and len(out) == 2 and out[1].startswith("new,")
    assert main(["report", "--keep", "90d", "--format", "json"]) == 0  # without --yes: only says how many
    out = capsys.readouterr()
    assert "1 records are older than 90d; nothing deleted" in out.err
    assert json.loads(out.out)[0]["requests"] == 2
    assert main(["report", "--keep", "90d", "--yes", "--format", "json"]) == 0
    out = capsys.readouterr()
    assert "pruned 1 records older than 90d" in out.err
    assert json.loads(out.out)[0]["requests"] == 1 and json.loads(out.out)[0]["methods"] == "nvml 1"


def test_large_ledger_is_summed_in_slices_to_the_same_totals(tmp_path, monkeypatch):
    from wattgate.proxy import totals as sums

    ledger = Ledger(SqliteStore(tmp_path / "l.db"))
    for i in range(300):
        ledger.submit(to_row(energy(f"r{i}", 1.0 + i % 7, "nvml" if i % 3 else "estimate"), f"m{i % 4}", None,
                             1_700_000_000.0 + i * 37.0))
    ledger.close()
    db = connect(tmp_path / "l.db")
    whole = totals(db, "model")
    monkeypatch.setattr(sums, "PROGRESS_ROWS", 10)
    sliced = totals(db, "model", progress=True)
    db.close()
    assert [r["model"] for r in sliced] == [r["model"] for r in whole]
    for a, b in zip(whole, sliced):
        for key in ("requests", "completion_tokens", "joules", "gco2e", "measured_share"):
            assert a[key] == pytest.approx(b[key])


def test_equivalents_state_their_sources():
    from wattgate.proxy.equivalents import equivalents

    lines = equivalents([{"wh": 30.0, "gco2e": 497.0, "water_ml": 1000.0}])
    assert lines[0].startswith("2 smartphone charges") and "15 Wh" in lines[0]
    assert lines[1].startswith("a 10 W LED bulb for 3 hours")
    assert lines[2].startswith("a 1000 W microwave for 1.8 minutes")  # 30 Wh / 1000 W = 108 s
    assert lines[3].startswith("a petrol car driven 2 km") and "EPA" in lines[3]
    assert lines[4].startswith("2 0.5 L bottles")


def test_small_equivalents_read_as_shares_and_short_spans():
    from wattgate.proxy.equivalents import equivalents

    lines = equivalents([{"wh": 0.03, "gco2e": 1.0, "water_ml": 5.0}])
    assert lines[0].startswith("0.2 % of a smartphone charge")
    assert lines[1].startswith("a 10 W LED bulb for 10.8 seconds")
    assert lines[2].startswith("a 1000 W microwave for 0.108 seconds")
    assert lines[3].startswith("a petrol car driven 4.02 m")
    assert lines[4].startswith("1 % of a 0.5 L bottle of water")


@pytest.mark.parametrize(("x", "text"), [
    (0, "0"), (1440.0, "1,440"), (999.6, "1,000"), (0.9996, "1"), (0.3344, "0.334"), (12.34, "12.3"),
    (0.000123456, "0.000123"), (2.0, "2"), (123456.7, "123,000"), (-0.0456, "-0.0456"),
])
def test_figures_read_to_three_significant_digits_without_exponents(x, text):
    from wattgate.proxy.equivalents import sig3

    assert sig3(x) == text


def test_get_energy_is_the_same_object_from_memory_and_from_the_ledger(tmp_path):
    """``GET /v1/energy/{id}``: a record still in the gateway's memory and one it reads back from the
    ledger (another gateway on the same file, as after a restart or 1,000 newer records) have the
    same keys and figures."""
    from tests.conftest import settled_records
    from wattgate.meter.sources.simulated import SimulatedGpu
    from wattgate.proxy.app import create_app

    with ServerThread(SimulatedUpstream(SimulatedGpu(), served_name=SERVED, default_max_tokens=8)) as up:
        settings = Settings(meter=MeterSettings(source="simulated", settle_lag_ms=200),
                            ledger=LedgerSettings(path=tmp_path / "ledger.db"),
                            models={"llama": Model(served_name=SERVED, upstream=f"{up.url}/v1", gpus=[0])})
        with ServerThread(create_app(settings)) as first:
            ids = [httpx.post(f"{first.url}/v1/chat/completions", json={
                "model": "llama", "messages": [{"role": "user", "content": "hi"}], "stream": stream}).headers[
                "x-request-id"] for stream in (False, True)]
            in_memory = settled_records(first.url, ids)
            assert set(in_memory) == set(ids)
            with ServerThread(create_app(settings)) as second:
                from_ledger = {rid: httpx.get(f"{second.url}/v1/energy/{rid}").json() for rid in ids}
    for rid in ids:
        assert list(from_ledger[rid]) == list(in_memory[rid])
        mem, led = in_memory[rid], from_ledger[rid]
        assert {k: v for k, v in led.items() if k != "sci"} == {k: v for k, v in mem.items() if k != "sci"}
        assert led["sci"]["tiers_wh"] == pytest.approx(mem["sci"]["tiers_wh"])
        assert {k: v for k, v in led["sci"].items() if k != "tiers_wh"} == pytest.approx(
            {k: v for k, v in mem["sci"].items() if k != "tiers_wh"})


def test_a_read_never_waits_for_the_writer(tmp_path):
    """While the writer is held inside a commit (here: another process's write transaction keeps the
    database, as a long batch does), ``get`` still answers: a hub's call that opens with a client's
    own id waits on that read, and the worker's other events behind it."""
    path = tmp_path / "ledger.db"
    ledger = Ledger(SqliteStore(path))
    ledger.submit(to_row(energy("before", 1.0), "m", None, time.time()))
    wait_for = time.monotonic() + 5
    while ledger.get("before") is None and time.monotonic() < wait_for:
        time.sleep(0.01)
    with held(path):
        ledger.submit(to_row(energy("during", 2.0), "m", None, time.time()))
        time.sleep(0.2)  # the writer is now waiting for the lock, inside its commit
        answered = threading.Event()
        reader = threading.Thread(target=lambda: (ledger.get("before"), answered.set()))
        reader.start()
        assert answered.wait(1.0), "a read waited for the writer's commit"
        assert ledger.get("during") is None  # not committed yet
    ledger.close()
    again = Ledger(SqliteStore(path))
    assert again.get("during")["joules"] == 2.0  # written once the lock was free
    again.close()


def test_a_ledger_of_the_previous_shape_gets_the_gateway_column_and_keeps_its_rows(tmp_path):
    """Issue 33's migration: rows written before records named their gateway report under '-'."""
    path = tmp_path / "before-fleet.db"
    previous = Ledger(SqliteStore(path))
    previous.submit(to_row(energy("old", 1.0), "m", None, time.time()))
    previous.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE requests DROP COLUMN gateway")
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) - 1}")
    db.commit()
    db.close()
    ledger = Ledger(SqliteStore(path))
    try:
        assert ledger.get("old")["gateway"] is None
        ledger.submit(to_row(energy("new", 2.0), "m", None, time.time(), gateway="gw-1"))
        wait_until(lambda: ledger.get("new") is not None, what="the new record stored")
        assert {r["gateway"]: r["requests"] for r in ledger.store.totals("gateway", None, None)} == {"-": 1, "gw-1": 1}
    finally:
        ledger.close()

"""The ledger's write path: records per second and CPU per record on SQLite and PostgreSQL, and a fleet's
gateways writing to one PostgreSQL at a steady rate.

Usage::

    python -m bench.ledger                      # a private PostgreSQL cluster (tests/postgres.py)
    python -m bench.ledger --url postgresql://user@host/db
    python -m bench.ledger --fleet 3 --rate 1000 --seconds 60
    python -m bench.ledger --records 0 --fleet 0 --report-rows 10000000

1. Throughput: ``--records`` settled records submitted at once to a :class:`~proxy.ledger.Ledger` (the
   gateway's writer thread, batches of up to 500 in one transaction) until all are committed: records
   per second, and this process's CPU per record (the database server's own is not in it).
2. Drivers: the same rows inserted straight by psycopg 3 (``executemany`` in a transaction, what the
   store does) and by asyncpg (``executemany``), batches of 500: what chose the driver.
3. Fleet: ``--fleet`` processes, each a gateway's ledger writer submitting ``--rate`` records a second
   for ``--seconds``; then the records dropped (must be 0), the rows in the database and the report's
   totals against the sum of what was sent. (Whole gateways at that rate would need more cores than
   the load; the writer is what the ledger's rate costs a gateway.)
4. Big reports: ``--report-rows`` records made in the database itself (``generate_series``: 4 models,
   8 teams, 6 gateways, a year of days), then ``wattgate report``'s totals by model, day and gateway
   and a ``--keep`` count timed, with this process's peak memory (the sums run in the server).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.postgres import cluster
from wattgate.proxy.ledger import Ledger
from wattgate.proxy.ledger_file import SqliteStore
from wattgate.proxy.ledger_postgres import UPSERT, PostgresStore
from wattgate.proxy.ledger_rows import to_row


def _energy(rid: str, joules: float) -> dict[str, Any]:
    """A settled energy object as the gateway writes one (figures made up, every key there)."""
    kwh = joules / 3.6e6
    return {"request_id": rid, "status": "ok", "method": "nvml", "settled": True, "prompt_tokens": 40,
            "completion_tokens": 120, "window_ms": 2400, "joules": joules, "wh": joules / 3600,
            "gco2e": kwh * 1.2 * 369, "water_ml": kwh * 4.22 * 1000, "gpus": [0], "components": {"gpu": joules},
            "pue": 1.2, "grid_zone": "USA", "grid_intensity_g_per_kwh": 369.0, "gco2e_location": kwh * 1.2 * 369,
            "embodied_gco2e": joules / 1000, "gpu_seconds": 2.4,
            "sci": {"e_kwh": kwh * 1.2, "i_g_per_kwh": 369.0, "m_g": joules / 1000, "sci_g": kwh * 1.2 * 369,
                    "tiers_wh": {}},
            "grid": {"location": {"source": "codecarbon", "signal": "average", "zone": "USA", "g_per_kwh": 369.0,
                                  "at": None, "fallback_for": None, "estimated": None}, "market": None}}


def _rows(n: int, prefix: str, gateway: str = "bench") -> list[tuple[Any, ...]]:
    now = time.time()
    return [to_row(_energy(f"{prefix}-{i}", 100.0 + i % 50), "llama", f"team-{i % 4}", now + i * 1e-3,
                   {0: 100.0}, 1.0, gateway) for i in range(n)]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _through_ledger(store: Any, rows: list[tuple[Any, ...]]) -> tuple[float, float]:
    """Records per second and us of this process's CPU per record, submitted at once, until committed."""
    ledger = Ledger(store, queue_size=len(rows) + 1)
    done = 0
    t0, cpu0 = time.perf_counter(), _cpu_s()

    def stored(ok: bool) -> None:
        nonlocal done
        done += ok

    for row in rows:
        ledger.submit(row, after=stored)
    while done < len(rows):
        time.sleep(0.005)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    ledger.close()
    return len(rows) / wall, cpu / len(rows) * 1e6


def _psycopg_raw(url: str, rows: list[tuple[Any, ...]]) -> tuple[float, float]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        t0, cpu0 = time.perf_counter(), _cpu_s()
        for i in range(0, len(rows), 500):
            with db.transaction(), db.cursor() as cur:
                cur.executemany(UPSERT, rows[i:i + 500])
        return len(rows) / (time.perf_counter() - t0), (_cpu_s() - cpu0) / len(rows) * 1e6


def _asyncpg_raw(url: str, rows: list[tuple[Any, ...]]) -> tuple[float, float] | None:
    try:
        import asyncpg
    except ImportError:
        return None
    n = UPSERT.count("%s")
    sql = UPSERT
    for i in range(1, n + 1):  # asyncpg's placeholders are $1, $2, ...
        sql = sql.replace("%s", f"${i}", 1)

    async def run() -> tuple[float, float]:
        db = await asyncpg.connect(url)
        try:
            t0, cpu0 = time.perf_counter(), _cpu_s()
            for i in range(0, len(rows), 500):
                async with db.transaction():
                    await db.executemany(sql, rows[i:i + 500])
            return len(rows) / (time.perf_counter() - t0), (_cpu_s() - cpu0) / len(rows) * 1e6
        finally:
            await db.close()

    return asyncio.run(run())


def _writer(url: str, name: str, rate: float, seconds: float, out: Any) -> None:
    """One gateway's ledger writer at a steady ``rate`` (a process of its own)."""
    ledger = Ledger(PostgresStore(url), queue_size=10_000)
    sent = 0
    start = time.monotonic()
    cpu0 = _cpu_s()
    joules = 0.0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate) - sent
        for row in _rows(due, f"{name}-{sent}", name):
            ledger.submit(row)
            joules += row[10]
        sent += due
        time.sleep(0.01)
    ledger.close()
    out.put((name, sent, ledger.dropped, ledger.stored, joules, (_cpu_s() - cpu0) / max(sent, 1) * 1e6))


def _big_report(url: str, n: int) -> None:
    import psycopg

    _fresh(url)
    PostgresStore(url).close()
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DROP INDEX requests_team_request_id")  # made again after the fill: faster than kept during it
        db.execute(
            """INSERT INTO requests (request_id, ts_end, model, team, status, method, settled, prompt_tokens,
                   completion_tokens, window_ms, joules, wh, gco2e, water_ml, gpus, components, pue, grid_zone,
                   grid_intensity_g_per_kwh, ts_start, gpu_joules, gco2e_location, grid_location_g_per_kwh,
                   embodied_gco2e, gpu_seconds, idle_joules, sci_e_kwh, sci_g, gateway)
               SELECT 'r' || i, %(t0)s + i * (31536000.0 / %(n)s), 'model-' || (i %% 4), 'team-' || (i %% 8), 'ok',
                   CASE WHEN i %% 10 = 0 THEN 'estimate' ELSE 'nvml' END, 1, 40, 120, 2400, 100 + i %% 50,
                   (100 + i %% 50) / 3600.0, 0.01, 0.1, '[0]', '{"gpu": 100}', 1.2, 'USA', 369, 1.7e9, '{}',
                   0.01, 369, 0.001, 2.4, 1, 0.00003, 0.011, 'gw-' || (i %% 6)
               FROM generate_series(1, %(n)s) AS i""", {"n": n, "t0": time.time() - 31536000})
        db.execute("CREATE UNIQUE INDEX requests_team_request_id ON requests ((COALESCE(team, '')), request_id)")
        db.execute("ANALYZE requests")
    print(f"report over {n} records (made in {time.perf_counter() - t0:.0f} s):")
    store = PostgresStore(url)
    for by in ("model", "day", "gateway"):
        t0 = time.perf_counter()
        rows = store.totals(by, None, None)
        print(f"  --by {by:8}{time.perf_counter() - t0:7.1f} s, {len(rows)} rows, "
              f"{sum(r['requests'] for r in rows)} records")
    t0 = time.perf_counter()
    old = store.prune(86400 * 180, delete=False)
    print(f"  --keep 180d (count){time.perf_counter() - t0:7.1f} s, {old} records older")
    store.close()
    print(f"  peak memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


@contextmanager
def _database(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    with cluster() as c:
        yield c.create_database("bench")


def _fresh(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DROP TABLE IF EXISTS requests")
        db.execute("DROP TABLE IF EXISTS wattgate_schema")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a PostgreSQL database to use (its tables are dropped); default: a private cluster")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--fleet", type=int, default=3, help="gateways writing at once (0: skip)")
    parser.add_argument("--rate", type=float, default=1000.0, help="records a second per gateway")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--report-rows", type=int, default=0, help="records for the big-report timing (0: skip)")
    args = parser.parse_args()
    with _database(args.url) as url:
        print(f"machine: {os.cpu_count()} cores")
        if args.records:
            _throughput(url, args.records)
        if args.fleet:
            _fleet(url, args.fleet, args.rate, args.seconds)
        if args.report_rows:
            _big_report(url, args.report_rows)


def _throughput(url: str, records: int) -> None:
    print(f"{records} records at once")
    with tempfile.TemporaryDirectory() as tmp:
        rps, cpu = _through_ledger(SqliteStore(Path(tmp) / "l.db"), _rows(records, "s"))
    print(f"  sqlite     through the ledger: {rps:9.0f} records/s {cpu:7.1f} us CPU/record")
    _fresh(url)
    rps, cpu = _through_ledger(PostgresStore(url), _rows(records, "p"))
    print(f"  postgresql through the ledger: {rps:9.0f} records/s {cpu:7.1f} us CPU/record (psycopg)")
    rps, cpu = _psycopg_raw(url, _rows(records, "q"))
    print(f"  postgresql psycopg, raw:       {rps:9.0f} records/s {cpu:7.1f} us CPU/record")
    raw = _asyncpg_raw(url, _rows(records, "a"))
    print("  postgresql asyncpg, raw:       " + (f"{raw[0]:9.0f} records/s {raw[1]:7.1f} us CPU/record"
                                                if raw else "asyncpg not installed"))


def _fleet(url: str, fleet: int, rate: float, seconds: float) -> None:
    _fresh(url)
    PostgresStore(url).close()  # the schema, once
    ctx = multiprocessing.get_context("spawn")
    out: Any = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, f"gw-{i}", rate, seconds, out)) for i in range(fleet)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    store = PostgresStore(url)
    report = {r["gateway"]: r for r in store.totals("gateway", None, None)}
    store.close()
    print(f"fleet: {fleet} gateways x {rate:.0f} records/s for {seconds:.0f} s")
    for name, sent, dropped, stored, joules, cpu in sorted(results):
        r = report.get(name, {"requests": 0, "joules": 0.0})
        print(f"  {name}: sent {sent}, stored {stored}, dropped {dropped}, report {r['requests']} records "
              f"{r['joules']:.1f} J (sent {joules:.1f} J), process CPU {cpu:.1f} us/record (making the rows too)")
    ok = all(d == 0 and r == s for (_, s, d, r, _, _) in results) and \
        sum(r["requests"] for r in report.values()) == sum(s for _, s, *_ in results)
    print("  all stored, report totals equal to the records sent" if ok else "  MISMATCH")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()

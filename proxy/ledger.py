"""The durable per-request ledger: one SQLite row per settled request.

One writer thread drains a bounded queue (settling never waits on the disk);
WAL mode lets ``wattgate report`` and ``GET /v1/energy/{id}`` read while it
writes. The schema is versioned with ``PRAGMA user_version`` and migrated at
open. Prompts and keys are never stored; the team is the key's alias.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from wattgate.meter.footprint import GridIntensity
from wattgate.proxy.figures import grid_object, tiers_wh

log = logging.getLogger(__name__)

COLUMNS = (
    "request_id", "ts_end", "model", "team", "status", "method", "settled", "prompt_tokens",
    "completion_tokens", "window_ms", "joules", "wh", "gco2e", "water_ml", "gpus", "components",
    "pue", "grid_zone", "grid_intensity_g_per_kwh", "ts_start", "gpu_joules",
    # Location-based carbon (SCI) and the grid figure behind it: a live provider's, or the zone's average.
    "gco2e_location", "grid_location_g_per_kwh", "grid_source", "grid_signal", "grid_at", "grid_fallback_for",
    # The hardware's manufacturing share, by the GPU time the request had (SCI's M).
    "embodied_gco2e", "gpu_seconds",
    # The SCI (R = one request): its widest tier's facility energy E (kWh) and E x I + M (g); the idle share in it.
    "idle_joules", "sci_e_kwh", "sci_g",
    "grid_estimated",  # the provider's isEstimated (NULL: not said)
    "grid_location_zone",  # the location-based figure's zone (grid_zone says "override" when a site figure was used)
)
_BEFORE_GRID = COLUMNS[:21]  # the columns when the table was rebuilt per team (a migration copies just those)
MIGRATIONS = (
    """CREATE TABLE requests (
        request_id TEXT PRIMARY KEY, ts_end REAL NOT NULL, model TEXT NOT NULL, team TEXT,
        status TEXT NOT NULL, method TEXT NOT NULL, settled INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, window_ms INTEGER NOT NULL,
        joules REAL NOT NULL, wh REAL NOT NULL, gco2e REAL NOT NULL, water_ml REAL NOT NULL,
        gpus TEXT NOT NULL, components TEXT NOT NULL,
        pue REAL NOT NULL, grid_zone TEXT NOT NULL, grid_intensity_g_per_kwh REAL NOT NULL)""",
    "CREATE INDEX requests_ts_end ON requests (ts_end)",
    "ALTER TABLE requests ADD COLUMN ts_start REAL",
    "ALTER TABLE requests ADD COLUMN gpu_joules TEXT NOT NULL DEFAULT '{}'",  # {"gpu index": joules}
    # A request id is unique within a team, not across teams (two teams may send the same id): the
    # table is rebuilt without its primary key, one statement per version so a crash resumes it.
    """CREATE TABLE requests_by_team (
        request_id TEXT NOT NULL, ts_end REAL NOT NULL, model TEXT NOT NULL, team TEXT,
        status TEXT NOT NULL, method TEXT NOT NULL, settled INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, window_ms INTEGER NOT NULL,
        joules REAL NOT NULL, wh REAL NOT NULL, gco2e REAL NOT NULL, water_ml REAL NOT NULL,
        gpus TEXT NOT NULL, components TEXT NOT NULL,
        pue REAL NOT NULL, grid_zone TEXT NOT NULL, grid_intensity_g_per_kwh REAL NOT NULL,
        ts_start REAL, gpu_joules TEXT NOT NULL DEFAULT '{}')""",
    f"INSERT INTO requests_by_team ({','.join(_BEFORE_GRID)}) SELECT {','.join(_BEFORE_GRID)} FROM requests",
    "DROP TABLE requests",
    "ALTER TABLE requests_by_team RENAME TO requests",
    "CREATE INDEX requests_ts_end ON requests (ts_end)",
    "CREATE UNIQUE INDEX requests_team_request_id ON requests (ifnull(team, ''), request_id)",
    "ALTER TABLE requests ADD COLUMN gco2e_location REAL",
    "ALTER TABLE requests ADD COLUMN grid_location_g_per_kwh REAL",
    "ALTER TABLE requests ADD COLUMN grid_source TEXT",
    "ALTER TABLE requests ADD COLUMN grid_signal TEXT",
    "ALTER TABLE requests ADD COLUMN grid_at REAL",
    "ALTER TABLE requests ADD COLUMN grid_fallback_for TEXT",
    # Older rows: where no override was set, the figure used was the zone's average (location-based).
    """UPDATE requests SET gco2e_location = gco2e, grid_location_g_per_kwh = grid_intensity_g_per_kwh,
        grid_source = 'codecarbon', grid_signal = 'average' WHERE grid_zone != 'override'""",
    "ALTER TABLE requests ADD COLUMN embodied_gco2e REAL",  # NULL in older rows: not computed then
    "ALTER TABLE requests ADD COLUMN gpu_seconds REAL",
    "ALTER TABLE requests ADD COLUMN idle_joules REAL",
    "ALTER TABLE requests ADD COLUMN sci_e_kwh REAL",
    "ALTER TABLE requests ADD COLUMN sci_g REAL",
    "ALTER TABLE requests ADD COLUMN grid_estimated INTEGER",
    "ALTER TABLE requests ADD COLUMN grid_location_zone TEXT",
)


_Item = tuple[tuple[Any, ...], Callable[[], object] | None]


def _run(callback: Callable[[], object] | None) -> None:
    if callback is not None:
        try:
            callback()
        except Exception:
            log.exception("ledger commit callback failed")


def data_dir() -> Path:
    """``$WATTGATE_DATA_DIR``, else the platform's user data directory."""
    if env := os.environ.get("WATTGATE_DATA_DIR"):
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "wattgate"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home())) / "wattgate"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "wattgate"


def default_path() -> Path:
    return data_dir() / "ledger.db"


def connect(path: Path) -> sqlite3.Connection:
    """Open (and create or migrate) the ledger at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for i, statement in enumerate(MIGRATIONS[version:], start=version):
        db.execute("BEGIN IMMEDIATE")
        db.execute(statement)
        db.execute(f"PRAGMA user_version={i + 1}")
        db.execute("COMMIT")
    return db


def to_row(
    energy: dict[str, Any],
    model: str,
    team: str | None,
    ts_end: float,
    gpu_joules: dict[int, float] | None = None,
) -> tuple[Any, ...]:
    """A ledger row from the body's ``energy`` object; times are Unix seconds."""
    return (
        energy["request_id"], ts_end, model, team, energy["status"], energy["method"], int(energy["settled"]),
        energy["prompt_tokens"], energy["completion_tokens"], energy["window_ms"], energy["joules"], energy["wh"],
        energy["gco2e"], energy["water_ml"], json.dumps(energy["gpus"]), json.dumps(energy["components"]),
        energy["pue"], energy["grid_zone"], energy["grid_intensity_g_per_kwh"],
        ts_end - energy["window_ms"] / 1000, json.dumps({str(g): j for g, j in (gpu_joules or {}).items()}),
        *_grid_values(energy), energy["embodied_gco2e"], energy["gpu_seconds"],
        round((energy["sci"]["tiers_wh"]["with_idle"] - energy["sci"]["tiers_wh"]["with_host"]) * 3600, 6),
        energy["sci"]["e_kwh"], energy["sci"]["sci_g"],
        None if energy["grid"]["location"]["estimated"] is None else int(energy["grid"]["location"]["estimated"]),
        energy["grid"]["location"]["zone"],
    )


def _grid_values(energy: dict[str, Any]) -> tuple[Any, ...]:
    grid = energy["grid"]["location"]
    at = None if grid["at"] is None else datetime.fromisoformat(grid["at"]).timestamp()
    return energy["gco2e_location"], grid["g_per_kwh"], grid["source"], grid["signal"], at, grid["fallback_for"]


def from_row(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    """A record as ``GET /v1/energy/{id}`` returns it: the row's columns, with the ``grid`` and ``sci``
    objects of the body's ``energy`` rebuilt from them (rows written before they existed have none)."""
    rec = dict(zip(COLUMNS, row))
    rec["settled"] = bool(rec["settled"])
    rec["gpus"] = json.loads(rec["gpus"])
    rec["components"] = json.loads(rec["components"])
    rec["gpu_joules"] = json.loads(rec["gpu_joules"])
    if rec["grid_source"] is not None:
        market = rec["grid_zone"] == "override"
        # Rows written before the location's zone was kept: the zone column is it, unless it says "override".
        zone = rec["grid_location_zone"] or (None if market else rec["grid_zone"])
        estimated = None if rec["grid_estimated"] is None else bool(rec["grid_estimated"])
        location = GridIntensity(rec["grid_location_g_per_kwh"], rec["grid_source"], rec["grid_signal"], zone,
                                 rec["grid_at"], rec["grid_fallback_for"], estimated)
        rec["grid"] = {"location": grid_object(location), "market": grid_object(
            GridIntensity(rec["grid_intensity_g_per_kwh"], "override", "contractual", zone)) if market else None}
    if rec["sci_g"] is not None:
        tiers = tiers_wh(rec["components"].get("gpu", 0.0), rec["joules"], rec["idle_joules"], rec["pue"])
        rec["sci"] = {"e_kwh": rec["sci_e_kwh"], "i_g_per_kwh": rec["grid_location_g_per_kwh"],
                      "m_g": rec["embodied_gco2e"], "sci_g": rec["sci_g"], "tiers_wh": tiers}
    return rec


class Ledger:
    """Asynchronous writer of settled records; ``on_drop`` is called when the queue is full."""

    def __init__(self, path: Path, queue_size: int = 10_000, on_drop: Callable[[], object] | None = None) -> None:
        self.path = path
        self.db = connect(path)
        self._read_lock = threading.Lock()
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self.on_drop = on_drop
        self.dropped = 0
        self._thread = threading.Thread(target=self._write_loop, name="wattgate-ledger", daemon=True)
        self._thread.start()

    def submit(self, row: tuple[Any, ...], after: Callable[[], object] | None = None) -> bool:
        """Queue a row; ``after`` runs once it is committed (or could not be).

        False (and counted) when the queue is full; ``after`` then runs at once.
        """
        try:
            self._queue.put_nowait((row, after))
            return True
        except queue.Full:
            self._dropped(1)
            log.error("ledger queue full: record %s not stored", row[0])
            _run(after)
            return False

    def _dropped(self, n: int) -> None:
        self.dropped += n
        if self.on_drop is not None:
            for _ in range(n):
                self.on_drop()

    def _write_loop(self) -> None:
        placeholders = ",".join("?" * len(COLUMNS))
        sql = f"INSERT OR REPLACE INTO requests ({','.join(COLUMNS)}) VALUES ({placeholders})"
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < 500:  # commit what is waiting together
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(sql, batch)
            if stop:
                return

    def _commit(self, sql: str, batch: list[_Item]) -> None:
        rows = [row for row, _ in batch]
        try:
            self._write(sql, rows)
        except sqlite3.Error:
            # One row the database refuses must not cost the others: write them one by one.
            log.exception("ledger write of %d records failed; writing them one by one", len(rows))
            for row in rows:
                try:
                    self._write(sql, [row])
                except sqlite3.Error as exc:
                    log.error("ledger: record %s not stored: %s", row[0], exc)
                    self._dropped(1)
        for _, after in batch:
            _run(after)

    def _write(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows`` in one transaction; on failure nothing is written and no transaction stays open."""
        with self._read_lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany(sql, rows)
                self.db.execute("COMMIT")
            except sqlite3.Error:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    def get(self, request_id: str, team: str | None = None, *, any_team: bool = False) -> dict[str, Any] | None:
        """The record of ``request_id`` sent by ``team`` (None: without a key), or by any team (the latest)."""
        where, args = ("", ()) if any_team else ("AND ifnull(team, '') = ?", (team or "",))
        with self._read_lock:
            row = self.db.execute(
                f"SELECT {','.join(COLUMNS)} FROM requests WHERE request_id = ? {where} ORDER BY ts_end DESC LIMIT 1",
                (request_id, *args),
            ).fetchone()
        return from_row(row) if row else None

    def reader(self) -> sqlite3.Connection:
        """A read-only connection of its own, for long reads that must not hold up the writer (WAL)."""
        return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30, check_same_thread=False)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then close."""
        self._queue.put(None)
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():  # closing the database under the writer would fail its commit
            log.error("ledger: still writing after %g s, %d records queued; those not committed at exit are lost",
                      timeout, self._queue.qsize())
            return
        self.db.close()

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
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from wattgate.meter.footprint import GridIntensity
from wattgate.proxy.figures import Energy, GridObject, energy_from_record, grid_object, tiers_wh
from wattgate.proxy.settings import ConfigError, LedgerSettings

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


#: A queued row and what runs once it is committed (True) or given up (False).
_Item = tuple[tuple[Any, ...], Callable[[bool], object] | None]
RETRY_S = (1.0, 30.0)  # first and longest wait before writing again after a write failed
SUMMARY_S = 60.0  # while writes fail, how often the log says how it stands


def _run(callback: Callable[[bool], object] | None, stored: bool) -> None:
    if callback is not None:
        try:
            callback(stored)
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


def ledger_path(settings: LedgerSettings) -> Path:
    """The registry's ``ledger.path``, else :func:`default_path`."""
    return settings.path or default_path()


def connect(path: Path) -> sqlite3.Connection:
    """Open (and create or migrate) the ledger at ``path``; :class:`LedgerUnavailable` naming it and why
    when it cannot be."""
    try:
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
    except (OSError, sqlite3.Error) as exc:
        if isinstance(exc, FileExistsError):  # mkdir met a file where the directory should be
            reason = f"{path.parent} is not a directory"
        else:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LedgerUnavailable(f"cannot open the ledger {path}: {reason} (set ledger.path to a writable "
                                "file, or $WATTGATE_DATA_DIR)") from None
    return db


class LedgerUnavailable(ConfigError):
    """The ledger's file cannot be opened or created: refused at start-up, naming it."""


def to_row(
    energy: Energy,
    model: str,
    team: str | None,
    ts_end: float,
    gpu_joules: dict[int, float] | None = None,
    idle_joules: float = 0.0,
) -> tuple[Any, ...]:
    """A ledger row from the body's ``energy`` object (a settled one: it has its grid and SCI); times are
    Unix seconds; ``idle_joules``: the GPUs' idle energy in its SCI's widest tier."""
    grids, sci = energy["grid"], energy["sci"]
    assert grids is not None and sci is not None, "a settled energy object has its grid and SCI"
    return (
        energy["request_id"], ts_end, model, team, energy["status"], energy["method"], int(energy["settled"]),
        energy["prompt_tokens"], energy["completion_tokens"], energy["window_ms"], energy["joules"], energy["wh"],
        energy["gco2e"], energy["water_ml"], json.dumps(energy["gpus"]), json.dumps(energy["components"]),
        energy["pue"], energy["grid_zone"], energy["grid_intensity_g_per_kwh"],
        ts_end - energy["window_ms"] / 1000, json.dumps({str(g): j for g, j in (gpu_joules or {}).items()}),
        *_grid_values(energy["gco2e_location"], grids["location"]), energy["embodied_gco2e"], energy["gpu_seconds"],
        round(idle_joules, 6), sci["e_kwh"], sci["sci_g"],
        None if grids["location"]["estimated"] is None else int(grids["location"]["estimated"]),
        grids["location"]["zone"],
    )


def _grid_values(gco2e_location: float | None, grid: GridObject) -> tuple[Any, ...]:
    at = None if grid["at"] is None else datetime.fromisoformat(grid["at"]).timestamp()
    return gco2e_location, grid["g_per_kwh"], grid["source"], grid["signal"], at, grid["fallback_for"]


def from_row(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    """A record: the row's columns, with the ``grid`` and ``sci`` objects of the body's ``energy``
    rebuilt from them (rows written before they existed have none); ``energy_from_record`` makes it
    the energy object ``GET /v1/energy/{id}`` returns."""
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
    """Asynchronous writer of settled records; ``on_drop`` is called for each record given up.

    A record is reported stored (its ``after`` gets True) only once committed. A write the database
    fails for want of room or access (a full disk, a read-only file) is not the records' fault: they
    wait and are written again, every 1 s at first and at most every 30 s, as many as the queue holds;
    beyond that the oldest are given up, counted, and their ``after`` gets False. A row the database
    refuses for itself (a constraint) is given up at once. The log says when writing fails and when it
    works again, and while it fails, how it stands every minute: not a line per record.
    """

    def __init__(self, path: Path, queue_size: int = 10_000, on_drop: Callable[[], object] | None = None) -> None:
        self.path = path
        self.db = connect(path)  # the writer thread's (and close's, once it has stopped)
        # Reads have a connection of their own: WAL lets them run while the writer holds the database
        # across a commit of up to 500 rows (a hub's call opening with a client's id waits on a read).
        self._reads = self.reader()
        self._reads_lock = threading.Lock()  # one read at a time on it
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._waiting: deque[_Item] = deque()  # rows whose write failed, to be written again (writer thread only)
        self._max_waiting = queue_size
        self.on_drop = on_drop
        self.dropped = 0
        self.stored = 0
        self.last_error: str | None = None  # None: the last write worked
        self._retry_wait = RETRY_S[0]
        self._retry_at = 0.0
        self._summary_at = 0.0
        self._queue_full_said = False
        self._thread = threading.Thread(target=self._write_loop, name="wattgate-ledger", daemon=True)
        self._thread.start()

    def submit(self, row: tuple[Any, ...], after: Callable[[bool], object] | None = None) -> bool:
        """Queue a row; ``after(stored)`` runs once it is committed (True) or given up (False).

        False (and counted) when the queue is full; ``after(False)`` then runs at once.
        """
        try:
            self._queue.put_nowait((row, after))
            return True
        except queue.Full:
            if not self._queue_full_said:  # once, until a write works again
                self._queue_full_said = True
                log.error("ledger: queue full (%d records): records are not stored until it drains; "
                          "wattgate_ledger_dropped_records_total counts them", self._queue.maxsize)
            self._give_up([(row, after)])
            return False

    def state(self) -> dict[str, Any]:
        """For ``/readyz``: whether writes work, the last error, and the records queued, waiting and given up."""
        return {"state": "ok" if self.last_error is None else "failing", "path": str(self.path),
                "last_error": self.last_error, "queued": self._queue.qsize(), "waiting": len(self._waiting),
                "stored": self.stored, "dropped": self.dropped}

    def _give_up(self, items: list[_Item]) -> None:
        self.dropped += len(items)
        for _, after in items:
            if self.on_drop is not None:
                self.on_drop()
            _run(after, False)

    def _write_loop(self) -> None:
        placeholders = ",".join("?" * len(COLUMNS))
        sql = f"INSERT OR REPLACE INTO requests ({','.join(COLUMNS)}) VALUES ({placeholders})"
        stop = False
        while not stop:
            wait = max(self._retry_at - time.monotonic(), 0.0) if self._waiting else None
            batch, stop = self._take(wait)
            if self._waiting and (stop or time.monotonic() >= self._retry_at):
                batch = [*self._waiting, *batch]  # the oldest first
                self._waiting.clear()
            elif self._waiting:  # writes are failing and it is not yet time to try again: these wait too
                self._wait(batch)
                continue
            if batch:
                self._commit(sql, batch)
        if self._waiting:
            log.error("ledger: %d records could not be stored in %s before the gateway stopped (%s)",
                      len(self._waiting), self.path, self.last_error)
            self._give_up(list(self._waiting))

    def _take(self, wait: float | None) -> tuple[list[_Item], bool]:
        """What is queued, up to 500 rows (waiting up to ``wait`` s for the first; None: as long as it
        takes); and whether the ledger is closing."""
        batch: list[_Item] = []
        try:
            item = self._queue.get(timeout=wait) if wait is None or wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return batch, False
        while item is not None:
            batch.append(item)
            if len(batch) >= 500:
                return batch, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _commit(self, sql: str, batch: list[_Item]) -> None:
        try:
            self._write(sql, [row for row, _ in batch])
        except sqlite3.OperationalError as exc:  # no room, no access, locked: the rows wait for the next try
            self._failed(exc, batch)
            return
        except sqlite3.Error:
            self._one_by_one(sql, batch)  # one row the database refuses must not cost the others
            return
        self._committed(batch)

    def _one_by_one(self, sql: str, batch: list[_Item]) -> None:
        for i, item in enumerate(batch):
            try:
                self._write(sql, [item[0]])
            except sqlite3.OperationalError as exc:
                self._failed(exc, batch[i:])
                return
            except sqlite3.Error as exc:
                log.error("ledger: record %s refused by the database, not stored: %s", item[0][0], exc)
                self._give_up([item])
            else:
                self._committed([item])

    def _committed(self, batch: list[_Item]) -> None:
        self.stored += len(batch)
        if self.last_error is not None:
            log.warning("ledger: writing to %s again (%s before); the records kept meanwhile are stored",
                        self.path, self.last_error)
            self.last_error, self._retry_wait = None, RETRY_S[0]
        self._queue_full_said = False
        for _, after in batch:
            _run(after, True)

    def _failed(self, exc: sqlite3.Error, batch: list[_Item]) -> None:
        now = time.monotonic()
        if self.last_error is None:
            log.error("ledger: cannot write to %s: %s; records wait and are written again once it works "
                      "(at most %d; /readyz shows the ledger's state)", self.path, exc, self._max_waiting)
            self._summary_at = now + SUMMARY_S
        elif now >= self._summary_at:
            log.error("ledger: still cannot write to %s: %s; %d records waiting, %d given up so far",
                      self.path, exc, len(self._waiting) + len(batch), self.dropped)
            self._summary_at = now + SUMMARY_S
        self.last_error = str(exc)
        self._retry_at = now + self._retry_wait
        self._retry_wait = min(self._retry_wait * 2, RETRY_S[1])
        self._wait(batch)

    def _wait(self, batch: list[_Item]) -> None:
        """Keep ``batch`` for the next try; beyond the bound, the oldest are given up."""
        self._waiting.extend(batch)
        if (over := len(self._waiting) - self._max_waiting) > 0:
            self._give_up([self._waiting.popleft() for _ in range(over)])

    def _write(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows`` in one transaction; on failure nothing is written and no transaction stays open."""
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
        with self._reads_lock:
            row = self._reads.execute(
                f"SELECT {','.join(COLUMNS)} FROM requests WHERE request_id = ? {where} ORDER BY ts_end DESC LIMIT 1",
                (request_id, *args),
            ).fetchone()
        return from_row(row) if row else None

    def energy(self, request_id: str, team: str | None = None, *, any_team: bool = False) -> Energy | None:
        """:meth:`get`'s record as the energy object (the same keys as a response's)."""
        record = self.get(request_id, team, any_team=any_team)
        return None if record is None else energy_from_record(record)

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
        with self._reads_lock:
            self._reads.close()

"""The ledger in a SQLite file, the default backend (:mod:`proxy.ledger_store`): where the file lives, its
schema (versioned with ``PRAGMA user_version`` and migrated at open) and :class:`SqliteStore`. WAL mode
lets ``wattgate report`` and ``GET /v1/energy/{id}`` read while the writer (:mod:`proxy.ledger`) commits."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wattgate.proxy.ledger_rows import COLUMNS, by_id, older_than, since
from wattgate.proxy.ledger_store import LedgerUnavailable, RowsRefused, StoreUnavailable
from wattgate.proxy.settings import LedgerSettings
from wattgate.proxy.totals import SQLITE, totals

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
    "ALTER TABLE requests ADD COLUMN gateway TEXT",
)


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


_INSERT = f"INSERT OR REPLACE INTO requests ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})"


class SqliteStore:
    """One gateway's ledger in a SQLite file (:class:`~proxy.ledger_store.Store`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where, self.kind = str(path), "path"
        self.db = connect(path)  # the writer thread's (and close's)
        # Reads have a connection of their own: WAL lets them run while the writer holds the database
        # across a commit of up to 500 rows (a hub's call opening with a client's id waits on a read).
        self._reads = self._reader()
        self._reads_lock = threading.Lock()  # one read at a time on it

    def write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(_INSERT, rows)
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            # No room, no access, locked: not the rows' fault. Anything else (a constraint) is theirs.
            raise (StoreUnavailable if isinstance(exc, sqlite3.OperationalError) else RowsRefused)(str(exc)) from exc

    def get(self, request_id: str, team: str | None, any_team: bool) -> tuple[Any, ...] | None:
        with self._reads_lock:
            return self._reads.execute(*by_id(SQLITE, request_id, team, any_team)).fetchone()  # type: ignore[no-any-return]

    def totals(self, by: str, since_s: float | None, team: str | None, progress: bool = False) -> list[dict[str, Any]]:
        db = self._reader()  # a long read of its own, not holding up the others
        try:
            return totals(db, by, since_s, progress, team)
        finally:
            db.close()

    def rows(self, since_s: float | None) -> list[tuple[Any, ...]]:
        db = self._reader()
        try:
            return db.execute(*since(SQLITE, since_s)).fetchall()
        finally:
            db.close()

    def prune(self, keep_s: float, delete: bool) -> int:
        cur = self.db.execute(*older_than(SQLITE, keep_s, delete))
        return cur.rowcount if delete else int(cur.fetchone()[0])

    def close(self) -> None:
        self.db.close()
        with self._reads_lock:
            self._reads.close()

    def _reader(self) -> sqlite3.Connection:
        """A read-only connection of its own (WAL: it never holds up the writer)."""
        return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30, check_same_thread=False)

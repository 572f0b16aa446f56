"""The ledger in a PostgreSQL database that a fleet of gateways shares (:mod:`proxy.ledger_store`), with
psycopg 3 (why not asyncpg: ``bench/RESULTS.md``, "Ledger writes"). Its schema is versioned in the table
``wattgate_schema`` and migrated at open in one transaction under an advisory lock, so gateways
starting together migrate it once and a crash leaves it as it was.

The writer's connection is made again after any failure (the server restarted, the network broke):
the ledger's rows wait meanwhile and are written once it is back. Reads have connections of their own
and time out after a few seconds, so a database that is away costs a poll a 503, not a hang."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from wattgate.proxy.ledger_rows import COLUMNS, by_id, older_than, since
from wattgate.proxy.ledger_store import LedgerUnavailable, RowsRefused, StoreUnavailable
from wattgate.proxy.totals import POSTGRES, totals

CONNECT_TIMEOUT_S = 5  # a write's or a report's connection attempt
READ_TIMEOUT_MS = 4000  # statement_timeout of the reads a request waits on (GET /v1/energy/{id})
_LOCK_ID = 0x77617474  # pg_advisory_xact_lock key of migrations ("watt")

_KEY = "(COALESCE(team, '')), request_id"
MIGRATIONS = (
    """CREATE TABLE requests (
        request_id TEXT NOT NULL, ts_end DOUBLE PRECISION NOT NULL, model TEXT NOT NULL, team TEXT,
        status TEXT NOT NULL, method TEXT NOT NULL, settled INTEGER NOT NULL,
        prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, window_ms BIGINT NOT NULL,
        joules DOUBLE PRECISION NOT NULL, wh DOUBLE PRECISION NOT NULL, gco2e DOUBLE PRECISION NOT NULL,
        water_ml DOUBLE PRECISION NOT NULL, gpus TEXT NOT NULL, components TEXT NOT NULL,
        pue DOUBLE PRECISION NOT NULL, grid_zone TEXT NOT NULL, grid_intensity_g_per_kwh DOUBLE PRECISION NOT NULL,
        ts_start DOUBLE PRECISION, gpu_joules TEXT NOT NULL DEFAULT '{}',
        gco2e_location DOUBLE PRECISION, grid_location_g_per_kwh DOUBLE PRECISION, grid_source TEXT,
        grid_signal TEXT, grid_at DOUBLE PRECISION, grid_fallback_for TEXT, embodied_gco2e DOUBLE PRECISION,
        gpu_seconds DOUBLE PRECISION, idle_joules DOUBLE PRECISION, sci_e_kwh DOUBLE PRECISION,
        sci_g DOUBLE PRECISION, grid_estimated INTEGER, grid_location_zone TEXT, gateway TEXT)""",
    # A request id is unique within a team (the key the upsert replaces on); reports slice by time and
    # filter by team; a fleet's --by gateway and model reports group on those.
    f"CREATE UNIQUE INDEX requests_team_request_id ON requests ({_KEY})",
    "CREATE INDEX requests_ts_end ON requests (ts_end)",
    "CREATE INDEX requests_team_ts_end ON requests (team, ts_end)",
    "CREATE INDEX requests_model_ts_end ON requests (model, ts_end)",
    "CREATE INDEX requests_gateway_ts_end ON requests (gateway, ts_end)",
)
UPSERT = (f"INSERT INTO requests ({','.join(COLUMNS)}) VALUES ({','.join(['%s'] * len(COLUMNS))}) "
           f"ON CONFLICT ({_KEY}) DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS))
# What the server says when it is away or full (class 08 connection, 53 resources, 57 operator
# intervention such as a restart, 40 a serialisation failure): the rows wait. Others are the rows' own.
_TRANSIENT = ("08", "53", "57", "40", "55")


def without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


class PostgresStore:
    """A fleet's ledger in PostgreSQL (:class:`~proxy.ledger_store.Store`)."""

    kind = "url"

    def __init__(self, url: str, password_env: str | None = None) -> None:
        self.url = url
        self.where = without_password(url)
        self._password = os.environ.get(password_env) if password_env else None
        self._writer: psycopg.Connection[Any] | None = None
        self._reads: psycopg.Connection[Any] | None = None
        self._reads_lock = threading.Lock()
        try:
            with self._connect() as db:
                _migrate(db)
        except psycopg.Error as exc:
            raise LedgerUnavailable(f"cannot open the ledger {self.where}: {_reason(exc)} (check ledger.url "
                                    "and the password its ledger.password_env names)") from None

    def write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        try:
            if self._writer is None or self._writer.closed:
                self._writer = self._connect()
            with self._writer.transaction(), self._writer.cursor() as cur:
                cur.executemany(UPSERT, rows)
        except psycopg.Error as exc:
            if _transient(exc):
                self._drop_writer()
                raise StoreUnavailable(_reason(exc)) from exc
            raise RowsRefused(_reason(exc)) from exc

    def get(self, request_id: str, team: str | None, any_team: bool) -> tuple[Any, ...] | None:
        with self._reading() as db:
            return db.execute(*by_id(POSTGRES, request_id, team, any_team)).fetchone()

    def totals(self, by: str, since_s: float | None, team: str | None, progress: bool = False) -> list[dict[str, Any]]:
        with self._own_connection() as db:
            return totals(db, by, since_s, progress, team, dialect=POSTGRES)

    def rows(self, since_s: float | None) -> list[tuple[Any, ...]]:
        with self._own_connection() as db:
            return db.execute(*since(POSTGRES, since_s)).fetchall()

    def prune(self, keep_s: float, delete: bool) -> int:
        with self._own_connection() as db:
            cur = db.execute(*older_than(POSTGRES, keep_s, delete))
            return cur.rowcount if delete else int(cur.fetchone()[0])

    def close(self) -> None:
        self._drop_writer()
        with self._reads_lock:
            if self._reads is not None:
                self._reads.close()
                self._reads = None

    def _connect(self, **options: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, password=self._password, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name="wattgate", **options)

    def _drop_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    @contextmanager
    def _reading(self) -> Iterator[psycopg.Connection[Any]]:
        """The short reads' connection (made again after a failure), one read at a time."""
        with self._reads_lock:
            try:
                if self._reads is None or self._reads.closed:
                    self._reads = self._connect(options=f"-c statement_timeout={READ_TIMEOUT_MS}")
                yield self._reads
            except psycopg.Error as exc:
                if self._reads is not None:
                    self._reads.close()
                    self._reads = None
                raise StoreUnavailable(_reason(exc)) from exc

    @contextmanager
    def _own_connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection of its own for a report (which may take minutes over a fleet's records) or a prune."""
        try:
            with self._connect() as db:
                yield db
        except psycopg.Error as exc:
            raise StoreUnavailable(_reason(exc)) from exc


def _migrate(db: psycopg.Connection[Any]) -> None:
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        db.execute("CREATE TABLE IF NOT EXISTS wattgate_schema (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM wattgate_schema").fetchone()
        if row is None:
            db.execute("INSERT INTO wattgate_schema VALUES (0)")
        version = 0 if row is None else row[0]
        for i, statement in enumerate(MIGRATIONS[version:], start=version):
            db.execute(statement)
            db.execute("UPDATE wattgate_schema SET version = %s", (i + 1,))


def _transient(exc: psycopg.Error) -> bool:
    state = exc.sqlstate
    return state is None or state.startswith(_TRANSIENT)  # None: no answer at all (connection lost)


def _reason(exc: psycopg.Error) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

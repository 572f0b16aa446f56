"""Where the ledger's records are kept: the one interface of its two backends, a SQLite file
(:mod:`proxy.ledger_file`, the default, one gateway's) and a PostgreSQL database that a fleet of gateways
shares (:mod:`proxy.ledger_postgres`). The writer in front of either is :mod:`proxy.ledger`; the rows
are :mod:`proxy.ledger_rows`'s, the same in both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from wattgate.proxy.settings import ConfigError, LedgerSettings


class StoreUnavailable(Exception):
    """The database cannot take the rows now (no room, no access, not reachable): they wait and are
    written again; or it cannot answer a read now."""


class RowsRefused(Exception):
    """The database refuses the rows themselves (a constraint): written one by one, the refused given up."""


class LedgerUnavailable(ConfigError):
    """The ledger cannot be opened or created: refused at start-up, naming it and why."""


class Store(Protocol):
    """One backend. ``write`` runs on the ledger's writer thread only; the reads may run on any thread
    at once (each backend reads on connections of its own)."""

    where: str  # the file, or the database's URL without a password: for messages and /readyz
    kind: str  # what /readyz calls ``where``: "path" or "url"

    def write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``rows`` (a team's request id again replaces its record) in one transaction: all or
        none. Raises :class:`StoreUnavailable` or :class:`RowsRefused`."""
        ...

    def get(self, request_id: str, team: str | None, any_team: bool) -> tuple[Any, ...] | None:
        """The row of ``team``'s ``request_id`` (any team's, the latest, with ``any_team``)."""
        ...

    def totals(self, by: str, since_s: float | None, team: str | None, progress: bool = False) -> list[dict[str, Any]]:
        """:func:`proxy.totals.totals` over this store's records."""
        ...

    def rows(self, since_s: float | None) -> list[tuple[Any, ...]]:
        """Every row (those of the last ``since_s`` seconds), oldest first."""
        ...

    def prune(self, keep_s: float, delete: bool) -> int:
        """Delete (or, ``delete`` False, only count) the rows older than ``keep_s`` seconds."""
        ...

    def close(self) -> None: ...


def open_store(settings: LedgerSettings) -> Store:
    """The store the registry's ``ledger`` names, opened and migrated; :class:`LedgerUnavailable` if it
    cannot be."""
    if settings.url is not None:
        try:
            from wattgate.proxy.ledger_postgres import PostgresStore  # psycopg only where it is used
        except ImportError:
            raise LedgerUnavailable("ledger.url needs psycopg: pip install 'wattgate[postgres]'") from None
        return PostgresStore(settings.url, settings.password_env)
    from wattgate.proxy.ledger_file import SqliteStore, ledger_path

    return SqliteStore(ledger_path(settings))


def ledger_place(settings: LedgerSettings) -> str:
    """Where the registry's ledger is, for people: its file, or its database's URL (no password there)."""
    if settings.url is not None:
        return settings.url
    from wattgate.proxy.ledger_file import ledger_path

    return str(ledger_path(settings))


def store_for(target: str) -> Store:
    """``wattgate report --ledger``'s store: a ``postgresql://`` URL (its password as libpq finds it), or
    a file, which must exist."""
    if target.startswith(("postgresql://", "postgres://")):
        return open_store(LedgerSettings(url=target))
    from pathlib import Path

    from wattgate.proxy.ledger_file import SqliteStore

    path = Path(target)
    if not path.exists():
        raise FileNotFoundError(f"no ledger at {path}")
    return SqliteStore(path)

"""The ledger's file: where it lives, its schema (versioned with ``PRAGMA user_version`` and
migrated at open), and rows to and from the records it holds. The writer is :mod:`proxy.ledger`."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from wattgate.meter.footprint import GridIntensity
from wattgate.proxy.figures import Energy, GridObject, grid_object, tiers_wh
from wattgate.proxy.settings import ConfigError, LedgerSettings

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

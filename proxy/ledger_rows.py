"""A ledger row: its columns, one record's row from its energy object, the record read back from one, and
the queries that read and prune rows. The same for every backend (:mod:`proxy.ledger_store`), but for
its :class:`~proxy.totals.Dialect`."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from wattgate.meter.footprint import GridIntensity
from wattgate.proxy.figures import Energy, GridObject, grid_object, tiers_wh
from wattgate.proxy.totals import Dialect

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
    "gateway",  # the gateway that wrote it (gateway.id): many may share a ledger
)


def to_row(
    energy: Energy,
    model: str,
    team: str | None,
    ts_end: float,
    gpu_joules: dict[int, float] | None = None,
    idle_joules: float = 0.0,
    gateway: str | None = None,
) -> tuple[Any, ...]:
    """A ledger row from the body's ``energy`` object (a settled one: it has its grid and SCI); times are
    Unix seconds; ``idle_joules``: the GPUs' idle energy in its SCI's widest tier; ``gateway``: the
    gateway writing it."""
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
        grids["location"]["zone"], gateway,
    )


def _grid_values(gco2e_location: float | None, grid: GridObject) -> tuple[Any, ...]:
    at = None if grid["at"] is None else datetime.fromisoformat(grid["at"]).timestamp()
    return gco2e_location, grid["g_per_kwh"], grid["source"], grid["signal"], at, grid["fallback_for"]


def from_row(row: tuple[Any, ...]) -> dict[str, Any]:
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


_SELECT = f"SELECT {','.join(COLUMNS)} FROM requests"
Query = tuple[str, tuple[Any, ...]]


def by_id(d: Dialect, request_id: str, team: str | None, any_team: bool) -> Query:
    """The row of ``team``'s ``request_id`` (any team's, the latest, with ``any_team``)."""
    where, args = ("", ()) if any_team else (f"AND {d.team_key} = {d.param}", (team or "",))
    return f"{_SELECT} WHERE request_id = {d.param} {where} ORDER BY ts_end DESC LIMIT 1", (request_id, *args)


def since(d: Dialect, since_s: float | None) -> Query:
    """Every row (those of the last ``since_s`` seconds), oldest first."""
    if since_s is None:
        return f"{_SELECT} ORDER BY ts_end", ()
    return f"{_SELECT} WHERE ts_end >= {d.param} ORDER BY ts_end", (time.time() - since_s,)


def older_than(d: Dialect, keep_s: float, delete: bool) -> Query:
    """Delete (``delete``) or count the rows older than ``keep_s`` seconds."""
    what = "DELETE FROM requests" if delete else "SELECT COUNT(*) FROM requests"
    return f"{what} WHERE ts_end < {d.param}", (time.time() - keep_s,)

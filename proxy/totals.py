"""The ledger's totals by model, team, day, method or gateway: what ``wattgate report`` prints and
``GET /v1/energy`` returns, in SQL that SQLite and PostgreSQL both run but for a few expressions
(:class:`Dialect`)."""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from wattgate.meter import Method
from wattgate.meter.footprint import J_PER_WH


@dataclass(frozen=True)
class Dialect:
    """What differs between the backends' SQL."""

    param: str  # the driver's placeholder
    day: str  # the UTC day ts_end falls on, as YYYY-MM-DD
    gpu_joules: str  # a record's GPU energy, from its components JSON
    team_key: str  # the team as the unique index spells it (the planner uses the index only so)


SQLITE = Dialect("?", "date(ts_end, 'unixepoch')", "json_extract(components, '$.gpu')", "ifnull(team, '')")
POSTGRES = Dialect("%s", "to_char(to_timestamp(ts_end) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
                   "CAST(CAST(components AS jsonb)->>'gpu' AS DOUBLE PRECISION)", "COALESCE(team, '')")
GROUPS = ("model", "team", "day", "method", "gateway")


def _group(by: str, dialect: Dialect) -> str:
    return {"team": "COALESCE(team, '-')", "gateway": "COALESCE(gateway, '-')", "day": dialect.day}.get(by, by)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90d``, ``12h``, ``30m`` -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 7d, 12h, 30m)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


#: Ledgers larger than this are summed in time slices, with a progress bar on stderr.
PROGRESS_ROWS = 200_000
_SUMS = ("requests", "prompt_tokens", "completion_tokens", "joules", "wh", "gco2e", "water_ml", "measured_joules",
         "gco2e_location", "embodied_gco2e", "gpu_seconds", "sci_requests", "sci_joules", "sci_gpu_joules",
         "idle_joules", "sci_e_kwh", "sci_g", "sci_m_g")
METHODS = Method.published()  # how a figure was obtained; other sources count apart


def _total(expr: str) -> str:
    return f"COALESCE(SUM({expr}), 0)"


def _count(condition: str) -> str:
    return f"SUM(CASE WHEN {condition} THEN 1 ELSE 0 END)"


def _sums(db: Any, dialect: Dialect, by: str, where: str, args: list[Any]) -> dict[Any, list[float]]:
    """Per group: the sums of ``_SUMS``, then the number of records of each of ``METHODS`` and of others."""
    per_method = ", ".join(_count(f"method = '{m}'") for m in METHODS)
    others = _count("method NOT IN ({})".format(", ".join(f"'{m}'" for m in METHODS)))
    with_sci = "sci_g IS NOT NULL"
    rows = db.execute(
        f"""SELECT {_group(by, dialect)} AS k, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(joules),
                   SUM(wh), SUM(gco2e), SUM(water_ml), {_total(f"CASE WHEN method = '{Method.NVML}' THEN joules END")},
                   {_total("gco2e_location")}, {_total("embodied_gco2e")}, {_total("gpu_seconds")},
                   COUNT(sci_g), {_total(f"CASE WHEN {with_sci} THEN joules END")},
                   {_total(f"CASE WHEN {with_sci} THEN {dialect.gpu_joules} END")},
                   {_total("idle_joules")}, {_total("sci_e_kwh")}, {_total("sci_g")},
                   {_total(f"CASE WHEN {with_sci} THEN embodied_gco2e END")},
                   {per_method}, {others}
            FROM requests {where} GROUP BY k""",
        args,
    ).fetchall()
    return {k: [_number(x) for x in v] for k, *v in rows}


def _number(x: Any) -> Any:
    """PostgreSQL sums integers as NUMERIC (a Decimal): an int again, as SQLite gives it."""
    if isinstance(x, Decimal):
        return int(x) if x == x.to_integral_value() else float(x)
    return x


def _methods(counts: list[float]) -> str:
    """``nvml 120, simulated 3``: how many records of each method a row holds."""
    named = [f"{name} {n:.0f}" for name, n in zip((*METHODS, "other"), counts) if n]
    return ", ".join(named) or "-"


def totals(
    db: Any, by: str = "model", since_s: float | None = None, progress: bool = False, team: str | None = None,
    dialect: Dialect = SQLITE,
) -> list[dict[str, Any]]:
    """One row per group: sums of the settled records (``team``'s only, when given), Wh per 1000 queries,
    measured share of energy. ``db``: a DB-API connection with ``execute`` (sqlite3's, psycopg's)."""
    p = dialect.param
    where, args = "WHERE settled = 1", list[Any]()
    if since_s is not None:
        where += f" AND ts_end >= {p}"
        args.append(time.time() - since_s)
    if team is not None:
        where += f" AND team = {p}"
        args.append(team)
    n, lo, hi = db.execute(f"SELECT COUNT(*), MIN(ts_end), MAX(ts_end) FROM requests {where}", args).fetchone()
    if not progress or n < PROGRESS_ROWS:
        sums = _sums(db, dialect, by, where, args)
    else:
        from rich.console import Console
        from rich.progress import Progress

        sums = {}
        slices = 50
        edges = [lo + (hi - lo) * i / slices for i in range(slices)] + [hi + 1]
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"summing {n} records", total=slices)
            for a, b in itertools.pairwise(edges):
                for k, v in _sums(db, dialect, by, f"{where} AND ts_end >= {p} AND ts_end < {p}", [*args, a, b]).items():
                    sums[k] = [x + y for x, y in zip(sums.get(k, [0] * len(v)), v)]
                bar.advance(task)
    out = []
    for k in sorted(sums, key=str):
        r = dict(zip(_SUMS, sums[k]))
        n_req, j, ct = r["requests"], r["joules"], r["completion_tokens"]
        out.append({
            by: k, "requests": n_req, "methods": _methods(sums[k][len(_SUMS):]), "prompt_tokens": r["prompt_tokens"],
            "completion_tokens": ct, "joules": j, "wh": r["wh"], "gco2e": r["gco2e"],
            "gco2e_location": r["gco2e_location"], "embodied_gco2e": r["embodied_gco2e"],
            "gpu_seconds": r["gpu_seconds"], "water_ml": r["water_ml"],
            "wh_per_1000_queries": r["wh"] * 1000 / n_req, "joules_per_token": j / ct if ct else None,
            "measured_share": r["measured_joules"] / j if j else 0.0,
            "sci": _sci(r),
        })
    return out


def _sci(r: dict[str, float]) -> dict[str, Any] | None:
    """A group's SCI (SCI 1.1): E (kWh, the widest tier), I (E-weighted location-based gCO2e/kWh), M (g), per
    request and per 1,000, and its energy by boundary tier; over the records that carry one (written since
    this version), ``requests`` says how many."""
    n = r["sci_requests"]
    if not n:
        return None
    e, sci, m = r["sci_e_kwh"], r["sci_g"], r["sci_m_g"]
    return {
        "requests": n, "e_kwh": e, "i_g_per_kwh": (sci - m) / e if e else None, "m_g": m,
        "sci_g_per_request": sci / n, "sci_g_per_1000_requests": sci * 1000 / n,
        # Not figures.tiers_wh: a group's records may have different PUEs, so its facility tier is E's sum.
        "tiers_wh": {"accelerators": r["sci_gpu_joules"] / J_PER_WH, "with_host": r["sci_joules"] / J_PER_WH,
                     "with_idle": (r["sci_joules"] + r["idle_joules"]) / J_PER_WH, "facility": e * 1000},
    }

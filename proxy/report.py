"""``wattgate report``: totals from the ledger, per model, team or day."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import shutil
import sqlite3
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from wattgate.meter import Method
from wattgate.meter.footprint import J_PER_WH
from wattgate.proxy.ledger import connect

GROUPS = {"model": "model", "team": "COALESCE(team, '-')", "day": "date(ts_end, 'unixepoch')", "method": "method"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90d``, ``12h``, ``30m`` -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 7d, 12h, 30m)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


#: Everyday equivalents, shared with the chat page and the widget (``static/equivalents.json``).
EQUIVALENTS: list[dict[str, Any]] = json.loads(
    resources.files("wattgate.proxy").joinpath("static/equivalents.json").read_text("utf-8")
)["equivalents"]
#: Ledgers larger than this are summed in time slices, with a progress bar on stderr.
PROGRESS_ROWS = 200_000
_SUMS = ("requests", "prompt_tokens", "completion_tokens", "joules", "wh", "gco2e", "water_ml", "measured_joules",
         "gco2e_location", "embodied_gco2e", "gpu_seconds", "sci_requests", "sci_joules", "sci_gpu_joules",
         "idle_joules", "sci_e_kwh", "sci_g", "sci_m_g")
METHODS = Method.published()  # how a figure was obtained; other sources count apart


def _sums(db: sqlite3.Connection, by: str, where: str, args: list[Any]) -> dict[Any, list[float]]:
    """Per group: the sums of ``_SUMS``, then the number of records of each of ``METHODS`` and of others."""
    per_method = ", ".join(f"SUM(method = '{m}')" for m in METHODS)
    rows = db.execute(
        f"""SELECT {GROUPS[by]} AS k, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(joules),
                   SUM(wh), SUM(gco2e), SUM(water_ml), SUM(CASE WHEN method = '{Method.NVML}' THEN joules ELSE 0 END),
                   TOTAL(gco2e_location), TOTAL(embodied_gco2e), TOTAL(gpu_seconds),
                   COUNT(sci_g), TOTAL(CASE WHEN sci_g IS NOT NULL THEN joules END),
                   TOTAL(CASE WHEN sci_g IS NOT NULL THEN json_extract(components, '$.gpu') END),
                   TOTAL(idle_joules), TOTAL(sci_e_kwh), TOTAL(sci_g), TOTAL(CASE WHEN sci_g IS NOT NULL THEN embodied_gco2e END),
                   {per_method}, SUM(method NOT IN ({", ".join(f"'{m}'" for m in METHODS)}))
            FROM requests {where} GROUP BY k""",
        args,
    ).fetchall()
    return {k: list(v) for k, *v in rows}


def _methods(counts: list[float]) -> str:
    """``nvml 120, simulated 3``: how many records of each method a row holds."""
    named = [f"{name} {n:.0f}" for name, n in zip((*METHODS, "other"), counts) if n]
    return ", ".join(named) or "-"


def totals(
    db: sqlite3.Connection, by: str = "model", since_s: float | None = None, progress: bool = False,
    team: str | None = None,
) -> list[dict[str, Any]]:
    """One row per group: sums of the settled records (``team``'s only, when given), Wh per 1000 queries,
    measured share of energy."""
    where, args = "WHERE settled = 1", list[Any]()
    if since_s is not None:
        where += " AND ts_end >= ?"
        args.append(time.time() - since_s)
    if team is not None:
        where += " AND team = ?"
        args.append(team)
    n, lo, hi = db.execute(f"SELECT COUNT(*), MIN(ts_end), MAX(ts_end) FROM requests {where}", args).fetchone()
    if not progress or n < PROGRESS_ROWS:
        sums = _sums(db, by, where, args)
    else:
        from rich.console import Console
        from rich.progress import Progress

        sums = {}
        slices = 50
        edges = [lo + (hi - lo) * i / slices for i in range(slices)] + [hi + 1]
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"summing {n} records", total=slices)
            for a, b in itertools.pairwise(edges):
                for k, v in _sums(db, by, where + " AND ts_end >= ? AND ts_end < ?", [*args, a, b]).items():
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


def sig3(x: float) -> str:
    """``x`` to three significant figures, with thousands separators and no exponent: as the widget
    shows it (``Intl.NumberFormat`` with ``maximumSignificantDigits: 3`` in an English locale)."""
    if x == 0:
        return "0"
    places = 2 - math.floor(math.log10(abs(x)))  # negative for 1,000 and up: 123,456 -> 123,000
    decimals = max(0, places)
    text = f"{round(x, places):,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if decimals else text


def _duration(hours: float) -> str:
    for unit, per_hour in (("hours", 1.0), ("minutes", 60.0), ("seconds", 3600.0)):
        if hours * per_hour >= 1 or unit == "seconds":
            return f"{sig3(hours * per_hour)} {unit}"
    raise AssertionError("unreachable")


def equivalent(entry: dict[str, Any], totals: dict[str, float]) -> str:
    """One everyday equivalent of ``totals`` (``wh``, ``gco2e``, ``water_ml``), as the chat page words it."""
    value = totals[entry["figure"]]
    if entry["kind"] == "duration":
        return f"{entry['what']} for {_duration(value / entry['watts'])}"
    if entry["kind"] == "distance":
        km = value / entry["g_per_km"]
        return f"{entry['what']} driven {sig3(km)} km" if km >= 1 else f"{entry['what']} driven {sig3(km * 1000)} m"
    n = value / entry["per_unit"]
    return f"{sig3(n)} {entry['unit']}" if n >= 1 else f"{sig3(n * 100)} % of {entry['one']}"


def equivalents(rows: list[dict[str, Any]]) -> list[str]:
    """The totals of ``rows`` as everyday equivalents, each with its basis."""
    totals = {key: sum(r[key] for r in rows) for key in ("wh", "gco2e", "water_ml")}
    return [f"{equivalent(e, totals)}  ({e['basis']})" for e in EQUIVALENTS]


#: The table's short headers (the JSON and CSV keep the full names).
_HEADERS = {"completion_tokens": "tokens out", "wh": "Wh", "gco2e": "gCO2e", "gco2e_location": "gCO2e loc.",
            "embodied_gco2e": "gCO2e emb.", "water_ml": "water mL", "wh_per_1000_queries": "Wh/1k req",
            "joules_per_token": "J/token", "measured_share": "measured", "sci_g_per_1000_requests": "SCI g/1k req"}


_WIDE = ("requests", "methods", "completion_tokens", "wh", "gco2e", "gco2e_location", "embodied_gco2e",
         "water_ml", "wh_per_1000_queries", "joules_per_token", "measured_share", "sci_g_per_1000_requests")
_NARROW = ("requests", "wh", "gco2e", "water_ml", "joules_per_token", "measured_share")  # fits 80 columns
_WIDE_FROM = 150  # columns the wide table needs


def _flat(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A row for CSV: nested objects as dotted columns (``sci.tiers_wh.facility``), lists as JSON."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


def render(rows: list[dict[str, Any]], by: str, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        flat = [_flat(r) for r in rows]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in flat for k in r)) or [by])
        writer.writeheader()
        writer.writerows(flat)
        return buf.getvalue()
    from rich.console import Console
    from rich.table import Table

    # The terminal's width when there is one; piped, wide enough for every column.
    width = shutil.get_terminal_size((160, 24)).columns if sys.stdout.isatty() else 160
    table = Table(title=f"wattgate energy by {by}")
    cols = (by, *(_WIDE if width >= _WIDE_FROM else _NARROW))
    for c in cols:
        table.add_column(_HEADERS.get(c, c), justify="left" if c in (by, "methods") else "right")
    for r in rows:
        cells = {**r, "sci_g_per_1000_requests": r["sci"]["sci_g_per_1000_requests"] if r["sci"] else "-"}
        table.add_row(*(f"{cells[c]:.4g}" if isinstance(cells[c], float) else str(cells[c]) for c in cols))
    console = Console(file=io.StringIO(), width=width)
    console.print(table)
    if width < _WIDE_FROM:
        console.print(f"(more columns in a terminal {_WIDE_FROM} wide, and all in --format json or csv)", highlight=False)
    console.print("In everyday terms, all of the above together is about:")
    for line in equivalents(rows):
        console.print(f"  {line}", highlight=False)
    return console.file.getvalue()  # type: ignore[attr-defined]


def export(db: sqlite3.Connection, fmt: str, since_s: float | None = None) -> str:
    """Every record (oldest first) as CSV or JSON Lines, for ESG tooling."""
    from wattgate.proxy.ledger import COLUMNS, from_row

    where, args = "", []
    if since_s is not None:
        where, args = "WHERE ts_end >= ?", [time.time() - since_s]
    rows = [from_row(r) for r in db.execute(f"SELECT {','.join(COLUMNS)} FROM requests {where} ORDER BY ts_end", args)]
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    writer.writeheader()
    for r in rows:  # the columns (the rebuilt ``grid`` and ``sci`` objects are in them already)
        as_json = {k: json.dumps(r[k]) for k in ("gpus", "components", "gpu_joules")}
        writer.writerow({**{k: r[k] for k in COLUMNS}, **as_json})
    return buf.getvalue()


def prune(db: sqlite3.Connection, keep_s: float, delete: bool = True) -> int:
    """Delete (or with ``delete`` False, only count) records older than ``keep_s`` seconds; return how many."""
    if not delete:
        return db.execute("SELECT COUNT(*) FROM requests WHERE ts_end < ?", (time.time() - keep_s,)).fetchone()[0]
    cur = db.execute("DELETE FROM requests WHERE ts_end < ?", (time.time() - keep_s,))
    return cur.rowcount


def run_report(
    path: Path, by: str, since: str | None, fmt: str, keep: str | None = None, delete: bool = False
) -> str:
    """The ``wattgate report`` command's output; ``keep`` first deletes older records, with ``delete``
    (else says how many it would)."""
    if not path.exists():
        raise FileNotFoundError(f"no ledger at {path}")
    db = connect(path)
    try:
        if keep:  # on stderr: the output may be CSV or JSON
            n = prune(db, parse_duration(keep), delete)
            print(f"pruned {n} records older than {keep}" if delete else
                  f"{n} records are older than {keep}; nothing deleted: add --yes to delete them", file=sys.stderr)
        since_s = parse_duration(since) if since else None
        if fmt in ("jsonl", "export-csv"):
            return export(db, "jsonl" if fmt == "jsonl" else "csv", since_s)
        return render(totals(db, by, since_s, progress=True), by, fmt)
    finally:
        db.close()

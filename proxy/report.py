"""``wattgate report``: totals from the ledger, per model, team or day."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from proxy.ledger import connect

GROUPS = {"model": "model", "team": "COALESCE(team, '-')", "day": "date(ts_end, 'unixepoch')"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90d``, ``12h``, ``30m`` -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 7d, 12h, 30m)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def totals(db: sqlite3.Connection, by: str = "model", since_s: float | None = None) -> list[dict[str, Any]]:
    """One row per group: sums of the settled records, Wh per 1000 queries, measured share of energy."""
    where, args = "WHERE settled = 1", []
    if since_s is not None:
        where += " AND ts_end >= ?"
        args.append(time.time() - since_s)
    rows = db.execute(
        f"""SELECT {GROUPS[by]} AS k, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(joules),
                   SUM(wh), SUM(gco2e), SUM(water_ml), SUM(CASE WHEN method = 'nvml' THEN joules ELSE 0 END)
            FROM requests {where} GROUP BY k ORDER BY k""",
        args,
    ).fetchall()
    out = []
    for k, n, pt, ct, j, wh, g, w, measured in rows:
        out.append({
            by: k, "requests": n, "prompt_tokens": pt, "completion_tokens": ct, "joules": j, "wh": wh,
            "gco2e": g, "water_ml": w, "wh_per_1000_queries": wh * 1000 / n,
            "joules_per_token": j / ct if ct else None, "measured_share": measured / j if j else 0.0,
        })
    return out


def render(rows: list[dict[str, Any]], by: str, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [by])
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"wattgate energy by {by}")
    cols = (by, "requests", "completion_tokens", "wh", "gco2e", "water_ml", "wh_per_1000_queries",
            "joules_per_token", "measured_share")
    for c in cols:
        table.add_column(c, justify="left" if c == by else "right")
    for r in rows:
        table.add_row(*(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    console = Console(file=io.StringIO(), width=160)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def export(db: sqlite3.Connection, fmt: str, since_s: float | None = None) -> str:
    """Every record (oldest first) as CSV or JSON Lines, for ESG tooling."""
    from proxy.ledger import COLUMNS, from_row

    where, args = "", []
    if since_s is not None:
        where, args = "WHERE ts_end >= ?", [time.time() - since_s]
    rows = [from_row(r) for r in db.execute(f"SELECT {','.join(COLUMNS)} FROM requests {where} ORDER BY ts_end", args)]
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "gpus": json.dumps(r["gpus"]), "components": json.dumps(r["components"])})
    return buf.getvalue()


def prune(db: sqlite3.Connection, keep_s: float) -> int:
    """Delete records older than ``keep_s`` seconds; return how many."""
    cur = db.execute("DELETE FROM requests WHERE ts_end < ?", (time.time() - keep_s,))
    return cur.rowcount


def run_report(path: Path, by: str, since: str | None, fmt: str, keep: str | None = None) -> str:
    """The ``wattgate report`` command's output; ``keep`` first deletes older records."""
    if not path.exists():
        raise FileNotFoundError(f"no ledger at {path}")
    db = connect(path)
    try:
        note = ""
        if keep:
            note = f"pruned {prune(db, parse_duration(keep))} records older than {keep}\n"
        since_s = parse_duration(since) if since else None
        if fmt in ("jsonl", "export-csv"):
            return note + export(db, "jsonl" if fmt == "jsonl" else "csv", since_s)
        return note + render(totals(db, by, since_s), by, fmt)
    finally:
        db.close()

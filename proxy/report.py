"""``wattgate report``: totals from the ledger, per model, team, day, method or gateway."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from typing import Any

from wattgate.proxy.equivalents import equivalents
from wattgate.proxy.ledger_rows import COLUMNS, from_row
from wattgate.proxy.ledger_store import Store
from wattgate.proxy.totals import parse_duration

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


def export(store: Store, fmt: str, since_s: float | None = None) -> str:
    """Every record (oldest first) as CSV or JSON Lines, for ESG tooling."""
    rows = [from_row(r) for r in store.rows(since_s)]
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    writer.writeheader()
    for r in rows:  # the columns (the rebuilt ``grid`` and ``sci`` objects are in them already)
        as_json = {k: json.dumps(r[k]) for k in ("gpus", "components", "gpu_joules")}
        writer.writerow({**{k: r[k] for k in COLUMNS}, **as_json})
    return buf.getvalue()


def run_report(
    store: Store, by: str, since: str | None, fmt: str, keep: str | None = None, delete: bool = False
) -> str:
    """The ``wattgate report`` command's output from ``store`` (closed after); ``keep`` first deletes older
    records, with ``delete`` (else says how many it would)."""
    try:
        if keep:  # on stderr: the output may be CSV or JSON
            n = store.prune(parse_duration(keep), delete)
            print(f"pruned {n} records older than {keep}" if delete else
                  f"{n} records are older than {keep}; nothing deleted: add --yes to delete them", file=sys.stderr)
        since_s = parse_duration(since) if since else None
        if fmt in ("jsonl", "export-csv"):
            return export(store, "jsonl" if fmt == "jsonl" else "csv", since_s)
        return render(store.totals(by, since_s, None, progress=True), by, fmt)
    finally:
        store.close()

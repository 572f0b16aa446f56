"""Everyday equivalents of energy, carbon and water, worded one way for ``wattgate report``, the chat
page and the widget (the table: ``static/equivalents.json``)."""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

#: Everyday equivalents, shared with the chat page and the widget (``static/equivalents.json``).
EQUIVALENTS: list[dict[str, Any]] = json.loads(
    resources.files("wattgate.proxy").joinpath("static/equivalents.json").read_text("utf-8")
)["equivalents"]


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

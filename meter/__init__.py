"""wattgate's meter: GPU energy sampling and per-request attribution.

A library with no web dependencies; ``proxy`` builds on it, never the reverse.
"""

from wattgate.meter.attribution import Activity, Span, Split, spans, split_energy
from wattgate.meter.kinds import Fault, Method, Status
from wattgate.meter.meter import GpuTotals, Measurement, Meter, RequestWindow, token_count
from wattgate.meter.sources import MeterFault, PowerSource, Reading

__all__ = [
    "Activity",
    "Fault",
    "GpuTotals",
    "Measurement",
    "Meter",
    "MeterFault",
    "Method",
    "PowerSource",
    "Reading",
    "RequestWindow",
    "Span",
    "Split",
    "Status",
    "spans",
    "split_energy",
    "token_count",
]

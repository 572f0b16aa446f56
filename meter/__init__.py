"""wattgate's meter: GPU energy sampling and per-request attribution.

A library with no web dependencies; ``proxy`` builds on it, never the reverse. The split itself is
:mod:`meter.attribution`: ``split_energy`` (spans by request, what the property tests drive) over
``split_arrays`` (flat arrays, what the meter calls); neither is the package's API.
"""

from wattgate.meter.kinds import Fault, Method, Status
from wattgate.meter.meter import GpuTotals, Measurement, Meter, RequestWindow, token_count
from wattgate.meter.sources import MeterFault, PowerSource, Reading

__all__ = [
    "Fault",
    "GpuTotals",
    "Measurement",
    "Meter",
    "MeterFault",
    "Method",
    "PowerSource",
    "Reading",
    "RequestWindow",
    "Status",
    "token_count",
]

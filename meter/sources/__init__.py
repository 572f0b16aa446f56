"""Power sources: where the meter reads each GPU's energy and power.

A source is a small object with a ``read(gpu)`` method; the sampler owns the
clock and the buffer. NVML reads real GPUs, ``simulated`` models an H100 for the
demo, ``trace`` replays a scripted trace (the test seam).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from wattgate.meter.kinds import Fault, Method


class MeterFault(RuntimeError):
    """A reading could not be taken; ``kind`` is the label of ``wattgate_meter_errors_total``."""

    def __init__(self, kind: Fault, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Reading:
    """One GPU reading.

    ``energy_j``: the device's cumulative energy counter in joules (None when the
    GPU has no counter; the sampler then integrates ``power_w``).
    ``power_w``: instantaneous power in watts, if the source has it.
    """

    energy_j: float | None
    power_w: float | None


class PowerSource(Protocol):
    """What the sampler needs from a power source."""

    #: ``nvml`` (measured), ``simulated`` or ``trace``; becomes the figures' method.
    method: Method
    #: True when a counter reading is the energy up to the moment it was read (a simulated GPU);
    #: False when the counter steps now and then, as NVML's does (every ~100 ms on H100).
    continuous_counter: bool
    #: How late instantaneous power reports a change of load relative to the energy counter, in
    #: seconds (``bench/sensor_lag.py`` measures it): the sampler's default ``power_lag_s``.
    power_lag_s: float

    @property
    def unmeasurable(self) -> Mapping[int, str]:
        """GPUs the source sees but cannot meter per request, with the reason (a GPU in MIG
        mode: NVML has no power reading per instance). Their requests are estimated."""
        ...

    def read(self, gpu: int, energy: bool = True) -> Reading:
        """Read one GPU now (the energy counter only if ``energy``); raise :class:`MeterFault` when it cannot."""
        ...

    def close(self) -> None: ...

"""Host energy (CPU, DRAM, NIC) beside the GPUs', split among requests like the GPU's.

Two ways to know it: a fixed power per GPU (a datasheet or wall-meter figure
the operator sets), or Intel/AMD RAPL counters under /sys/class/powercap,
shared equally among the metered GPUs. The meter gives each request the share
of host energy that it gets of its GPU's energy over the same stretch of time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

POWERCAP = Path("/sys/class/powercap")


class HostPower(Protocol):
    def energy_j(self, a: float, b: float, gpus: int) -> float:
        """Host joules over ``[a, b)`` (monotonic s) that belong to one of ``gpus`` metered GPUs."""
        ...


class FixedHostPower:
    """A constant host power per GPU, in watts."""

    def __init__(self, watts_per_gpu: float) -> None:
        self.watts_per_gpu = watts_per_gpu

    def energy_j(self, a: float, b: float, gpus: int) -> float:
        return self.watts_per_gpu * max(b - a, 0.0)


class RaplHostPower:
    """Package and DRAM RAPL domains, as average power between reads; wrap-around handled."""

    def __init__(self, root: Path = POWERCAP, clock: Callable[[], float] = time.monotonic) -> None:
        self.zones = [
            z for z in sorted(root.glob("intel-rapl:*")) if (z / "energy_uj").exists() and z.name.count(":") == 1
        ]
        if not self.zones:
            raise FileNotFoundError(f"no readable RAPL zones under {root}")
        self.clock = clock
        self._last: dict[Path, int] = {}
        self._read_at = clock()
        self.power_w = 0.0
        self._joules_since_last_read()

    def _joules_since_last_read(self) -> float:
        total = 0.0
        for z in self.zones:
            now = int((z / "energy_uj").read_text())
            prev = self._last.get(z)
            if prev is not None:
                delta = now - prev
                if delta < 0:  # the counter wrapped
                    delta += int((z / "max_energy_range_uj").read_text())
                total += delta / 1e6
            self._last[z] = now
        return total

    def energy_j(self, a: float, b: float, gpus: int) -> float:
        now = self.clock()
        if now - self._read_at >= 0.2:
            self.power_w = self._joules_since_last_read() / (now - self._read_at)
            self._read_at = now
        return self.power_w * max(b - a, 0.0) / max(gpus, 1)

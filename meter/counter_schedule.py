"""When the sampler reads each GPU's energy counter.

At every poll by default, or every ``every_s`` when set. With ``cpu_budget``
instead (a fraction of one core), the schedule chooses that interval itself: the
first few counter reads are timed on the CPU clock, then the counter is read as
often as the budget allows for all GPUs (every poll when it is cheap, up to every
``MAX_COUNTER_EVERY_S``). On some hosts one counter read costs milliseconds of
CPU (NVML waits for the driver; power reads cost microseconds). That cost is a
property of the host and driver, so it is measured once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

CALIBRATION_READS = 5  # counter reads timed before the interval is chosen
MAX_COUNTER_EVERY_S = 10.0


class CounterSchedule:
    """The counter interval of ``n_gpus`` GPUs polled every ``interval_s``."""

    def __init__(self, n_gpus: int, interval_s: float, every_s: float | None, cpu_budget: float | None,
                 cpu_clock: Callable[[], float]) -> None:
        self.n_gpus = n_gpus
        self.interval_s = interval_s
        self.every_s = every_s  # None: every poll
        self.cpu_budget = cpu_budget
        self.cpu_clock = cpu_clock
        self._costs: list[float] = []  # CPU seconds of the timed reads, while calibrating

    @property
    def period_s(self) -> float:
        """Time between two counter reads of one GPU."""
        return self.every_s if self.every_s is not None else self.interval_s

    def due(self, last_read: float | None, now: float) -> bool:
        """Whether a GPU whose counter was last read at ``last_read`` has it read at ``now``."""
        return self.every_s is None or last_read is None or now - last_read >= self.every_s - self.interval_s / 2

    def timer(self, due: bool) -> float | None:
        """Before a read: the CPU clock where the read is to be timed (a counter read while calibrating)."""
        calibrating = due and self.cpu_budget is not None and len(self._costs) < CALIBRATION_READS
        return self.cpu_clock() if calibrating else None

    def elapsed(self, timer: float | None) -> float | None:
        """Right after the read: its CPU seconds, if it was timed."""
        return None if timer is None else self.cpu_clock() - timer

    def calibrate(self, cost_s: float) -> bool:
        """Count one timed counter read; True when this one ends the calibration with the counter to be
        read less often than every poll from now on."""
        self._costs.append(cost_s)
        if len(self._costs) < CALIBRATION_READS:
            return False
        assert self.cpu_budget is not None
        cost = sorted(self._costs)[len(self._costs) // 2]
        every = self.n_gpus * cost / self.cpu_budget
        self.every_s = None if every <= self.interval_s else min(every, MAX_COUNTER_EVERY_S)
        if every > MAX_COUNTER_EVERY_S:
            log.warning(
                "energy counter read costs %.1f ms of CPU: even every %.0f s, reads of %d GPU(s) take %.1f %% of a core",
                cost * 1e3, MAX_COUNTER_EVERY_S, self.n_gpus, 100 * self.n_gpus * cost / MAX_COUNTER_EVERY_S,
            )
        log.info(
            "energy counter read costs %.0f us of CPU: reading it %s for %d GPU(s)",
            cost * 1e6, "every poll" if self.every_s is None else f"every {self.every_s:.2f} s", self.n_gpus,
        )
        return self.every_s is not None

"""Replay a scripted per-GPU trace: the seam through which tests drive the meter."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence

from wattgate.meter.kinds import Fault, Method
from wattgate.meter.sources import MeterFault, Reading


class TraceSource:
    """Replays ``(time, energy_j, power_w)`` points per GPU as a step function.

    Like a real counter, a reading at time ``t`` shows the last point at or
    before ``t``, so a trace with points every 100 ms behaves like an H100's
    counter that only advances every 100 ms. ``energy_j`` may be None (a GPU
    without the counter) and may step backwards (a counter reset). Reads at or
    after ``fail_from`` raise a :class:`MeterFault`. ``unmeasurable`` marks GPUs
    the way NVML's MIG GPUs are marked.
    """

    method = Method.TRACE
    continuous_counter = False
    power_lag_s = 0.0  # a script's sensors report on time unless it says otherwise (the meter's power_lag_s)

    def __init__(
        self,
        traces: Mapping[int, Sequence[tuple[float, float | None, float | None]]],
        clock: Callable[[], float],
        fail_from: float | None = None,
        unmeasurable: Mapping[int, str] | None = None,
    ) -> None:
        self._traces = {gpu: sorted(points, key=lambda p: p[0]) for gpu, points in traces.items()}
        self._times = {gpu: [p[0] for p in points] for gpu, points in self._traces.items()}
        self._clock = clock
        self._fail_from = fail_from
        self.unmeasurable = dict(unmeasurable or {})

    def read(self, gpu: int, energy: bool = True) -> Reading:
        now = self._clock()
        if self._fail_from is not None and now >= self._fail_from:
            raise MeterFault(Fault.READ, f"scripted fault on GPU {gpu}")
        if gpu not in self._traces:
            raise MeterFault(Fault.LOST_GPU, f"GPU {gpu} is not in the trace")
        i = bisect.bisect_right(self._times[gpu], now) - 1
        if i < 0:
            raise MeterFault(Fault.READ, f"trace of GPU {gpu} starts after t={now}")
        _, energy_j, power = self._traces[gpu][i]
        return Reading(energy_j if energy else None, power)

    def close(self) -> None:
        pass

"""Background sampling of each GPU's energy counter and power into bounded buffers (see
:mod:`meter.energy_trace` for how the readings become a curve of energy)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from wattgate.meter.counter_schedule import CounterSchedule
from wattgate.meter.counter_steps import poll_delays
from wattgate.meter.energy_trace import EnergyTrace, interp
from wattgate.meter.kinds import Fault
from wattgate.meter.sources import MeterFault, PowerSource

log = logging.getLogger(__name__)

@dataclass(slots=True)
class _GpuReadings:
    trace: EnergyTrace
    last_poll: float | None = None
    power_w: float | None = None
    last_ok: float | None = None  # time of the last successful read
    last_counter_read: float | None = None


class Sampler:
    """Polls a :class:`PowerSource` every ``interval_s`` on a monotonic clock.

    Each GPU's readings go to its :class:`~meter.energy_trace.EnergyTrace`:
    counter readings stamped where the counter stepped (on H100 about every
    100 ms; read every poll, the polls' phase sweeps to learn when, see
    :mod:`meter.counter_steps`), instantaneous power placing the energy
    between two steps. With ``counter_every_s`` set, the counter is read only that
    often. (On some hosts one counter read costs milliseconds of CPU; power
    reads cost microseconds.) The sampler's user can ``mark`` the moments a
    GPU turns busy or idle, where power most likely stepped.
    ``power_lag_s`` says how late the power sensor reports a change of load,
    relative to the counter (``bench/sensor_lag.py`` measures it): its readings
    are placed that much earlier. None: the source's own (``PowerSource.power_lag_s``).

    With ``counter_cpu_budget`` set instead (a fraction of one core), the
    sampler chooses that interval itself from the first reads' cost on
    ``cpu_clock`` (see :mod:`meter.counter_schedule`).

    ``poll()`` takes one round of readings; ``start()`` runs it in a daemon
    thread (NVML calls release the GIL) and calls ``after_poll`` after each.
    """

    def __init__(
        self,
        source: PowerSource,
        gpus: Sequence[int],
        interval_s: float = 0.05,
        horizon_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        after_poll: Callable[[], None] | None = None,
        counter_every_s: float | None = None,
        counter_lag_s: float = 0.05,
        counter_cpu_budget: float | None = None,
        cpu_clock: Callable[[], float] = time.thread_time,
        power_lag_s: float | None = None,
    ) -> None:
        self.source = source
        self.gpus = tuple(gpus)
        self.interval_s = interval_s
        self.clock = clock
        self.after_poll = after_poll
        self.counters = CounterSchedule(len(self.gpus), interval_s, counter_every_s, counter_cpu_budget, cpu_clock)
        self.power_lag_s = source.power_lag_s if power_lag_s is None else power_lag_s
        self.continuous = getattr(source, "continuous_counter", False)
        maxlen = int(horizon_s / interval_s) + 16
        self._gpu = {g: _GpuReadings(EnergyTrace(maxlen, continuous=self.continuous, counter_lag_s=counter_lag_s,
                                              on_reset=lambda: self._fault(Fault.COUNTER_RESET)))
                     for g in self.gpus}
        self.on_error: Callable[[str], None] | None = None  # told each fault's kind (the meter counts them)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._delays = poll_delays(interval_s)

    def next_delay(self) -> float:
        """Time to the next poll: ``interval_s``; on average only while a stepping counter is read at
        every poll, whose polls' phase sweeps against its steps to learn when they fall (see
        :mod:`meter.counter_steps`)."""
        sweep = self.counters.every_s is None and not self.continuous and any(
            not st.trace.steps.fast for st in self._gpu.values())
        return next(self._delays) if sweep else self.interval_s

    def _fault(self, kind: str) -> None:
        if self.on_error is not None:
            self.on_error(kind)

    def poll(self) -> None:
        """Read every GPU once."""
        for gpu in self.gpus:
            st = self._gpu[gpu]
            now = self.clock()
            due = self.counters.due(st.last_counter_read, now)
            timer = self.counters.timer(due)
            try:
                reading = self.source.read(gpu, energy=due)
            except MeterFault as exc:
                self._fault(exc.kind)
                continue
            except Exception:  # a source bug must not kill the sampler
                log.exception("power source failed on GPU %d", gpu)
                self._fault(Fault.READ)
                continue
            cost = self.counters.elapsed(timer)
            st.last_poll = st.last_ok = now
            prev_power, st.power_w = st.power_w, reading.power_w
            # With power beside the counter, power places each counter step's energy in time,
            # read sparsely or not: an H100's counter steps only every ~100 ms.
            anchored = reading.power_w is not None and not self.continuous
            if anchored and reading.power_w is not None:  # (mypy: anchored says it)
                st.trace.power(now - self.power_lag_s, prev_power, reading.power_w)  # when it was drawn
            if reading.energy_j is not None:
                prev_read, st.last_counter_read = st.last_counter_read, now
                st.trace.counter(reading.energy_j, now, prev_read, (prev_power, reading.power_w), anchored=anchored,
                                 every_poll=self.counters.every_s is None)
                if cost is not None and self.counters.calibrate(cost):
                    for other in self._gpu.values():  # power from here on places the next counter step's energy
                        other.trace.reanchor(other.last_poll)
            elif not due and st.trace.last_raw is not None:
                pass  # between counter reads: power is in the trace's ``pending``
            elif reading.power_w is not None:
                st.trace.integrate(now, prev_power, reading.power_w)
            else:
                self._fault(Fault.READ)

    @property
    def counter_every_s(self) -> float | None:
        """How often each GPU's counter is read (None: every poll), once chosen."""
        return self.counters.every_s

    @property
    def counter_period_s(self) -> float:
        """Time between two counter reads of one GPU."""
        return self.counters.period_s

    def load(self, gpu: int, t: float, running: int) -> None:
        """Note that from ``t`` on ``running`` requests run on GPU ``gpu`` (its user knows: one began or ended).

        Between two readings power is otherwise taken to change evenly, which moves energy from a
        busy stretch into the idle one beside it (with 50 ms polls, 3-5 % of short requests' energy),
        and from a burst onto a request that began alone just before it. Where the load changed
        between two readings, power holds at each load's level (:mod:`meter.power_by_load`).
        """
        if gpu in self._gpu:
            self._gpu[gpu].trace.load(t, running)

    def samples_since(self, gpu: int, t: float | None) -> list[tuple[float, float]]:
        """Buffered samples from the last one at or before ``t`` on (all when ``t`` is None)."""
        return self._gpu[gpu].trace.samples_since(t)

    def energy_curve(self, gpu: int, since: float | None, until: float | None = None) -> list[tuple[float, float]]:
        """The best estimate now of cumulative energy ``(time, J)`` from ``since`` on, for provisional figures.

        Counter samples first; then the power integrated since the counter's last step (scaled,
        read sparsely, by how the two sensors have agreed lately); with ``until``, the curve is
        extended to it at the latest instantaneous power. Not for settled figures: only the
        samples are final.
        """
        st = self._gpu[gpu]
        return st.trace.curve(since, until, st.power_w, sparse=self.counters.every_s is not None)

    def energy_between(self, gpu: int, a: float, b: float) -> float:
        """Energy (J) of one GPU over ``[a, b]`` on :meth:`energy_curve`, extrapolated to ``b``."""
        return self.energy_over(gpu, a, b)(a, b)

    def energy_over(self, gpu: int, since: float, until: float) -> Callable[[float, float], float]:
        """:meth:`energy_between` for any stretch within ``[since, until]``, on one curve read now: for
        callers that need many (a request's provisional figure revalues each of its recent live slices)."""
        curve = self.energy_curve(gpu, since, until=until)
        return lambda a, b: max(interp(curve, b) - interp(curve, a), 0.0) if curve else 0.0

    def power_w(self, gpu: int) -> float | None:
        """Latest instantaneous power of one GPU in watts, if known."""
        return self._gpu[gpu].power_w

    def last_sample_time(self, gpu: int) -> float | None:
        """Time of the newest buffered energy sample of one GPU."""
        samples = self._gpu[gpu].trace.samples
        return samples[-1][0] if samples else None

    def power_vs_counter(self, gpu: int) -> float | None:
        """Counter energy over integrated instantaneous power, across the last counter intervals.

        Where power places the counter's energy in time (the GPU reports
        power): near 1 when the two sensors agree. Away from
        1 the power sensor is biased: harmless if by a constant factor (the
        counter rescales it), otherwise energy moves between busy and idle
        moments inside a counter interval. Totals stay the counter's.
        """
        return self._gpu[gpu].trace.power_vs_counter()

    def counter_step_s(self, gpu: int) -> float | None:
        """How often one GPU's energy counter steps, once learnt (read every poll; see :mod:`meter.counter_steps`)."""
        return self._gpu[gpu].trace.steps.step_period_s()

    def last_ok(self, gpu: int) -> float | None:
        """Time of the last successful reading of one GPU."""
        return self._gpu[gpu].last_ok

    def _run(self) -> None:
        next_at = self.clock()
        while not self._stop.is_set():
            try:
                self.poll()
                if self.after_poll is not None:
                    self.after_poll()
            except Exception:
                log.exception("meter sampler round failed")
                self._fault(Fault.INTERNAL)
            next_at += self.next_delay()
            delay = next_at - self.clock()
            if delay < 0:  # fell behind: skip missed rounds rather than bursting
                next_at = self.clock()
                delay = 0
            self._stop.wait(delay)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="wattgate-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


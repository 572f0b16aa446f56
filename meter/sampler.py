"""Background sampling of each GPU's cumulative energy into bounded buffers."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wattgate.meter.counter_steps import CounterSteps, poll_delays
from wattgate.meter.kinds import Fault
from wattgate.meter.sources import MeterFault, PowerSource

log = logging.getLogger(__name__)

CALIBRATION_READS = 5  # counter reads timed before the interval is chosen (``counter_cpu_budget``)
MAX_COUNTER_EVERY_S = 10.0
AGREEMENT_INTERVALS = 20  # counter intervals over which power is compared with the counter
TRUSTED_INTERVALS = 5  # of those, how many before the agreement scales provisional figures
MAX_MARKS = 64  # activity changes kept per GPU, waiting for the poll that covers them


@dataclass(slots=True)
class _GpuState:
    samples: deque[tuple[float, float]]  # (monotonic s, cumulative J), made continuous
    last_raw: float | None = None  # last counter value as read
    offset: float = 0.0  # added to raw values after counter resets
    last_poll: float | None = None
    power_w: float | None = None
    last_ok: float | None = None  # time of the last successful read
    last_counter_read: float | None = None
    first_step: bool = True  # the next counter step ends the first interval, whose start is a guess
    # Anchored mode: (time, joules of integrated power since the last counter sample).
    pending: list[tuple[float, float]] = field(default_factory=list)
    # Anchored mode: (counter joules, integrated-power joules) of recent counter intervals.
    agreement: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=AGREEMENT_INTERVALS))
    # Times the GPU went from idle to busy or back, as its user saw it (see ``Sampler.mark``).
    marks: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_MARKS))
    steps: CounterSteps = field(default_factory=CounterSteps)  # when the counter steps, once learnt


class Sampler:
    """Polls a :class:`PowerSource` every ``interval_s`` on a monotonic clock.

    Counter readings are stored only when the value changes, stamped halfway
    between the poll that saw the change and the one before it (the counter
    stepped somewhere in between; on H100 it steps about every 100 ms). A
    counter that goes backwards is treated as a reset and made continuous.
    GPUs without a counter get their power integrated (trapezoids).

    Instantaneous power, read every poll, places the energy between two counter
    steps: the counter fixes how much, the power trace fixes when (spread evenly
    over a step, the energy drawn after a request's end would blend into its
    last moments). With ``counter_every_s`` set, the counter is read only that
    often. (On some hosts one counter read costs milliseconds of CPU; power
    reads cost microseconds.) The sampler's user can ``mark`` the moments a
    GPU turns busy or idle, where power most likely stepped.
    ``power_lag_s`` says how late the power sensor reports a change of load,
    relative to the counter (``bench/sensor_lag.py`` measures it): its readings
    are placed that much earlier.

    With ``counter_cpu_budget`` set instead (a fraction of one core), the
    sampler chooses that interval itself: it reads the counter at every poll for
    the first few reads, times them on ``cpu_clock``, then reads it as often as
    the budget allows for all GPUs (every poll when it is cheap, up to every
    ``MAX_COUNTER_EVERY_S``). The counter's cost is a property of the host and
    driver, so it is measured once.

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
        power_lag_s: float = 0.0,
    ) -> None:
        self.source = source
        self.gpus = tuple(gpus)
        self.interval_s = interval_s
        self.clock = clock
        self.after_poll = after_poll
        self.counter_every_s = counter_every_s
        self.counter_lag_s = counter_lag_s  # half the counter's update period (H100/H200: 100 ms)
        self.counter_cpu_budget = counter_cpu_budget
        self.cpu_clock = cpu_clock
        self.power_lag_s = power_lag_s
        self.continuous = getattr(source, "continuous_counter", False)
        self._read_costs: list[float] = []  # CPU seconds of timed counter reads, while calibrating
        maxlen = int(horizon_s / interval_s) + 16
        self._gpu = {g: _GpuState(deque(maxlen=maxlen)) for g in self.gpus}
        self.on_error: Callable[[str], None] | None = None  # told each fault's kind (the meter counts them)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._delays = poll_delays(interval_s)

    def next_delay(self) -> float:
        """Time to the next poll: ``interval_s``; on average only while a stepping counter is read at
        every poll, whose polls' phase sweeps against its steps to learn when they fall (see
        :mod:`meter.counter_steps`)."""
        sweep = self.counter_every_s is None and not self.continuous and any(
            not st.steps.fast for st in self._gpu.values())
        return next(self._delays) if sweep else self.interval_s

    def _fault(self, kind: str) -> None:
        if self.on_error is not None:
            self.on_error(kind)

    def poll(self) -> None:
        """Read every GPU once."""
        for gpu in self.gpus:
            st = self._gpu[gpu]
            now = self.clock()
            due = (
                self.counter_every_s is None
                or st.last_counter_read is None
                or now - st.last_counter_read >= self.counter_every_s - self.interval_s / 2
            )
            calibrating = due and self.counter_cpu_budget is not None and len(self._read_costs) < CALIBRATION_READS
            cpu0 = self.cpu_clock() if calibrating else 0.0
            try:
                reading = self.source.read(gpu, energy=due)
            except MeterFault as exc:
                self._fault(exc.kind)
                continue
            except Exception:  # a source bug must not kill the sampler
                log.exception("power source failed on GPU %d", gpu)
                self._fault(Fault.READ)
                continue
            cost = self.cpu_clock() - cpu0 if calibrating else 0.0
            st.last_poll = st.last_ok = now
            prev_power, st.power_w = st.power_w, reading.power_w
            # With power beside the counter, power places each counter step's energy in time,
            # read sparsely or not: an H100's counter steps only every ~100 ms.
            anchored = reading.power_w is not None and not self.continuous
            # Mean power since the previous poll (trapezoid), for integrating power into energy.
            avg = None
            if reading.power_w is not None:
                avg = (reading.power_w + (prev_power if prev_power is not None else reading.power_w)) / 2
            if anchored and st.pending and avg is not None:
                at = now - self.power_lag_s  # when the power just read was drawn
                t0, c0 = st.pending[-1]
                if at > t0:
                    st.pending.extend(_placed(t0, c0, at, c0 + avg * (at - t0), prev_power, reading.power_w,
                                              self._mark_in(st, t0, at)))
                if len(st.pending) > (st.samples.maxlen or 0):  # a counter that stopped stepping
                    del st.pending[1 : len(st.pending) // 2]  # keep the anchor and the newer half
            if reading.energy_j is not None:
                prev_read, st.last_counter_read = st.last_counter_read, now
                self._counter(st, reading.energy_j, (prev_power, reading.power_w), now, prev_read, anchored)
                if calibrating:
                    self._calibrate(cost)
            elif not due and st.last_raw is not None:
                pass  # between counter reads: power is in ``pending``
            elif avg is not None:
                if not st.samples:
                    st.samples.append((now, 0.0))
                else:
                    t0, e0 = st.samples[-1]
                    st.samples.extend(_placed(t0, e0, now, e0 + avg * (now - t0), prev_power, reading.power_w,
                                              self._mark_in(st, t0, now)))
            else:
                self._fault(Fault.READ)

    def _calibrate(self, cost_s: float) -> None:
        self._read_costs.append(cost_s)
        if len(self._read_costs) < CALIBRATION_READS:
            return
        assert self.counter_cpu_budget is not None
        cost = sorted(self._read_costs)[len(self._read_costs) // 2]
        every = len(self.gpus) * cost / self.counter_cpu_budget
        self.counter_every_s = None if every <= self.interval_s else min(every, MAX_COUNTER_EVERY_S)
        if self.counter_every_s is not None:
            for st in self._gpu.values():  # power from here on places the energy of the next counter step
                st.pending = [(st.last_poll, 0.0)] if st.last_poll is not None else []
        if every > MAX_COUNTER_EVERY_S:
            log.warning(
                "energy counter read costs %.1f ms of CPU: even every %.0f s, reads of %d GPU(s) take %.1f %% of a core",
                cost * 1e3, MAX_COUNTER_EVERY_S, len(self.gpus), 100 * len(self.gpus) * cost / MAX_COUNTER_EVERY_S,
            )
        log.info(
            "energy counter read costs %.0f us of CPU: reading it %s for %d GPU(s)",
            cost * 1e6,
            "every poll" if self.counter_every_s is None else f"every {self.counter_every_s:.2f} s",
            len(self.gpus),
        )

    @property
    def counter_period_s(self) -> float:
        """Time between two counter reads of one GPU."""
        return self.counter_every_s if self.counter_every_s is not None else self.interval_s

    def _counter(
        self,
        st: _GpuState,
        raw: float,
        powers: tuple[float | None, float | None],
        now: float,
        prev_read: float | None,
        anchored: bool,
    ) -> None:
        """Store a counter reading when it changed, made continuous across resets; ``powers``: the
        instantaneous power read at the previous poll and at this one; ``prev_read``: when the
        counter was read before."""
        prev_power, power_w = powers
        if st.last_raw is None:
            # The counter last stepped about counter_lag_s ago, as every later sparse read is
            # stamped. Still a guess: the first interval stays out of the sensors' agreement.
            stamp = now - self.counter_lag_s if anchored else now
            st.samples.append((stamp, raw))
            st.last_raw = raw
            st.pending = [(stamp, 0.0)] if anchored else []
            return
        if self.counter_every_s is None and prev_read is not None and not self.continuous:
            st.steps.read(prev_read, now, raw != st.last_raw)
        if raw == st.last_raw:
            return
        reset = raw < st.last_raw
        if reset:
            self._fault(Fault.COUNTER_RESET)
            # Unknown energy between the last value and the reset: assume power held.
            gap = (power_w or 0.0) * (now - (prev_read or now))
            st.offset += st.last_raw - raw + gap
            st.steps.forget()
        st.last_raw = raw
        t_a, e_a = st.samples[-1]
        if self.continuous:  # the value is the energy up to this read
            stamp = now
        elif self.counter_every_s is not None:
            # Read sparsely: it stepped within its update period before this read.
            stamp = max(now - self.counter_lag_s, (t_a + now) / 2)
        elif prev_read is None:
            stamp = now
        else:
            # Read every poll: it stepped between the previous read and this one, where the counter's
            # period and phase say once they are known (else at the midpoint).
            step = st.steps.step_in(prev_read, now)
            stamp = step if step is not None else (prev_read + now) / 2
        e_new = raw + st.offset
        if anchored and st.pending and power_w is not None and st.pending[-1][0] < stamp:
            # Power read late covers less than the counter: carry the latest power on to the stamp.
            t_p, c_p = st.pending[-1]
            st.pending.append((stamp, c_p + power_w * (stamp - t_p)))
        # Across a reset, or from the guessed start of the first interval, the counter's share is partly a guess.
        agrees, st.first_step = not reset and not st.first_step, False
        if anchored and len(st.pending) > 1:
            cum_at = _interp(st.pending, stamp)
            if cum_at > 0:
                scale = (e_new - e_a) / cum_at
                if agrees:
                    st.agreement.append((e_new - e_a, cum_at))
                st.samples.extend((t, e_a + c * scale) for t, c in st.pending if t_a < t < stamp)
            keep = [(t, c - cum_at) for t, c in st.pending if t > stamp]
            st.pending = [(stamp, 0.0), *keep]
        elif anchored:
            st.pending = [(stamp, 0.0)]
        else:
            st.pending = []
            if self.continuous and power_w is not None:  # exact totals: power places a marked step
                st.samples.extend(_placed(t_a, e_a, stamp, e_new, prev_power, power_w, self._mark_in(st, t_a, stamp)))
                return
        st.samples.append((stamp, e_new))

    def mark(self, gpu: int, t: float) -> None:
        """Note that GPU ``gpu`` went from idle to busy, or back, at ``t`` (its user knows: a first
        request began, or the last one ended).

        Between two readings power is otherwise taken to change evenly, which moves energy from a
        busy stretch into the idle one beside it (with 50 ms polls, 3-5 % of short requests'
        energy). Where one mark falls between two readings, the power before it is taken to hold
        up to it and the power after it from it on; with several, evenly as before.
        """
        if gpu in self._gpu:
            self._gpu[gpu].marks.append(t)

    def _mark_in(self, st: _GpuState, t0: float, t1: float) -> float | None:
        """The one mark inside ``(t0, t1)``, if exactly one."""
        marks = list(st.marks)  # a copy: the caller's thread appends
        while st.marks and st.marks[0] <= t0:
            st.marks.popleft()
        inside = [m for m in marks if t0 < m < t1]
        return inside[0] if len(inside) == 1 else None

    def samples_since(self, gpu: int, t: float | None) -> list[tuple[float, float]]:
        """Buffered samples from the last one at or before ``t`` on (all when ``t`` is None)."""
        buf = self._gpu[gpu].samples
        if t is None:
            return list(buf)
        out: list[tuple[float, float]] = []
        for sample in reversed(buf):  # new samples are few; walk back from the end
            out.append(sample)
            if sample[0] <= t:
                break
        out.reverse()
        return out

    def energy_curve(self, gpu: int, since: float | None, until: float | None = None) -> list[tuple[float, float]]:
        """The best estimate now of cumulative energy ``(time, J)`` from ``since`` on, for provisional figures.

        Counter samples first; then the power integrated since the counter's last step (scaled,
        read sparsely, by how the two sensors have agreed lately); with ``until``, the curve is
        extended to it at the latest instantaneous power. Not for settled figures: only the
        samples are final.
        """
        curve = self.samples_since(gpu, since)
        st = self._gpu[gpu]
        if not curve:
            return curve
        pending = st.pending  # the sampler thread appends to it, or replaces it when the counter steps
        t_a, e_a = curve[-1]
        if len(pending) > 1 and pending[0][0] == t_a:  # anchored at the last sample, not at a newer one
            # The sensors' agreement, once a few counter intervals back it: one interval with a step
            # in power between two reads misstates it by as much as the trapezoid misses the step.
            # Read every poll, the pending power is one counter step's worth, and 20 steps of 100 ms,
            # each stamped to within a poll, are too few to scale it by (bench.inline, every poll:
            # provisional vs settled p95 7.8-8.7 % scaled, 6.3-6.6 % not).
            trusted = len(st.agreement) >= TRUSTED_INTERVALS and self.counter_every_s is not None
            scale = (self.power_vs_counter(gpu) if trusted else None) or 1.0
            curve.extend((t, e_a + c * scale) for t, c in pending[1:] if t > t_a)
        t_z, e_z = curve[-1]
        if until is not None and until > t_z and st.power_w is not None:
            curve.append((until, e_z + st.power_w * (until - t_z)))
        return curve

    def energy_between(self, gpu: int, a: float, b: float) -> float:
        """Energy (J) of one GPU over ``[a, b]`` on :meth:`energy_curve`, extrapolated to ``b``."""
        curve = self.energy_curve(gpu, a, until=b)
        return max(_interp(curve, b) - _interp(curve, a), 0.0) if curve else 0.0

    def power_w(self, gpu: int) -> float | None:
        """Latest instantaneous power of one GPU in watts, if known."""
        return self._gpu[gpu].power_w

    def last_sample_time(self, gpu: int) -> float | None:
        """Time of the newest buffered energy sample of one GPU."""
        samples = self._gpu[gpu].samples
        return samples[-1][0] if samples else None

    def power_vs_counter(self, gpu: int) -> float | None:
        """Counter energy over integrated instantaneous power, across the last counter intervals.

        Where power places the counter's energy in time (the GPU reports
        power): near 1 when the two sensors agree. Away from
        1 the power sensor is biased: harmless if by a constant factor (the
        counter rescales it), otherwise energy moves between busy and idle
        moments inside a counter interval. Totals stay the counter's.
        """
        pairs = list(self._gpu[gpu].agreement)  # a copy: the sampler thread appends
        power_j = sum(p for _, p in pairs)
        return sum(c for c, _ in pairs) / power_j if power_j > 0 else None

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


def _placed(
    t0: float, e0: float, t1: float, e1: float, p0: float | None, p1: float | None, step: float | None
) -> list[tuple[float, float]]:
    """Points of cumulative energy from ``(t0, e0)`` to ``(t1, e1)``: with a ``step`` between them,
    power ``p0`` holds up to it and ``p1`` from it on, their energies scaled to ``e1 - e0``."""
    if step is None or p0 is None or p1 is None:
        return [(t1, e1)]
    before, after = p0 * (step - t0), p1 * (t1 - step)
    if before + after <= 0:
        return [(t1, e1)]
    return [(step, e0 + (e1 - e0) * before / (before + after)), (t1, e1)]


def _interp(points: list[tuple[float, float]], t: float) -> float:
    """Linear interpolation of ``(time, value)`` points at ``t`` (clamped at the ends)."""
    if t <= points[0][0]:
        return points[0][1]
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
    return points[-1][1]

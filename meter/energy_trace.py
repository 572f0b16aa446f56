"""One GPU's cumulative energy over time, built from its counter and its power readings.

The :class:`~meter.sampler.Sampler` reads the sensors; an :class:`EnergyTrace`
turns the readings into a curve of cumulative energy that attribution can cut
anywhere:

- Counter readings are stored when the value changes, stamped where the
  counter stepped before the read that saw it: read every poll, where its learnt
  period and phase say (:mod:`meter.counter_steps`), else halfway between the
  two reads; read sparsely, within its update period before the read. A counter
  that goes backwards is treated as a reset and made continuous.
- Instantaneous power, read every poll, places the energy between two counter
  steps (*anchored* mode): the counter fixes how much, power fixes when (spread
  evenly over a step, the energy drawn after a request's end would blend into
  its last moments). Power read since the counter's last step waits in
  ``pending`` until the next step rescales it. A step is stored once power
  read after it covers it (``held`` until then): a sensor that reports late
  has not yet seen the step's last moments when the counter is read, and
  holding the latest power on over them put a burst's first energy in the idle
  before it (``bench/RESULTS.md``, "A counter step waits for the power that covers it").
- A GPU without a counter gets its power integrated (trapezoids).
- Where the number of requests running changed between two readings (``load``),
  power is taken to hold at each load's level rather than change evenly
  (:mod:`meter.power_by_load`).
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable
from operator import itemgetter

from wattgate.meter.counter_steps import CounterSteps
from wattgate.meter.power_by_load import PowerByLoad, placed

AGREEMENT_INTERVALS = 20  # counter intervals over which power is compared with the counter
TRUSTED_INTERVALS = 5  # of those, how many before the agreement scales provisional figures
MAX_LOAD_CHANGES = 4096  # per GPU, waiting for the poll that covers them


class EnergyTrace:
    """One GPU's energy curve: final ``samples`` (time, cumulative J) and the power read since the
    counter's last step; ``continuous``: the counter's value is the energy up to each read."""

    def __init__(self, maxlen: int, *, continuous: bool, counter_lag_s: float,
                 on_reset: Callable[[], None]) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=maxlen)  # made continuous across resets
        self.continuous = continuous
        self.counter_lag_s = counter_lag_s  # half the counter's update period (H100/H200: 100 ms)
        self.on_reset = on_reset
        self.last_raw: float | None = None  # last counter value as read
        self.offset = 0.0  # added to raw values after counter resets
        self.first_step = True  # the next counter step ends the first interval, whose start is a guess
        # Anchored mode: (time, joules of integrated power since the last counter sample).
        self.pending: list[tuple[float, float]] = []
        # Anchored mode: (counter joules, integrated-power joules) of recent counter intervals.
        self.agreement: deque[tuple[float, float]] = deque(maxlen=AGREEMENT_INTERVALS)
        # Changes of the number of requests running, as the GPU's user saw them (see ``load``): (time,
        # running from then on), and how many ran before the first of them.
        self.loads: deque[tuple[float, int]] = deque(maxlen=MAX_LOAD_CHANGES)
        self.load_before = 0
        self.levels = PowerByLoad()
        self.steps = CounterSteps()  # when the counter steps, once learnt
        # Anchored mode: the counter's latest step, until power read since covers it (see the module's docstring):
        # (stamp, cumulative J, the powers read beside it, whether it joins the sensors' agreement).
        self.held: tuple[float, float, tuple[float | None, float | None], bool] | None = None
        # Held while ``samples`` grows (the sampler's thread) and while it is walked (a request's thread):
        # a deque walked in Python while another thread appends raises RuntimeError.
        self._lock = threading.Lock()

    # -- readings in -------------------------------------------------------------

    def power(self, at: float, prev_power: float | None, power_w: float) -> None:
        """Anchored mode: power ``power_w`` drawn at ``at`` (``prev_power`` read the poll before)."""
        if not self.pending:
            return
        t0, c0 = self.pending[-1]
        if at > t0:
            self.pending.extend(self._placed(t0, c0, at, prev_power, power_w))
        if self.held is not None and at >= self.held[0]:
            with self._lock:
                self._release()
        if len(self.pending) > (self.samples.maxlen or 0):  # a counter that stopped stepping
            del self.pending[1 : len(self.pending) // 2]  # keep the anchor and the newer half

    def integrate(self, now: float, prev_power: float | None, power_w: float) -> None:
        """No counter: power ``power_w`` read at ``now`` integrated since the last sample (trapezoid)."""
        with self._lock:
            self._integrate(now, prev_power, power_w)

    def _integrate(self, now: float, prev_power: float | None, power_w: float) -> None:
        if not self.samples:
            self.samples.append((now, 0.0))
            return
        t0, e0 = self.samples[-1]
        self.samples.extend(self._placed(t0, e0, now, prev_power, power_w))

    def reanchor(self, at: float | None) -> None:
        """From ``at`` on, power places the energy of the next counter step (the counter is read sparsely now)."""
        self.pending = [(at, 0.0)] if at is not None else []

    def counter(self, raw: float, now: float, prev_read: float | None, powers: tuple[float | None, float | None],
                *, anchored: bool, every_poll: bool) -> None:
        """Store a counter reading ``raw`` taken at ``now`` when it changed; ``prev_read``: when the counter
        was read before; ``powers``: the instantaneous power read at the previous poll and at this one;
        ``every_poll``: the counter is read at every poll (else sparsely)."""
        with self._lock:
            self._counter(raw, now, prev_read, powers, anchored=anchored, every_poll=every_poll)

    def _counter(self, raw: float, now: float, prev_read: float | None, powers: tuple[float | None, float | None],
                 *, anchored: bool, every_poll: bool) -> None:
        power_w = powers[1]
        if self.last_raw is None:
            # The counter last stepped about counter_lag_s ago, as every later sparse read is
            # stamped. Still a guess: the first interval stays out of the sensors' agreement.
            stamp = now - self.counter_lag_s if anchored else now
            self.samples.append((stamp, raw))
            self.last_raw = raw
            self.pending = [(stamp, 0.0)] if anchored else []
            return
        if every_poll and prev_read is not None and not self.continuous:
            self.steps.read(prev_read, now, raw != self.last_raw)
        if raw == self.last_raw:
            return
        reset = raw < self.last_raw
        if reset:
            self.on_reset()
            # Unknown energy between the last value and the reset: assume power held.
            gap = (power_w or 0.0) * (now - (prev_read or now))
            self.offset += self.last_raw - raw + gap
            self.steps.forget()
        self.last_raw = raw
        self._release()  # a step still held: power has not reached it in a whole counter interval
        stamp = self._stamp(now, prev_read, every_poll)
        if anchored and power_w is not None and self.pending and self.pending[-1][0] < stamp:
            self.held = (stamp, raw + self.offset, powers, not reset)
            return
        self._store(stamp, raw + self.offset, powers, anchored=anchored, agrees=not reset)

    def _release(self) -> None:
        """Store the step ``held``, if any, with the power read so far."""
        if self.held is not None:
            stamp, energy, powers, agrees = self.held
            self.held = None
            self._store(stamp, energy, powers, anchored=True, agrees=agrees)

    def _stamp(self, now: float, prev_read: float | None, every_poll: bool) -> float:
        """Where the counter stepped to the value read at ``now``."""
        if self.continuous:  # the value is the energy up to this read
            return now
        if not every_poll:  # read sparsely: it stepped within its update period before this read
            return max(now - self.counter_lag_s, (self.samples[-1][0] + now) / 2)
        if prev_read is None:
            return now
        # Read every poll: it stepped between the previous read and this one, where the counter's
        # period and phase say once they are known (else at the midpoint).
        step = self.steps.step_in(prev_read, now)
        return step if step is not None else (prev_read + now) / 2

    def _store(self, stamp: float, e_new: float, powers: tuple[float | None, float | None], *, anchored: bool,
               agrees: bool) -> None:
        """Add the counter's energy ``e_new`` at ``stamp``, placed by the power read since its last step."""
        prev_power, power_w = powers
        t_a, e_a = self.samples[-1]
        if anchored and self.pending and power_w is not None and self.pending[-1][0] < stamp:
            # Power read late covers less than the counter: carry the latest power on to the stamp.
            t_p, c_p = self.pending[-1]
            self.pending.append((stamp, c_p + power_w * (stamp - t_p)))
        # Across a reset, or from the guessed start of the first interval, the counter's share is partly a guess.
        agrees, self.first_step = agrees and not self.first_step, False
        if anchored and len(self.pending) > 1:
            cum_at = interp(self.pending, stamp)
            if cum_at > 0:
                scale = (e_new - e_a) / cum_at
                if agrees:
                    self.agreement.append((e_new - e_a, cum_at))
                self.samples.extend((t, e_a + c * scale) for t, c in self.pending if t_a < t < stamp)
            keep = [(t, c - cum_at) for t, c in self.pending if t > stamp]
            self.pending = [(stamp, 0.0), *keep]
        elif anchored:
            self.pending = [(stamp, 0.0)]
        else:
            self.pending = []
            if self.continuous and power_w is not None and prev_power is not None:  # exact totals: power places them
                load0, changes = self._loads_in(t_a, stamp)
                self.samples.extend(placed(t_a, e_a, stamp, prev_power, power_w, load0, changes, self.levels, e1=e_new))
                return
        self.samples.append((stamp, e_new))

    def load(self, t: float, running: int) -> None:
        """From ``t`` on, ``running`` requests run on the GPU (see :meth:`Sampler.load`)."""
        self.loads.append((t, running))

    def _loads_in(self, t0: float, t1: float) -> tuple[int, list[tuple[float, int]]]:
        """The load at ``t0`` and its changes inside ``(t0, t1)``, in time order; those up to ``t0`` are let go."""
        changes = sorted(self.loads)  # a copy: the caller's thread appends
        while self.loads and self.loads[0][0] <= t0:
            self.load_before = self.loads.popleft()[1]
        load0 = self.load_before
        for t, n in changes:
            if t <= t0:
                load0 = n
        return load0, [(t, n) for t, n in changes if t0 < t < t1]

    def _placed(self, t0: float, e0: float, t1: float, p0: float | None, p1: float) -> list[tuple[float, float]]:
        """Points of cumulative energy from ``(t0, e0)`` to ``t1``, where power ``p1`` is read (``p0`` at ``t0``):
        placed by the load between them, which also teaches the GPU's levels (see :mod:`meter.power_by_load`)."""
        load0, changes = self._loads_in(t0, t1)
        if not changes:
            self.levels.observe(load0, p1)  # the same load since the reading before
        return placed(t0, e0, t1, p1 if p0 is None else p0, p1, load0, changes, self.levels)

    # -- the curve out -----------------------------------------------------------

    def samples_since(self, t: float | None) -> list[tuple[float, float]]:
        """Buffered samples from the last one at or before ``t`` on (all when ``t`` is None)."""
        out: list[tuple[float, float]] = []
        with self._lock:
            if t is None:
                return list(self.samples)
            for sample in reversed(self.samples):  # new samples are few; walk back from the end
                out.append(sample)
                if sample[0] <= t:
                    break
        out.reverse()
        return out

    def curve(self, since: float | None, until: float | None, power_w: float | None,
              sparse: bool) -> list[tuple[float, float]]:
        """The best estimate now of cumulative energy from ``since`` on (see :meth:`Sampler.energy_curve`);
        ``power_w``: the latest power, which extends it to ``until``; ``sparse``: the counter is read sparsely."""
        curve = self.samples_since(since)
        if not curve:
            return curve
        pending = self.pending  # the sampler thread appends to it, or replaces it when the counter steps
        t_a, e_a = curve[-1]
        if len(pending) > 1 and pending[0][0] == t_a:  # anchored at the last sample, not at a newer one
            # The sensors' agreement, once a few counter intervals back it: one interval with a step
            # in power between two reads misstates it by as much as the trapezoid misses the step.
            # Read every poll, the pending power is one counter step's worth, and 20 steps of 100 ms,
            # each stamped to within a poll, are too few to scale it by: scaled, provisional figures
            # were further from settled ones (bench/RESULTS.md, "Scaling the pending power, counter read every poll").
            trusted = len(self.agreement) >= TRUSTED_INTERVALS and sparse
            scale = (self.power_vs_counter() if trusted else None) or 1.0
            curve.extend((t, e_a + c * scale) for t, c in pending[1:] if t > t_a)
        t_z, e_z = curve[-1]
        if until is not None and until > t_z and power_w is not None:
            curve.append((until, e_z + power_w * (until - t_z)))
        return curve

    def power_vs_counter(self) -> float | None:
        """Counter energy over integrated instantaneous power, across the last counter intervals (see
        :meth:`Sampler.power_vs_counter`)."""
        pairs = list(self.agreement)  # a copy: the sampler thread appends
        power_j = sum(p for _, p in pairs)
        return sum(c for c, _ in pairs) / power_j if power_j > 0 else None


_time = itemgetter(0)  # a point's time


def interp(points: list[tuple[float, float]], t: float) -> float:
    """Linear interpolation of ``(time, value)`` points, in time order, at ``t`` (clamped at the ends).

    A binary search: a request's provisional figure reads its window's curve (a point per poll, a
    few hundred for a long request) several times, for each live slice it may revalue."""
    if t <= points[0][0]:
        return points[0][1]
    i = bisect.bisect_left(points, t, key=_time)  # the first point at or after t; the one before is earlier
    if i == len(points):
        return points[-1][1]
    (t0, v0), (t1, v1) = points[i - 1], points[i]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)

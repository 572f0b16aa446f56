"""When a GPU's energy counter steps, learnt from reads of it on consecutive polls.

An H100's or H200's energy counter advances only every ~100 ms (``bench.sensor_lag``
measured 100 ms on the H200, reported with no delay). A read shows the value as of
its last step, so a new value read every poll could be stamped only somewhere
between that read and the one before: the midpoint is up to half a poll (25 ms)
from the step. Where a burst of requests starts or ends inside that error, the
counter's energy lands partly on the wrong side of it, and the placement by
power inside the counter's interval is scaled wrongly: 8.6 % p95 against what
each request drew on the scripted GPU of ``bench.inline``, 5.0 % with each step
stamped where it happened.

The counter steps on its own clock, at a steady period. Each change seen
between two consecutive reads says a step fell in ``(previous read, this read]``;
step ``k`` is at ``phase + k * period``. The period is the middle of the range
that every pair of intervals allows; the phase is then bounded by every interval
at once: it is after the latest of their starts and at or before the earliest of
their ends, taken back to step 0. Polls that keep the same phase against the
counter never narrow that bound, so the sampler sweeps its polls' phase back and forth (see
:func:`poll_delays`); within about 2.5 s the bound narrows to a few ms.
Anything that does not fit (a missed step, a counter whose period drifts, one
that steps at every read) starts the fit over, and until it fits again a step
is stamped at the midpoint as before.

No library estimates this: it is a small constrained fit written here.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

import numpy as np

MIN_STEPS = 4  # changes seen before the phase is used (the period is known from pairs of them)
KEEP_STEPS = 64  # the fit uses the newest this many (about 6 s at 100 ms)
SWEEP_POLLS = 40  # the polls' phase sweeps back and forth over this many (2 s at 50 ms)
TOLERANCE_S = 0.001  # slack for the poll's own clock reads (a read takes time)
TALLY_READS = 20  # reads over which a counter that changes at nearly every read is noticed
FAST_SHARE = 0.8  # of those reads, the share that saw a new value for the counter to count as one


class CounterSteps:
    """One GPU's counter: the steps seen between consecutive reads, and where the next ones fall."""

    __slots__ = ("_changed", "_period", "_phase", "_seen")

    def __init__(self) -> None:
        self._seen: deque[tuple[int, float, float]] = deque(maxlen=KEEP_STEPS)  # (step number, after, at or before)
        self._phase: float | None = None  # step 0's time, once MIN_STEPS steps fit
        self._period: float = math.nan
        self._changed: deque[bool] = deque(maxlen=TALLY_READS)  # whether each recent read saw a new value

    @property
    def fast(self) -> bool:
        """The counter changes at (nearly) every read: it steps as often as it is read or more, and
        no read says where in its interval a step fell (nor does sweeping the polls help)."""
        return len(self._changed) == TALLY_READS and sum(self._changed) >= FAST_SHARE * TALLY_READS

    def read(self, before: float, at: float, changed: bool) -> None:
        """The counter was read at ``before`` and next at ``at``; ``changed``: the two values differ."""
        self._changed.append(changed)
        if self.fast:
            self.forget()
        elif changed and at > before:
            self._seen_step(before, at)

    def _seen_step(self, before: float, at: float) -> None:
        mid = (before + at) / 2
        if self._seen:
            k0, lo0, hi0 = self._seen[-1]
            # Reads faster than the counter see each step once: until the period is known, one change is one step.
            k = k0 + (1 if math.isnan(self._period) else max(round((mid - (lo0 + hi0) / 2) / self._period), 1))
            if at - before >= self._period:
                self.forget()  # a read slower than the counter, or steps closer than the reads: no phase
                k = 0
        else:
            k = 0
        self._seen.append((k, before, at))
        self._fit()

    def forget(self) -> None:
        """Start over: the counter did something the fit cannot follow (a reset, reads as slow as its steps)."""
        self._seen.clear()
        self._phase = None
        self._period = math.nan

    def step_in(self, before: float, at: float) -> float | None:
        """When the counter stepped between reads at ``before`` and ``at``, if its phase is known: the
        predicted step nearest that interval, within it."""
        if self._phase is None:
            return None
        mid = (before + at) / 2
        step = self._phase + round((mid - self._phase) / self._period) * self._period
        return min(max(step, math.nextafter(before, at)), at)

    @property
    def period_s(self) -> float | None:
        return None if math.isnan(self._period) else self._period

    def step_period_s(self) -> float | None:
        """The counter's period once its phase is known (steps are then stamped by them), else None."""
        return None if self._phase is None else self._period

    def _fit(self) -> None:
        """The period and phase that fit every interval seen, if any; else start over from the newest."""
        k, lo, hi = (np.array(col, dtype=float) for col in zip(*self._seen))
        if len(k) < 2:
            return
        # Step i after step j (dk > 0): dk * period is at least lo_i - hi_j and less than hi_i - lo_j.
        dk = k[:, None] - k[None, :]
        later = dk > 0
        shortest = np.max(np.where(later, (lo[:, None] - hi[None, :]) / np.where(later, dk, 1.0), -np.inf))
        longest = np.min(np.where(later, (hi[:, None] - lo[None, :]) / np.where(later, dk, 1.0), np.inf))
        if shortest > longest + TOLERANCE_S / (k[-1] - k[0]):
            newest = self._seen[-1]
            self.forget()
            self._seen.append((0, newest[1], newest[2]))
            return
        self._period = (shortest + longest) / 2
        after, until = np.max(lo - k * self._period), np.min(hi - k * self._period)
        # The middle of the phases that fit: never further from the step than the midpoint of a read's
        # interval, and the same for every step, so a counter interval's length is not misstated.
        self._phase = float(after + until) / 2 if len(k) >= MIN_STEPS else None


def poll_delays(interval_s: float, cycle: int = SWEEP_POLLS) -> Iterator[float]:
    """Poll intervals averaging ``interval_s`` whose phase sweeps half an interval either way over
    ``cycle`` polls (each interval within 8 % of ``interval_s``), so that the polls' phase against
    a counter's steps covers the whole step: polls locked to the counter would never say where in
    their interval it steps."""
    depth = math.pi / cycle  # sum of the deviations: interval_s / 2 at the sweep's extremes
    k = 0
    while True:
        yield interval_s * (1.0 + depth * math.cos(2 * math.pi * k / cycle))
        k += 1

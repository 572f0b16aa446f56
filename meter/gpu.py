"""One GPU's attribution: the settled pass, the live split behind provisional figures, its totals.

The meter (:class:`~meter.meter.Meter`) owns the requests, the lock and the
faults; a :class:`GpuAccount` splits its GPU's measured energy among the requests
on it, from the samples it is handed (see :mod:`meter.attribution` for the split
and :mod:`meter.live` for the provisional figures).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from wattgate.meter.attribution import split_arrays
from wattgate.meter.first_token import TimeToFirstToken
from wattgate.meter.host import HostPower
from wattgate.meter.kinds import Fault
from wattgate.meter.live import EnergyBetween, LiveSplit
from wattgate.meter.window import Request
from wattgate.meter.work import spans_since

COMPACT_AFTER = 256  # a request holds up to twice this many attributed arrivals (see compact)
DECODE_RATE_WEIGHT = 0.2  # weight of the newest settled pass in a GPU's moving-average decode rate


@dataclass(frozen=True, slots=True)
class GpuTotals:
    """Cumulative per-GPU energy in joules since the meter started.

    ``measured == attributed + idle + unattributed + pending_idle`` where
    ``pending_idle`` waits to be amortized over the next requests.
    """

    measured: float
    attributed: float
    idle: float
    unattributed: float
    pending_idle: float
    power_w: float | None


@dataclass(slots=True)
class GpuAccount:
    frontier: float | None = None  # the settled pass has attributed everything before this time
    carry: float = 0.0  # idle energy waiting for the next request (idle: amortize)
    measured: float = 0.0
    attributed: float = 0.0
    idle: float = 0.0
    unattributed: float = 0.0
    host_per_gpu_joule: float = 0.0  # host J per GPU J in the last slice, for provisional figures
    faulted: Fault | None = None
    requests: set[str] = field(default_factory=set)
    foreign: list[tuple[float, float, int]] = field(default_factory=list)
    live: LiveSplit = field(default_factory=LiveSplit)  # the split behind provisional figures
    ttft: TimeToFirstToken = field(default_factory=TimeToFirstToken)  # learnt from the streams' first tokens
    # Recent work rate of a sequence decoding here (tokens/s, from the settled passes' decode spans): the rate
    # of one of unknown rate where nothing decodes (meter.attribution.split_arrays's decode_rate).
    decode_rate: float | None = None
    running: int = 0  # requests begun and not ended: 0 means the GPU is idle as far as the meter knows

    def fault_requests(self, requests: Mapping[str, Request], kind: Fault) -> None:
        """Give this GPU's requests ``kind`` as their fault, unless they have one: they get estimates."""
        for rid in self.requests:
            req = requests.get(rid)  # get: this also runs after a pass failed, invariants unsure
            if req is not None:
                req.fault = req.fault or kind

    def drop_slice(self, requests: Mapping[str, Request], last_sample: float | None) -> None:
        """Give up on the pending slice: its requests get estimates, and attribution goes on after it.

        Whatever made the pass fail is in those requests' windows or in that slice; keeping them
        would fail every later pass too. The slice is skipped, as a gap in the readings is.
        """
        self.fault_requests(requests, Fault.INTERNAL)
        self.requests.clear()
        self.frontier = last_sample or self.frontier

    def totals(self, power_w: float | None) -> GpuTotals:
        return GpuTotals(self.measured, self.attributed, self.idle, self.unattributed, self.carry, power_w)

    def settle_pass(
        self,
        g: int,
        samples: Sequence[tuple[float, float]],
        requests: Mapping[str, Request],
        settle_lag_s: float,
        amortize: bool,
        host: HostPower | None,
        n_gpus: int,
    ) -> list[Request]:
        """Attribute the samples from the frontier to where every open request's work is known
        (or ``settle_lag_s`` behind the newest sample), adding each request's share to it; the
        requests it attributed to."""
        if self.frontier is None:
            self.frontier = samples[0][0]
        last_t = samples[-1][0]
        reqs = [requests[rid] for rid in self.requests]
        known = [r.known_until for r in reqs if r.end is None]  # an ended request's work is known to its end
        target = max(min(last_t, *known), last_t - settle_lag_s) if known else last_t
        if target <= self.frontier:
            return []
        active = [r for r in reqs if r.start < target and (r.end is None or r.end > self.frontier)]
        key_idx, start, end, rate, decode = spans_since(active, self.frontier)
        split = split_arrays(samples, key_idx, start, end, rate, len(active), self.frontier, target, decode=decode,
                             decode_rate=self.decode_rate, foreign=self.foreign, carry=self.carry, amortize=amortize)
        self.learn_decode_rate(start[decode], end[decode], rate[decode], self.frontier, target)
        self.measured += split.measured
        self.idle += split.idle
        self.unattributed += split.unattributed
        self.carry = split.carry
        joules = list(split.shares.values())  # keyed 0..len(active)-1, in order
        for req, j, sec in zip(active, joules, split.seconds.values()):
            req.shares[g] = req.shares.get(g, 0.0) + j
            req.gpu_seconds[g] = req.gpu_seconds.get(g, 0.0) + sec
        self.attributed += math.fsum(joules)
        if host is not None and split.measured > 0:
            self.host_per_gpu_joule = host.energy_j(self.frontier, target, n_gpus) / split.measured
            for req, j in zip(active, joules):
                req.host_j += j * self.host_per_gpu_joule
        self.frontier = target
        self.foreign = [f for f in self.foreign if f[1] > target]
        return active

    def learn_decode_rate(self, start: np.ndarray, end: np.ndarray, rate: np.ndarray, a: float, b: float) -> None:
        """Fold the decode spans ``start``-``end`` at ``rate`` over ``[a, b)`` into :attr:`decode_rate`."""
        seconds = np.clip(end, a, b) - np.clip(start, a, b)
        total = float(seconds.sum())
        if total <= 0:
            return
        mean = float((rate * seconds).sum()) / total
        old = self.decode_rate
        self.decode_rate = mean if old is None else old + DECODE_RATE_WEIGHT * (mean - old)

    def live_pass(self, curve: Sequence[tuple[float, float]], requests: Mapping[str, Request], final_until: float | None,
                  energy: EnergyBetween) -> None:
        """Split the energy since the last live slice among the requests active in it, after revaluing
        the slices before ``final_until`` on ``energy`` (see :mod:`meter.live`)."""
        live = self.live
        live.revalue(final_until, energy)
        a, b = curve[0][0] if live.until is None else live.until, curve[-1][0]
        if b <= a:
            return
        active, after = [], 0
        for rid in self.requests:
            r = requests[rid]
            if r.start < b and (r.end is None or r.end > a):
                active.append(r)
            after += r.end is None or r.end > b
        key_idx, start, end, rate, decode = spans_since(active, a)
        # A request that ended since the last slice took its inline share of the time since then by
        # heads, when it ended: it takes the same here (rate unknown), so that no moment is given
        # out twice.
        closed = [k for k, r in enumerate(active) if r.end is not None]
        rate[np.isin(key_idx, closed)] = math.nan
        # Its head's share, not a decoding request's: while one is closed, the slice is split by heads
        # for every request of unknown rate (meter.attribution without decode spans).
        split = split_arrays(curve, key_idx, start, end, rate, len(active), a, b, foreign=self.foreign,
                             decode=None if closed else decode, decode_rate=None if closed else self.decode_rate,
                             time_shares=False)
        # Who shares the time after the slice: requests open at its end (or closed since, their
        # tails taken by heads) and foreign sequences.
        after += sum(n for _, e, n in self.foreign if e > b)
        live.add(a, b, split.measured, ((r.request_id, split.shares[k]) for k, r in enumerate(active)), after)

    def provisional(self, req: Request, energy: EnergyBetween) -> float:
        """``req``'s provisional joules here: its live slices, plus the energy from the last live
        slice (or its start) to its end split by heads, both on ``energy``, the GPU's curve now."""
        assert req.end is not None
        since = self.live_since(req)
        rest = energy(since, req.end) if req.end > since else 0.0
        return self.live.share(req.request_id, energy) + rest / max(self.live.heads, 1)

    def live_since(self, req: Request) -> float:
        """Where the part of ``req``'s window that no live slice has split yet begins."""
        return req.start if self.live.until is None else max(self.live.until, req.start)


def compact(req: Request, states: Iterable[GpuAccount | None]) -> None:
    """Drop the arrivals of ``req`` every GPU's passes are done with, but the last (a span starts there).

    A long generation would otherwise hold every token's time until it ends: a 32k-token answer
    about a megabyte.
    """
    # Both passes must be past an arrival: the settled one (frontier) and the live one (until).
    frontiers = [st.frontier if st.live.until is None else min(st.frontier, st.live.until)
                 for st in states if st is not None and st.frontier is not None]
    if not frontiers or len(frontiers) < len(req.gpus):
        return
    done = bisect.bisect_right(req.times, min(frontiers)) - 1
    if done > 0:
        # tokens() appends to both lists without the lock: cut both by the same count from the front.
        req.counted += sum(req.counts[:done])
        del req.times[:done], req.counts[:done]

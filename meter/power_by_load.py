"""What one GPU draws by how many requests run on it, and where that places energy between two readings.

A power reading says what the GPU drew at one moment; between two readings the load can change many times
(a burst's requests start a few ms apart, and the last of a batch runs alone for its final steps). Where the
gateway saw the load change there, power is taken to hold at each load's level: the readings' own at either
end, in between the level the GPU was seen to draw at that load (learnt from readings taken under a steady
load), else interpolated by load between the ends. Before, power stepped once at the first change to the
next reading's level (or changed evenly, with several), and a request that began alone a step ahead of a
burst was charged the burst's power for that step (``bench/RESULTS.md``, "Power by load between two readings").
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

#: Weight of a new reading in a load's running mean: loads recur often, and what a GPU draws at one load
#: moves with prompt and context lengths.
LEARN_WEIGHT = 0.1


class PowerByLoad:
    """One GPU's mean power (W) at each number of requests running, learnt from steady readings."""

    def __init__(self) -> None:
        self._watts: dict[int, float] = {}
        self._loads: list[int] = []  # the learnt loads, sorted

    def observe(self, running: int, watts: float) -> None:
        """A reading taken while ``running`` requests had been running since the reading before."""
        old = self._watts.get(running)
        if old is None:
            bisect.insort(self._loads, running)
            self._watts[running] = watts
        else:
            self._watts[running] = old + LEARN_WEIGHT * (watts - old)

    def at(self, running: int, ends: Sequence[tuple[int, float]]) -> float:
        """The power to take at ``running``: an end's reading at its own load, else the learnt level, else
        interpolated by load between the nearest levels known (``ends``: (load, W) read at either end)."""
        for load, watts in ends:
            if load == running:
                return watts
        if (learnt := self._watts.get(running)) is not None:
            return learnt
        # The nearest levels known below and above: learnt ones, or an end's reading where it is nearer.
        i = bisect.bisect_left(self._loads, running)
        lo = (self._loads[i - 1], self._watts[self._loads[i - 1]]) if i > 0 else None
        hi = (self._loads[i], self._watts[self._loads[i]]) if i < len(self._loads) else None
        for load, watts in ends:
            if load < running and (lo is None or load >= lo[0]):
                lo = (load, watts)
            elif load > running and (hi is None or load <= hi[0]):
                hi = (load, watts)
        if lo is None or hi is None:
            return (lo or hi or (running, 0.0))[1]
        (n0, w0), (n1, w1) = lo, hi
        return w0 + (w1 - w0) * (running - n0) / (n1 - n0)


def placed(t0: float, e0: float, t1: float, p0: float, p1: float, load0: int,
           changes: Sequence[tuple[float, int]], levels: PowerByLoad, e1: float | None = None,
           ) -> list[tuple[float, float]]:
    """Points of cumulative energy from ``(t0, e0)`` to ``t1``, power read ``p0`` at ``t0`` and ``p1`` at
    ``t1``; ``load0`` requests ran at ``t0`` and ``changes`` are ``(time, running from then)`` inside, in
    time order. Without changes power changes evenly (a trapezoid); with them it holds at each load's
    level (see the module's docstring). ``e1``: the energy at ``t1`` if known (the points are then scaled
    to it), else what the power says."""
    if not changes:
        return [(t1, e1 if e1 is not None else e0 + (p0 + p1) / 2 * (t1 - t0))]
    ends = ((load0, p0), (changes[-1][1], p1))
    times = [t0, *(t for t, _ in changes), t1]
    loads = [load0, *(n for _, n in changes)]
    cum = [0.0]
    for a, b, n in zip(times, times[1:], loads):
        cum.append(cum[-1] + levels.at(n, ends) * (b - a))
    if e1 is None:
        return [(t, e0 + c) for t, c in zip(times[1:], cum[1:])]
    if cum[-1] <= 0:
        return [(t1, e1)]
    scale = (e1 - e0) / cum[-1]
    return [(t, e0 + c * scale) for t, c in zip(times[1:], cum[1:])]

"""Provisional figures: each request's share of the energy measured over its own window so far.

The settled pass attributes a slice of a GPU's time once the work of every
request in it is known, so its frontier can lag: up to ``settle_lag_s`` while a
plain request (whose tokens come only at its end) runs. The inline figure of a
request that ends cannot wait for it; it comes from the *live* split instead:

- after every poll, the energy measured since the previous poll is split among
  the requests active in it by the work known at that moment (a request whose
  rate is not known yet, a plain one or a stream between two tokens, works at
  the rate of those decoding beside it), and each request keeps its shares;
- a slice's energy is revalued until the counter has stepped past it: when it
  was split, the newest part of it was instantaneous power (the counter steps
  every ~100 ms, or is read once a second), which misses the steps in load
  between two polls by as much as 40 % (a burst of requests arriving just after
  a poll). Each request keeps its *fraction* of such a slice, and its figure
  takes that fraction of the slice's energy on the best curve when it ends;
- the rest of the window, after the last live slice (at most a poll interval
  and the counter's lag), is energy measured by instantaneous power, split
  evenly among the requests open in it.

Every moment is split once for inline figures, so they are never priced from
another period, never exceed the energy of their windows, and those of
concurrent requests add up to at most what the GPU used while they ran (the
settled figures split the same moments again, once all the work is known).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

#: Energy (J) of one GPU over ``[a, b]`` on its best curve now.
EnergyBetween = Callable[[float, float], float]


@dataclass(slots=True)
class _Slice:
    """A live slice whose energy may still be revised: each request's joules of it as split."""

    a: float
    b: float
    joules: float  # the GPU's energy over [a, b] on the curve it was split from
    shares: dict[Hashable, float]

    def scale(self, energy: EnergyBetween) -> float:
        """How the slice's energy on the curve now compares with the one it was split from."""
        return energy(self.a, self.b) / self.joules if self.joules > 0 else 1.0


@dataclass(slots=True)
class LiveSplit:
    """One GPU's live split: how far it has got, and each open request's share so far."""

    until: float | None = None  # end of the last live slice (s, meter clock)
    heads: int = 0  # requests open at ``until`` or begun since: they share the energy after it
    _joules: dict[Hashable, float] = field(default_factory=dict)  # from slices whose energy is final
    _open: deque[_Slice] = field(default_factory=deque)  # newer slices, in time order

    def add(self, a: float, b: float, joules: float, shares: Iterable[tuple[Hashable, float]],
            open_requests: int) -> None:
        """Add a new live slice ``[a, b]`` of ``joules``, and each request's share of it."""
        self._open.append(_Slice(a, b, joules, dict(shares)))
        self.until = b
        self.heads = open_requests

    def revalue(self, final_until: float | None, energy: EnergyBetween) -> None:
        """Fold the slices that end before ``final_until`` (where the GPU's curve is final) into the
        requests' shares, at their energy on that curve."""
        while self._open and final_until is not None and self._open[0].b <= final_until:
            done = self._open.popleft()
            scale = done.scale(energy)
            for key, joules in done.shares.items():
                self._joules[key] = self._joules.get(key, 0.0) + joules * scale

    def since(self, t: float) -> float:
        """The earliest of ``t`` and the start of the oldest slice whose energy may still be revised."""
        return min(t, self._open[0].a) if self._open else t

    def began(self) -> None:
        """A request began after the last live slice."""
        self.heads += 1

    def share(self, key: Hashable, energy: EnergyBetween) -> float:
        """Joules of ``key`` over the live slices so far, the newest at their energy on the curve now."""
        return self._joules.get(key, 0.0) + sum(s.shares[key] * s.scale(energy) for s in self._open if key in s.shares)

    def forget(self, key: Hashable) -> None:
        self._joules.pop(key, None)
        for s in self._open:
            s.shares.pop(key, None)

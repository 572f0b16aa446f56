"""Provisional figures: each request's share of the energy measured over its own window so far.

The settled pass attributes a slice of a GPU's time once the work of every
request in it is known, so its frontier can lag: up to ``settle_lag_s`` while a
plain request (whose tokens come only at its end) runs. A request that ends
ahead of that frontier gets its inline figure from the *live* split instead:

- after every poll, the energy measured since the previous poll is split among
  the requests active in it by the work known at that moment (a request whose
  rate is not known yet, a plain one or a stream between two tokens, takes an
  average head's share), and each request's share of that slice is kept until
  the settled pass covers the slice;
- the rest of the window, after the last live slice (at most a poll interval
  and the counter's lag), is energy measured by instantaneous power, split
  evenly among the requests open in it.

So a provisional figure is never priced from another period, never exceeds the
energy of its window, and those of concurrent requests add up to at most what
the GPU used while they ran.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class LiveSplit:
    """One GPU's live slices since its settled frontier, and each request's share of them."""

    until: float | None = None  # end of the last live slice (s, meter clock)
    heads: int = 0  # requests open at ``until`` or begun since: they share the energy after it
    # Per request, in time order: [joules, start, end of its time in the slice].
    _shares: dict[Hashable, list[list[float]]] = field(default_factory=dict)

    def add(self, until: float, shares: Iterable[tuple[Hashable, float, float, float]], open_requests: int) -> None:
        """Record each request's joules over a new live slice ending at ``until``, with the part of
        the slice it was active in (``(key, joules, start, end)``)."""
        for key, joules, lo, hi in shares:
            self._shares.setdefault(key, []).append([joules, lo, hi])
        self.until = until
        self.heads = open_requests

    def began(self) -> None:
        """A request began after the last live slice."""
        self.heads += 1

    def settled_until(self, t: float) -> None:
        """The settled pass now covers everything before ``t``: drop live shares of that time."""
        for key in list(self._shares):
            entries = self._shares[key]  # in time order
            done = 0
            while done < len(entries) and entries[done][2] <= t:
                done += 1
            if done == len(entries):
                del self._shares[key]
                continue
            del entries[:done]
            joules, lo, hi = entries[0]
            if lo < t:  # active on both sides of the frontier: keep the part after it, in proportion to time
                entries[0] = [joules * (hi - t) / (hi - lo), t, hi]

    def share(self, key: Hashable) -> float:
        """Joules of ``key`` over the live slices not yet settled."""
        return sum(joules for joules, _, _ in self._shares.get(key, ()))

    def forget(self, key: Hashable) -> None:
        self._shares.pop(key, None)

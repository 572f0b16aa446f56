"""Provisional figures: each request's share of the energy measured over its own window so far.

The settled pass attributes a slice of a GPU's time once the work of every
request in it is known, so its frontier can lag: up to ``settle_lag_s`` while a
plain request (whose tokens come only at its end) runs. The inline figure of a
request that ends cannot wait for it; it comes from the *live* split instead:

- after every poll, the energy measured since the previous poll is split among
  the requests active in it by the work known at that moment (a request whose
  rate is not known yet, a plain one or a stream between two tokens, takes an
  average head's share), and each request keeps a running total of its shares;
- the rest of the window, after the last live slice (at most a poll interval
  and the counter's lag), is energy measured by instantaneous power, split
  evenly among the requests open in it.

Every moment is split once for inline figures, so they are never priced from
another period, never exceed the energy of their windows, and those of
concurrent requests add up to at most what the GPU used while they ran (the
settled figures split the same moments again, once all the work is known).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class LiveSplit:
    """One GPU's live split: how far it has got, and each open request's share so far."""

    until: float | None = None  # end of the last live slice (s, meter clock)
    heads: int = 0  # requests open at ``until`` or begun since: they share the energy after it
    _joules: dict[Hashable, float] = field(default_factory=dict)

    def add(self, until: float, shares: Iterable[tuple[Hashable, float]], open_requests: int) -> None:
        """Add each request's joules over a new live slice ending at ``until``."""
        for key, joules in shares:
            self._joules[key] = self._joules.get(key, 0.0) + joules
        self.until = until
        self.heads = open_requests

    def began(self) -> None:
        """A request began after the last live slice."""
        self.heads += 1

    def share(self, key: Hashable) -> float:
        """Joules of ``key`` over the live slices so far."""
        return self._joules.get(key, 0.0)

    def forget(self, key: Hashable) -> None:
        self._joules.pop(key, None)

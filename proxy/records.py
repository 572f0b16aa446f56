"""Per-request records in memory, for ``GET /v1/energy/{id}`` and for settling metrics."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from wattgate.meter.footprint import GridIntensity
from wattgate.proxy.figures import Energy


@dataclass(slots=True)
class Record:
    request_id: str  # as the client knows it (unique within its team)
    model: str
    team: str | None
    energy: Energy | None = None  # its latest figures (None: none yet)
    grid: GridIntensity | None = None  # the grid's intensity when the request ended (None: the zone's average)
    idle_per_joule: dict[int, float] | None = None  # each GPU's idle share per joule then (Books.idle_per_joule)


def record_key(team: str | None, request_id: str) -> str:
    """A record's key: its request id within its team (ids have no "/", so the last one splits)."""
    return request_id if team is None else f"{team}/{request_id}"


class Records:
    """A thread-safe map of :func:`record_key` to :class:`Record`.

    A record is held until its request settles, however many there are: dropping
    it earlier would lose the request's settled figure (its ledger row, its
    metrics). Once settled, only the ``keep_settled`` most recent are kept (oldest
    dropped first); with a ledger, older ones are read from it.
    """

    def __init__(self, keep_settled: int) -> None:
        self.keep_settled = keep_settled
        self._open: dict[str, Record] = {}
        self._settled: OrderedDict[str, Record] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, request_id: str, model: str, team: str | None) -> str | None:
        """Add the record of ``team``'s ``request_id``; its key, or None (changing nothing) when taken."""
        key = record_key(team, request_id)
        with self._lock:
            if key in self._open or key in self._settled:
                return None
            self._open[key] = Record(request_id, model, team)
            return key

    def update(self, key: str, energy: Energy) -> Record | None:
        """Store figures unless final ones are already there; return the record. Final: settled, or
        never to be (the ledger gave the record up: ``stored: false``)."""
        with self._lock:
            rec = self._open.get(key)
            if rec is None:
                return self._settled.get(key)
            rec.energy = energy
            if energy.get("settled") or energy.get("stored") is False:
                del self._open[key]
                self._settled[key] = rec
                while len(self._settled) > self.keep_settled:
                    self._settled.popitem(last=False)
            return rec

    def get(self, key: str) -> Record | None:
        with self._lock:
            return self._open.get(key) or self._settled.get(key)

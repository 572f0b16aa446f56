"""Recent per-request records, for ``GET /v1/energy/{id}`` and for settling metrics."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Record:
    model: str
    team: str | None
    energy: dict[str, Any] = field(default_factory=dict)


class Records:
    """A bounded, thread-safe map of request id to :class:`Record` (oldest dropped first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Record] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, request_id: str, model: str, team: str | None) -> bool:
        """Add a record under ``request_id``; False, changing nothing, when one is already there."""
        with self._lock:
            if request_id in self._items:
                return False
            self._items[request_id] = Record(model, team)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return True

    def update(self, request_id: str, energy: dict[str, Any]) -> Record | None:
        """Store figures unless a settled figure is already there; return the record."""
        with self._lock:
            rec = self._items.get(request_id)
            if rec is not None and not rec.energy.get("settled"):
                rec.energy = energy
            return rec

    def get(self, request_id: str) -> Record | None:
        with self._lock:
            return self._items.get(request_id)

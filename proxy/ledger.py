"""The durable per-request ledger: one row per settled request, in a SQLite file or a PostgreSQL
database (:mod:`proxy.ledger_store`).

One writer thread drains a bounded queue (settling never waits on the database) and writes batches
of up to 500 rows in one transaction. Prompts and keys are never stored; the team is the key's alias.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from wattgate.proxy.figures import Energy, energy_from_record
from wattgate.proxy.ledger_rows import from_row
from wattgate.proxy.ledger_store import RowsRefused, Store, StoreUnavailable

log = logging.getLogger(__name__)

#: A queued row and what runs once it is committed (True) or given up (False).
_Item = tuple[tuple[Any, ...], Callable[[bool], object] | None]
RETRY_S = (1.0, 30.0)  # first and longest wait before writing again after a write failed
SUMMARY_S = 60.0  # while writes fail, how often the log says how it stands


def _run(callback: Callable[[bool], object] | None, stored: bool) -> None:
    if callback is not None:
        try:
            callback(stored)
        except Exception:
            log.exception("ledger commit callback failed")


class Ledger:
    """Asynchronous writer of settled records; ``on_drop`` is called for each record given up.

    A record is reported stored (its ``after`` gets True) only once committed. A write the database
    fails for want of room or access (a full disk, a read-only file, a database server restarting) is
    not the records' fault: they wait and are written again, every 1 s at first and at most every 30 s, as many as the queue holds;
    beyond that the oldest are given up, counted, and their ``after`` gets False. A row the database
    refuses for itself (a constraint) is given up at once. The log says when writing fails and when it
    works again, and while it fails, how it stands every minute: not a line per record.
    """

    def __init__(self, store: Store, queue_size: int = 10_000, on_drop: Callable[[], object] | None = None) -> None:
        self.store = store
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._waiting: deque[_Item] = deque()  # rows whose write failed, to be written again (writer thread only)
        self._max_waiting = queue_size
        self.on_drop = on_drop
        self.dropped = 0
        self.stored = 0
        self.last_error: str | None = None  # None: the last write worked
        self._retry_wait = RETRY_S[0]
        self._retry_at = 0.0
        self._summary_at = 0.0
        self._queue_full_said = False
        self._thread = threading.Thread(target=self._write_loop, name="wattgate-ledger", daemon=True)
        self._thread.start()

    def submit(self, row: tuple[Any, ...], after: Callable[[bool], object] | None = None) -> bool:
        """Queue a row; ``after(stored)`` runs once it is committed (True) or given up (False).

        False (and counted) when the queue is full; ``after(False)`` then runs at once.
        """
        try:
            self._queue.put_nowait((row, after))
            return True
        except queue.Full:
            if not self._queue_full_said:  # once, until a write works again
                self._queue_full_said = True
                log.error("ledger: queue full (%d records): records are not stored until it drains; "
                          "wattgate_ledger_dropped_records_total counts them", self._queue.maxsize)
            self._give_up([(row, after)])
            return False

    def state(self) -> dict[str, Any]:
        """For ``/readyz``: whether writes work, the last error, and the records queued, waiting and given up."""
        return {"state": "ok" if self.last_error is None else "failing", self.store.kind: self.store.where,
                "last_error": self.last_error, "queued": self._queue.qsize(), "waiting": len(self._waiting),
                "stored": self.stored, "dropped": self.dropped}

    def _give_up(self, items: list[_Item]) -> None:
        self.dropped += len(items)
        for _, after in items:
            if self.on_drop is not None:
                self.on_drop()
            _run(after, False)

    def _write_loop(self) -> None:
        stop = False
        while not stop:
            wait = max(self._retry_at - time.monotonic(), 0.0) if self._waiting else None
            batch, stop = self._take(wait)
            if self._waiting and (stop or time.monotonic() >= self._retry_at):
                batch = [*self._waiting, *batch]  # the oldest first
                self._waiting.clear()
            elif self._waiting:  # writes are failing and it is not yet time to try again: these wait too
                self._wait(batch)
                continue
            if batch:
                self._commit(batch)
        if self._waiting:
            log.error("ledger: %d records could not be stored in %s before the gateway stopped (%s)",
                      len(self._waiting), self.store.where, self.last_error)
            self._give_up(list(self._waiting))

    def _take(self, wait: float | None) -> tuple[list[_Item], bool]:
        """What is queued, up to 500 rows (waiting up to ``wait`` s for the first; None: as long as it
        takes); and whether the ledger is closing."""
        batch: list[_Item] = []
        try:
            item = self._queue.get(timeout=wait) if wait is None or wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return batch, False
        while item is not None:
            batch.append(item)
            if len(batch) >= 500:
                return batch, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _commit(self, batch: list[_Item]) -> None:
        try:
            self.store.write([row for row, _ in batch])
        except StoreUnavailable as exc:  # no room, no access, not reachable: the rows wait for the next try
            self._failed(exc, batch)
            return
        except RowsRefused:
            self._one_by_one(batch)  # one row the database refuses must not cost the others
            return
        self._committed(batch)

    def _one_by_one(self, batch: list[_Item]) -> None:
        for i, item in enumerate(batch):
            try:
                self.store.write([item[0]])
            except StoreUnavailable as exc:
                self._failed(exc, batch[i:])
                return
            except RowsRefused as exc:
                log.error("ledger: record %s refused by the database, not stored: %s", item[0][0], exc)
                self._give_up([item])
            else:
                self._committed([item])

    def _committed(self, batch: list[_Item]) -> None:
        self.stored += len(batch)
        if self.last_error is not None:
            log.warning("ledger: writing to %s again (%s before); the records kept meanwhile are stored",
                        self.store.where, self.last_error)
            self.last_error, self._retry_wait = None, RETRY_S[0]
        self._queue_full_said = False
        for _, after in batch:
            _run(after, True)

    def _failed(self, exc: StoreUnavailable, batch: list[_Item]) -> None:
        now = time.monotonic()
        if self.last_error is None:
            log.error("ledger: cannot write to %s: %s; records wait and are written again once it works "
                      "(at most %d; /readyz shows the ledger's state)", self.store.where, exc, self._max_waiting)
            self._summary_at = now + SUMMARY_S
        elif now >= self._summary_at:
            log.error("ledger: still cannot write to %s: %s; %d records waiting, %d given up so far",
                      self.store.where, exc, len(self._waiting) + len(batch), self.dropped)
            self._summary_at = now + SUMMARY_S
        self.last_error = str(exc)
        self._retry_at = now + self._retry_wait
        self._retry_wait = min(self._retry_wait * 2, RETRY_S[1])
        self._wait(batch)

    def _wait(self, batch: list[_Item]) -> None:
        """Keep ``batch`` for the next try; beyond the bound, the oldest are given up."""
        self._waiting.extend(batch)
        if (over := len(self._waiting) - self._max_waiting) > 0:
            self._give_up([self._waiting.popleft() for _ in range(over)])

    def get(self, request_id: str, team: str | None = None, *, any_team: bool = False) -> dict[str, Any] | None:
        """The record of ``request_id`` sent by ``team`` (None: without a key), or by any team (the latest).
        Raises :class:`StoreUnavailable` when the database cannot answer now."""
        row = self.store.get(request_id, team, any_team)
        return from_row(row) if row else None

    def energy(self, request_id: str, team: str | None = None, *, any_team: bool = False) -> Energy | None:
        """:meth:`get`'s record as the energy object (the same keys as a response's)."""
        record = self.get(request_id, team, any_team=any_team)
        return None if record is None else energy_from_record(record)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then close."""
        self._queue.put(None)
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():  # closing the database under the writer would fail its commit
            log.error("ledger: still writing after %g s, %d records queued; those not committed at exit are lost",
                      timeout, self._queue.qsize())
            return
        self.store.close()

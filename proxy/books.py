"""The gateway's books: the meter, the per-request records, the metrics and the ledger.

One :class:`Books` exists per gateway: in the single process, or in the hub of a
multi-worker gateway (:mod:`proxy.hub`), where every worker's calls reach the same
meter. A call's window and record are opened with :meth:`Books.open`, which gives
the call a :class:`~proxy.calls.CallWindow`: what the relay and the exchange feed tokens
to and close. The hub's workers hold a remote window of the same shape (:mod:`proxy.hub_link`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from functools import partial
from typing import Any

from wattgate.meter import Fault, GpuTotals, Measurement, Meter, Method, RequestWindow, Status
from wattgate.meter.sources.simulated import SimulatedGpu
from wattgate.proxy.calls import new_request_id
from wattgate.proxy.figures import Energy, energy_object
from wattgate.proxy.grid import GridFeed, provider_from
from wattgate.proxy.ledger import Ledger
from wattgate.proxy.ledger_rows import to_row
from wattgate.proxy.ledger_store import StoreUnavailable, open_store
from wattgate.proxy.metering import site_factors
from wattgate.proxy.metrics import Metrics
from wattgate.proxy.records import Records
from wattgate.proxy.settings import Model, Settings, gateway_id

log = logging.getLogger("wattgate")

# Settled records kept in memory with the ledger on (it answers for older ones): about 1 KB each.
RECENT_WITH_LEDGER = 1_000


class IdlePeriod:
    """Idle energy per attributed joule over a trailing period, per GPU, from the meter's running totals.

    Marks of the totals are kept every period/:data:`MARKS` (at request ends, so a quiet GPU keeps none);
    the ratio runs from the newest mark at least a period old. A GPU's first mark is its first request's
    end, with nothing attributed before it: the idle time before a GPU's first request is nobody's, and
    until a period has passed the ratio covers all the time since."""

    MARKS = 96  # a quarter of an hour apart over the default 24 h

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._marks: dict[int, deque[tuple[float, float, float]]] = {}  # (time, idle, attributed) per GPU

    def per_joule(self, totals: dict[int, GpuTotals], now: float) -> dict[int, float]:
        ratios = {}
        for g, t in totals.items():
            marks = self._marks.setdefault(g, deque([(now, t.idle, 0.0)]))
            if now - marks[-1][0] >= self.period_s / self.MARKS:
                marks.append((now, t.idle, t.attributed))
            while len(marks) > 1 and marks[1][0] <= now - self.period_s:
                marks.popleft()
            _, idle_then, attributed_then = marks[0]
            attributed = t.attributed - attributed_then
            ratios[g] = (t.idle - idle_then) / attributed if attributed > 0 else 0.0
        return ratios


class Books:
    """The meter, the records, the metrics and the ledger of one gateway."""

    def __init__(self, settings: Settings, meter: Meter, drive: dict[int, SimulatedGpu], teams: list[str]) -> None:
        self.settings = settings
        self.gateway_id = gateway_id(settings)
        self.site = site_factors(settings)
        self.meter = meter
        self.drive = drive  # simulated GPUs whose load follows the gateway's requests
        provider = settings.site.grid_provider
        grid_provider = provider_from(provider)
        self.metrics = Metrics(settings.models, meter, teams=teams,
                               grid_source=None if grid_provider is None else grid_provider.name)
        with_ledger = settings.ledger.enabled
        self.records = Records(min(settings.gateway.recent_records, RECENT_WITH_LEDGER) if with_ledger
                               else settings.gateway.recent_records)
        self.in_flight: Counter[str] = Counter()  # gateway requests open per registry model
        self.ledger = (
            Ledger(open_store(settings.ledger), settings.ledger.queue_size, self.metrics.count_dropped)
            if settings.ledger.enabled
            else None
        )
        self.grid = GridFeed(self.site.location, grid_provider, provider.poll_s, provider.max_age_s,
                             self.metrics.count_grid_error)
        self._idle_period = IdlePeriod(settings.meter.idle_period_h * 3600)
        self.estimates = Meter(None, on_settled=self.settled)  # windows for when the meter itself fails
        meter.connect(self.settled, self.metrics.count_meter_error)

    def start(self) -> None:
        self.meter.start()

    def observe_loop_lag(self, seconds: float) -> None:  # a CallOpener: the event loop's lag is counted where the books are
        self.metrics.observe_loop_lag(seconds)

    def stop(self) -> None:
        self.meter.stop()  # settles what it can: those records still reach the ledger
        if self.ledger is not None:
            self.ledger.close()

    # -- settled figures (called from the meter's thread) ------------------------

    def settled(self, m: Measurement) -> None:
        rec = self.records.get(m.request_id)  # the window is named by the record's key
        if rec is None:
            return
        idle_j = self.idle_share(m, rec.idle_per_joule)
        energy = energy_object(m, self.site, rec.request_id, rec.grid, idle_j)
        if self.ledger is None:
            self.records.update(m.request_id, energy)
        else:
            # The API calls a record settled only once it is durable: a crash loses no settled record.
            gpu_joules = {g: round(j, 6) for g, j in m.joules_by_gpu.items() if g >= 0}
            row = to_row(energy, rec.model, rec.team, time.time(), gpu_joules, idle_j, self.gateway_id)
            self.ledger.submit(row, after=lambda stored: self.records.update(
                m.request_id, energy if stored else {**energy, "settled": False, "stored": False}))
        # Metrics after the record: if they fail, the record is kept all the same.
        self.metrics.count_settled(rec.model, rec.team, m.method, m.joules, m.completion_tokens, energy["gco2e"],
                                   energy["water_ml"])

    def idle_per_joule(self) -> dict[int, float]:
        """Each GPU's idle energy per joule attributed on it over the trailing ``meter.idle_period_h``
        (:class:`IdlePeriod`): what a request ending now carries in the SCI's widest tier per joule of
        its own there (with ``meter.idle: amortize``, nothing more: its joules hold the idle energy already)."""
        if self.settings.meter.idle == "amortize":
            return {}
        return self._idle_period.per_joule(self.meter.gpu_totals(), time.monotonic())

    @staticmethod
    def idle_share(m: Measurement, per_joule: dict[int, float] | None) -> float:
        """The idle joules ``m`` carries at the GPUs' ``per_joule`` ratios (a measured figure only)."""
        if not per_joule or m.method is Method.ESTIMATE:
            return 0.0
        return sum(j * per_joule.get(g, 0.0) for g, j in m.joules_by_gpu.items())

    # -- calls -------------------------------------------------------------------

    async def open(
        self, request_id: str, client_chose: bool, name: str, team: str | None, prompt_tokens: int,
        t: float | None = None,
    ) -> LocalCall:
        """Open the record and the window of a call to registry model ``name``."""
        request_id, key = await self.open_record(request_id, client_chose, name, team)
        model = self.settings.models[name]
        window = self.begin(key, name, model, prompt_tokens, t)
        return LocalCall(request_id, key, window, finish=partial(self.finish, name, model),
                         method=partial(self.method_for, model))

    async def open_record(
        self, request_id: str, client_chose: bool, name: str, team: str | None
    ) -> tuple[str, str]:
        """Open the record of ``team``'s request under ``request_id``, or under a new id when that one
        already names one of the team's records (a client reusing its ids must not overwrite what was
        metered); the id used and the record's key. Other teams' ids are not looked at: two teams may
        send the same id, and neither learns of the other's."""
        if client_chose:
            try:
                if await self.stored(request_id, team, any_team=False) is not None:
                    request_id = new_request_id()
            except StoreUnavailable as exc:  # the id is used unchecked: the call must not wait on the database
                log.warning("ledger: a client's request id went unchecked (the ledger could not answer: %s)", exc)
        while (key := self.records.open(request_id, name, team)) is None:
            request_id = new_request_id()
        return request_id, key

    async def stored(self, request_id: str, team: str | None, *, any_team: bool) -> Energy | None:
        """The energy object of the ledger's record of ``team``'s ``request_id`` (any team's with
        ``any_team``), read off the event loop (a commit may hold the database). With a shared ledger,
        any gateway's record. Raises :class:`StoreUnavailable` when the database cannot answer now."""
        if self.ledger is None:
            return None
        return await asyncio.to_thread(self.ledger.energy, request_id, team, any_team=any_team)

    async def summary(self, by: str, team: str | None, since_s: float | None) -> list[dict[str, Any]]:
        """``wattgate report``'s totals of the ledger by ``by`` (``team``'s records only, when given),
        read on a connection of its own off the event loop; [] without a ledger. With a shared ledger,
        the fleet's. Raises :class:`StoreUnavailable` when the database cannot answer now."""
        if self.ledger is None:
            return []
        return await asyncio.to_thread(self.ledger.store.totals, by, since_s, team)

    def begin(self, key: str, name: str, model: Model, prompt_tokens: int, t: float | None = None) -> RequestWindow:
        self.in_flight[name] += 1
        for g in model.gpus:
            if g in self.drive:
                self.drive[g].begin_sequence()
        kwargs = {
            "prompt_tokens": prompt_tokens,
            "prefill_weight": model.prefill_weight,
            "active_params_b": model.estimate.active_params_b,
            "t": t,
        }
        try:
            return self.meter.begin(key, model.gpus, **kwargs)  # type: ignore[arg-type]
        except Exception:  # metering never fails a request: fall back to an estimate
            log.exception("meter failed to open a window")
            self.metrics.count_meter_error(Fault.INTERNAL)
            return self.estimates.begin(key, model.gpus, **kwargs)  # type: ignore[arg-type]

    def method_for(self, model: Model) -> Method:
        """The method a call to ``model`` starting now is metered by."""
        return self.meter.method_for(model.gpus)

    def finish(self, name: str, model: Model, m: Measurement, status: Status, latency_s: float) -> dict[str, Any]:
        """An ended call's window leaves the gateway's load; the call is recorded (:meth:`record`)."""
        self.in_flight[name] -= 1
        for g in model.gpus:
            if g in self.drive:
                self.drive[g].end_sequence()
        return self.record(name, m, status, latency_s)

    def record(self, name: str, m: Measurement, status: Status, latency_s: float) -> dict[str, Any]:
        """Count an ended call and store its figure in its record; its energy object."""
        self.metrics.count_call(name, status, m.prompt_tokens, m.completion_tokens, latency_s)
        rec = self.records.get(m.request_id)  # the window is named by the record's key
        # The intensity in force as it ended, and the GPUs' idle ratios then: its settled figure uses the same.
        grid, idle = self.grid.at(), self.idle_per_joule()
        if rec is not None:
            rec.grid, rec.idle_per_joule = grid, idle
        energy = energy_object(m, self.site, None if rec is None else rec.request_id, grid, self.idle_share(m, idle))
        if m.settled and self.ledger is not None:
            # Final already (an estimate), but the API says settled only once the ledger has it.
            self.records.update(m.request_id, {**energy, "settled": False})
            return energy
        rec = self.records.update(m.request_id, energy)
        return rec.energy if rec is not None and rec.energy else energy


class LocalCall:
    """A call's window on the meter of this process (see :class:`CallWindow`): ``finish`` records its
    measurement once it ends (:meth:`Books.finish`) and gives its energy object, ``method`` says how
    calls to its model are metered now."""

    __slots__ = (
        "_energy",
        "_finish",
        "_method",
        "completed",
        "key",
        "opened_at",
        "request_id",
        "tokens",
        "usage",
        "window",
    )

    def __init__(self, request_id: str, key: str, window: RequestWindow,
                 finish: Callable[[Measurement, Status, float], dict[str, Any]], method: Callable[[], Method]) -> None:
        self.request_id = request_id
        self.key = key
        self.window = window
        self._finish = finish
        self._method = method
        # The window's own methods: a stream calls ``tokens`` per read, without a wrapper in between.
        self.tokens = window.tokens
        self.completed = window.completed
        self.usage = window.usage
        self.opened_at = time.monotonic()
        self._energy: dict[str, Any] | None = None

    @property
    def method(self) -> Method:
        return self._method()

    def end(self, status: Status, t: float | None = None, latency_s: float | None = None) -> None:
        """Close the window at ``t`` (now by default); ``latency_s``: from forwarding to the end, when
        measured elsewhere (a hub's worker)."""
        if self._energy is None:
            m = self.window.end(status, t)
            latency_s = time.monotonic() - self.opened_at if latency_s is None else latency_s
            self._energy = self._finish(m, status, latency_s)

    async def energy(self) -> dict[str, Any]:
        assert self._energy is not None, "energy() before end()"
        return self._energy

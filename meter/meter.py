"""The meter: request windows in, measured energy per request out.

Usage (the proxy does exactly this)::

    meter = Meter(NvmlSource([0]), gpus=[0], on_settled=store)
    meter.start()
    w = meter.begin("req-1", gpus=(0,), prompt_tokens=41)
    w.tokens(1)            # at every streamed chunk
    w.usage(41, 120)       # exact counts when the upstream reports them
    provisional = w.end()  # never waits for the counter
    # later, from the sampler thread: store(settled Measurement)

Energy is attributed per GPU slice by slice with
:func:`meter.attribution.split_arrays`. Each slice is attributed once, when the
counter has passed it and the work of every request on the GPU in it is known
(or ``settle_lag_s`` has passed), so figures of overlapping requests always add
up to what was measured. The provisional figure :meth:`RequestWindow.end` returns
comes from a second, live split of the same energy, made after every poll with
what is known then (:mod:`meter.live`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from wattgate.meter.gpu import COMPACT_AFTER, GpuState, GpuTotals, compact
from wattgate.meter.host import HostPower
from wattgate.meter.kinds import Fault, Method, Status
from wattgate.meter.sampler import Sampler
from wattgate.meter.sources import PowerSource
from wattgate.meter.window import Measurement, Request, measurement, token_count

__all__ = ["GpuTotals", "Measurement", "Meter", "RequestWindow", "token_count"]

log = logging.getLogger(__name__)


class RequestWindow:
    """One request's window; the proxy calls :meth:`tokens` and :meth:`end`."""

    __slots__ = ("_meter", "_req")

    def __init__(self, meter: Meter, req: Request) -> None:
        self._meter = meter
        self._req = req

    @property
    def request_id(self) -> str:
        return self._req.request_id

    def tokens(self, n: float = 1, t: float | None = None) -> None:
        """Record ``n`` tokens that arrived at ``t`` (now by default).

        Called per streamed chunk, so ``n`` is not checked: pass a count from
        an upstream through :func:`token_count` first.
        """
        req = self._req
        t = self._meter.clock() if t is None else t
        if not req.times:
            self._meter._first_token(req, t)
        req.times.append(t)
        req.counts.append(n)

    def completed(self, n: int) -> None:
        """A plain (non-streamed) response with ``n`` tokens, whose arrival times the gateway cannot see.

        When the window ends its first token is placed where the GPU's streams have lately seen
        theirs (their time to first token) and the rest evenly up to the end: the shape a stream
        of the same request would have had, so streamed and plain requests doing the same work
        get the same share. Pass a count from an upstream through :func:`token_count` first.
        """
        self._req.unseen_tokens += n

    def usage(self, prompt_tokens: object, completion_tokens: object) -> None:
        """Exact token counts from the upstream's usage report; what is not a count is ignored."""
        prompt, completion = token_count(prompt_tokens), token_count(completion_tokens)
        if prompt is not None:
            self._req.prompt_tokens = prompt
        if completion is not None:
            self._req.completion_tokens = completion

    def end(self, status: Status = Status.OK, t: float | None = None) -> Measurement:
        """Close the window and return the provisional measurement; never raises."""
        meter, req = self._meter, self._req
        try:
            return meter._end(req, status, meter.clock() if t is None else t)
        except Exception:  # a meter bug must not fail the request: settle it now, as an estimate
            log.exception("meter failed to close window %s", req.request_id)
            meter._count_error(Fault.INTERNAL)
            with meter._lock:
                req.fault, req.status = Fault.INTERNAL, status
                req.end = req.end if req.end is not None else meter.clock()
                settled = meter._settle(req)
            meter._emit([settled])
            return settled


class Meter:
    """Attributes the energy of a set of GPUs to request windows.

    ``source`` None (or no GPUs) makes every figure an estimate.
    ``counter_every_s``: read the energy counter only this often and place its
    energy with instantaneous power (see :class:`~meter.sampler.Sampler`); None
    reads it at every poll; ``counter_cpu_budget`` lets the sampler choose that
    interval from what a counter read costs; ``power_lag_s``: how late the power
    sensor reports a change of load (see the sampler). Settling then waits for the next
    counter read, and a GPU is stale after ``stale_after_s`` plus that interval. ``idle`` is
    ``exclude`` or ``amortize``. Settled measurements are passed to
    ``on_settled`` from the sampler thread; faults to ``on_error`` by kind.
    """

    def __init__(
        self,
        source: PowerSource | None,
        gpus: Iterable[int] = (),
        *,
        interval_s: float = 0.05,
        idle: str = "exclude",
        settle_lag_s: float = 10.0,
        settle_every_s: float = 0.25,
        counter_every_s: float | None = None,
        counter_cpu_budget: float | None = None,
        power_lag_s: float = 0.0,
        stale_after_s: float = 2.0,
        horizon_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.thread_time,
        on_settled: Callable[[Measurement], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        host: HostPower | None = None,
    ) -> None:
        if idle not in ("exclude", "amortize"):
            raise ValueError(f"idle must be 'exclude' or 'amortize', not {idle!r}")
        self.clock = clock
        self.source = source
        gpus = set(gpus)  # read once: it may be an iterator
        # GPUs the source sees but cannot meter per request (MIG): their requests are estimated.
        self.unmeasured = {g: why for g, why in source.unmeasurable.items() if g in gpus} if source is not None else {}
        self.gpus = tuple(sorted(gpus - set(self.unmeasured))) if source is not None else ()
        self.method = source.method if source is not None and self.gpus else Method.ESTIMATE
        self.amortize = idle == "amortize"
        self.settle_lag_s = settle_lag_s
        self.settle_every_s = settle_every_s
        self._last_advance = -float("inf")
        self._last_live = -float("inf")
        self.stale_after_s = stale_after_s
        self.on_settled = on_settled
        self.on_error = on_error
        self.host = host
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._requests: dict[str, Request] = {}
        self._ended: set[str] = set()
        self._gpu = {g: GpuState() for g in self.gpus}
        self.sampler: Sampler | None = None
        if self.gpus:
            self.sampler = Sampler(
                source,  # type: ignore[arg-type]
                self.gpus,
                interval_s,
                horizon_s,
                clock=clock,
                after_poll=self._after_poll,
                counter_every_s=counter_every_s,
                counter_cpu_budget=counter_cpu_budget,
                cpu_clock=cpu_clock,
                power_lag_s=power_lag_s,
            )
            self.sampler.on_error = self._count_error
        self._started = False
        self._created_at = clock()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the sampler thread."""
        if self.sampler is not None:
            self.sampler.start()
        self._started = True

    def stop(self) -> None:
        """Stop sampling, settle what can be settled, close the source."""
        if self.sampler is not None:
            self.sampler.stop()
            self.advance()
        if self.source is not None:
            self.source.close()

    def _after_poll(self) -> None:
        # Attribution costs per participant and call: batch it rather than run it every poll.
        # Each pass walks every open request, so with many open both passes run less often (up
        # to 4x their period from 1000 open): the cost per request stays flat, figures settle at
        # most a second later, and provisional ones split up to 0.2 s more of a window by heads.
        now = self.clock()
        spread = min(max(1.0, len(self._requests) / 250), 4.0)
        assert self.sampler is not None
        # The live split first: requests that ended since the last one are still in the meter.
        if now - self._last_live >= self.sampler.interval_s * (spread - 0.5):
            self._last_live = now
            self._live_locked()
        if now - self._last_advance >= self.settle_every_s * spread:
            self._emit(self._advance_locked())

    def state(self) -> dict[str, object]:
        """Meter health for ``/readyz``."""
        now = self.clock()
        gpus = {}
        for g, st in self._gpu.items():
            last = self.sampler.last_ok(g) if self.sampler else None
            agreement = self.sampler.power_vs_counter(g) if self.sampler else None
            gpus[str(g)] = {
                "fault": st.faulted,
                "last_reading_age_s": None if last is None else round(now - last, 3),
                "power_vs_counter": None if agreement is None else round(agreement, 3),
            }
        sampler_ok = self.sampler is None or not self._started or self.sampler.alive
        # "init": the configured source could not start and every figure is an estimate.
        ok = sampler_ok and "init" not in self.errors and all(v["fault"] is None for v in gpus.values())
        return {
            "method": self.method,
            "ok": ok,
            "sampler_alive": sampler_ok,
            "counter_interval_s": None if self.sampler is None else round(self.sampler.counter_period_s, 3),
            "gpus": gpus,
            "unmeasurable_gpus": {str(g): why for g, why in self.unmeasured.items()},
            "open_requests": len(self._requests) - len(self._ended),
            "unsettled_requests": len(self._ended),
            "errors": dict(self.errors),
        }

    def gpu_totals(self) -> dict[int, GpuTotals]:
        with self._lock:
            return {g: st.totals(self.sampler.power_w(g) if self.sampler else None) for g, st in self._gpu.items()}

    # -- request windows ---------------------------------------------------------

    def begin(
        self,
        request_id: str,
        gpus: Sequence[int] = (),
        *,
        prompt_tokens: int = 0,
        prefill_weight: float = 0.2,
        active_params_b: float = 8.0,
        t: float | None = None,
    ) -> RequestWindow:
        """Open the window of one request on ``gpus`` (empty: estimate only).

        Raises ValueError if a window of ``request_id`` is still in the meter (open, or ended and
        not yet settled): the two would share one slot.
        """
        if request_id in self._requests:
            raise ValueError(f"a window of request {request_id!r} is already open")
        req = Request(
            request_id,
            tuple(gpus),
            self.clock() if t is None else t,
            prefill_weight,
            active_params_b,
            prompt_tokens,
        )
        # No GPUs or no sampler: a plain estimate (no meter for these GPUs, counted once, at start-up).
        if req.gpus and self.sampler is not None:
            req.fault = self._cannot_meter(req.gpus)
            if req.fault not in (None, Fault.UNMEASURABLE):  # unmeasurable: a known property of the GPU, not an error
                self._count_error(req.fault)
        with self._lock:
            self._requests[request_id] = req
            for g in req.gpus:
                if g in self._gpu:
                    self._busy(g, +1, req.start)
                    self._gpu[g].requests.add(request_id)
                    self._gpu[g].live.began()
        return RequestWindow(self, req)

    def _busy(self, g: int, change: int, t: float) -> None:
        """Count a request in or out of GPU ``g``; tell the sampler when the GPU turns busy or idle."""
        st = self._gpu[g]
        st.running += change
        if self.sampler is not None and st.running == (1 if change > 0 else 0):
            self.sampler.mark(g, t)

    def _cannot_meter(self, gpus: Sequence[int]) -> Fault | None:
        """Why a request on ``gpus`` starting now cannot be metered (its fault kind), or None."""
        assert self.sampler is not None
        if any(g in self.unmeasured for g in gpus):
            return Fault.UNMEASURABLE
        if any(g not in self._gpu for g in gpus):
            return Fault.UNMETERED_GPU
        if self._started and not self.sampler.alive:
            return Fault.SAMPLER_DEAD
        return None

    def method_for(self, gpus: Sequence[int]) -> Method:
        """The method a request on ``gpus`` starting now gets, unless the meter faults during it."""
        if not gpus or self.sampler is None or self._cannot_meter(gpus) is not None:
            return Method.ESTIMATE
        # A GPU already faulted (stale) gives its requests estimates when they end.
        return Method.ESTIMATE if any(self._gpu[g].faulted for g in gpus) else self.method

    def report_foreign(self, gpus: Sequence[int], sequences: int, t0: float, t1: float) -> None:
        """Record ``sequences`` running on ``gpus`` over ``[t0, t1)`` that did not come through the gateway."""
        if sequences <= 0:
            return
        with self._lock:
            for g in gpus:
                if g in self._gpu:
                    self._gpu[g].foreign.append((t0, t1, sequences))

    def _estimated(self, req: Request) -> bool:
        return req.fault is not None or not req.gpus or self.sampler is None

    def _end(self, req: Request, status: Status, t: float) -> Measurement:
        settled: Measurement | None = None
        with self._lock:
            if req.end is not None:  # ended twice: keep the first
                return self._provisional(req)
            req.end = max(t, req.start)
            req.status = status
            for g in req.gpus:
                if g in self._gpu:
                    self._busy(g, -1, req.end)
            req.reconcile_tokens()
            if req.unseen_tokens:
                req.place_unseen([st.ttft_s for g in req.gpus if (st := self._gpu.get(g)) is not None and st.ttft_s is not None])
            if not self._estimated(req):
                stale = [g for g in req.gpus if self._stale(g, self.clock())]
                if stale:  # no fresh reading: do not hand out a figure the meter cannot back
                    req.fault = self._gpu[stale[0]].faulted or Fault.STALE
            if self._estimated(req):
                settled = self._settle(req)
                result = settled
            else:
                self._ended.add(req.request_id)
                result = self._provisional(req)
        if settled is not None:
            self._emit([settled])
        return result

    def _first_token(self, req: Request, t: float) -> None:
        """Keep each GPU's recent time to first token (TTFT), to shape plain responses like streams."""
        if t >= req.start:
            for g in req.gpus:
                if (st := self._gpu.get(g)) is not None:
                    st.first_token(t - req.start)

    # -- attribution -------------------------------------------------------------

    def advance(self) -> list[Measurement]:
        """Attribute every slice that can be attributed now; return (and emit) what settled."""
        settled = self._advance_locked()
        self._emit(settled)
        return settled

    def _advance_locked(self) -> list[Measurement]:
        if self.sampler is None:
            return []
        with self._lock:
            now = self._last_advance = self.clock()
            for g, st in self._gpu.items():
                try:
                    self._advance_gpu(g, st, now)
                except Exception:  # a bug or a bad window must not stop attribution for good
                    log.exception("meter: attribution failed on GPU %d; its requests fall back to estimates", g)
                    self._count_error(Fault.INTERNAL)
                    st.drop_slice(self._requests, self.sampler.last_sample_time(g))
            return [self._settle(self._requests[rid]) for rid in list(self._ended) if self._can_settle(rid)]

    def _advance_gpu(self, g: int, st: GpuState, now: float) -> None:
        assert self.sampler is not None
        if self._stale(g, now):
            if st.faulted is None:
                st.faulted = Fault.STALE
                self._count_error(Fault.STALE)
                log.warning("meter: GPU %d has no fresh reading; its requests fall back to estimates", g)
            st.fault_requests(self._requests, Fault.STALE)
            return
        samples = self.sampler.samples_since(g, st.frontier)
        if not samples:
            return
        if st.faulted is not None:  # readings are back: skip the gap rather than attribute it
            st.faulted = None
            st.frontier = samples[-1][0]
            return
        for req in st.settle_pass(g, samples, self._requests, self.settle_lag_s, self.amortize, self.host,
                                  len(self.gpus)):
            if len(req.times) > 2 * COMPACT_AFTER:  # cheap test first: most requests are short
                compact(req, (self._gpu.get(g) for g in req.gpus))

    def _live_locked(self) -> None:
        """Split each GPU's energy since its last live slice among the requests active in it (see :mod:`meter.live`)."""
        if self.sampler is None:
            return
        with self._lock:
            for g, st in self._gpu.items():
                if st.faulted is not None:
                    continue
                try:
                    if curve := self.sampler.energy_curve(g, st.live.until):
                        st.live_pass(curve, self._requests)
                except Exception:  # provisional figures only: the settled pass is unaffected
                    log.exception("meter: live split failed on GPU %d", g)
                    self._count_error(Fault.INTERNAL)

    def _stale(self, g: int, now: float) -> bool:
        """True when GPU ``g`` has had no successful reading or no counter step for ``stale_after_s``."""
        assert self.sampler is not None
        last_ok, last_step = self.sampler.last_ok(g), self.sampler.last_sample_time(g)
        if last_ok is None or last_step is None:
            return now - self._created_at > self.stale_after_s  # allow start-up time
        return now - min(last_ok, last_step) > self.stale_after_s + self.sampler.counter_period_s

    def _can_settle(self, rid: str) -> bool:
        req = self._requests[rid]
        assert req.end is not None
        for g in req.gpus:
            st = self._gpu[g]
            if st.faulted is None and (st.frontier is None or st.frontier < req.end):
                return False
        return True

    def _measurement(self, req: Request, joules: dict[int, float], settled: bool, host_j: float) -> Measurement:
        return measurement(req, self.method, joules, settled, host_j, self.clock())

    def _provisional(self, req: Request) -> Measurement:
        """The live slices of the window, plus the rest of it split by heads (see :mod:`meter.live`)."""
        assert req.end is not None
        if self._estimated(req):
            return self._measurement(req, {}, settled=False, host_j=0.0)
        assert self.sampler is not None  # else the request is estimated
        joules: dict[int, float] = {}
        for g in req.gpus:
            st, since = self._gpu[g], self._gpu[g].live_since(req)
            joules[g] = st.provisional(req, self.sampler.energy_between(g, since, req.end) if req.end > since else 0.0)
        host = sum(j * self._gpu[g].host_per_gpu_joule for g, j in joules.items())
        return self._measurement(req, joules, settled=False, host_j=host)

    def _settle(self, req: Request) -> Measurement:
        """The final measurement of an ended request, which leaves the meter; never raises."""
        try:
            result = self._measurement(req, dict(req.shares) or {g: 0.0 for g in req.gpus}, True, req.host_j)
        except Exception:  # a window whose figures cannot be computed still gets a record
            log.exception("meter failed to settle %s; settling it as an estimate", req.request_id)
            self._count_error(Fault.INTERNAL)
            req.fault = Fault.INTERNAL
            try:
                result = self._measurement(req, {}, settled=True, host_j=0.0)
            except Exception:  # the estimate failed too: the window, without a figure (logged above)
                end = req.end if req.end is not None else self.clock()
                result = Measurement(req.request_id, {}, Method.ESTIMATE, True, req.start, end, req.prompt_tokens,
                                     req.completion_tokens or 0, req.status, Fault.INTERNAL)
        self._requests.pop(req.request_id, None)
        self._ended.discard(req.request_id)
        for g in req.gpus:
            if g in self._gpu:
                self._gpu[g].requests.discard(req.request_id)
                self._gpu[g].live.forget(req.request_id)
        return result

    # -- callbacks ---------------------------------------------------------------

    def _count_error(self, kind: str) -> None:
        self.errors[kind] += 1
        if self.on_error is not None:
            try:
                self.on_error(kind)
            except Exception:
                log.exception("meter error callback failed")

    def _emit(self, settled: list[Measurement]) -> None:
        if self.on_settled is None:
            return
        for m in settled:
            try:
                self.on_settled(m)
            except Exception:
                log.exception("meter on_settled callback failed")

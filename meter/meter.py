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
up to what was measured. The provisional figure :meth:`~meter.window.RequestWindow.end` returns
comes from a second, live split of the same energy, made after every poll with
what is known then (:mod:`meter.live`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from wattgate.meter.gpu import GpuTotals
from wattgate.meter.host import HostPower
from wattgate.meter.kinds import Fault, Method, Status
from wattgate.meter.passes import MeteredGpus
from wattgate.meter.sampler import Sampler
from wattgate.meter.sources import PowerSource
from wattgate.meter.window import Measurement, Request, RequestWindow, final_measurement, measurement, token_count

__all__ = ["GpuTotals", "Measurement", "Meter", "RequestWindow", "token_count"]

log = logging.getLogger(__name__)


class Meter:
    """Attributes the energy of a set of GPUs to request windows.

    ``source`` None (or no GPUs) makes every figure an estimate.
    ``counter_every_s``: read the energy counter only this often and place its
    energy with instantaneous power (see :class:`~meter.sampler.Sampler`); None
    reads it at every poll; ``counter_cpu_budget`` lets the sampler choose that
    interval from what a counter read costs; ``power_lag_s``: how late the power
    sensor reports a change of load (see the sampler; None: the source's own). Settling then waits for the next
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
        power_lag_s: float | None = None,
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
        self.on_settled = on_settled
        self.on_error = on_error
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._requests: dict[str, Request] = {}
        self._ended: set[str] = set()
        self._started = False
        self.sampler: Sampler | None = None
        self.passes: MeteredGpus | None = None  # None: no GPU metered, every figure an estimate
        if source is not None and self.gpus:
            self.sampler = Sampler(source, self.gpus, interval_s, horizon_s, clock=clock, after_poll=self._after_poll,
                                   counter_every_s=counter_every_s, counter_cpu_budget=counter_cpu_budget,
                                   cpu_clock=cpu_clock, power_lag_s=power_lag_s)
            self.sampler.on_error = self._count_error
            self.passes = MeteredGpus(self.sampler, self.unmeasured, settle_lag_s=settle_lag_s,
                                    settle_every_s=settle_every_s, amortize=idle == "amortize",
                                    stale_after_s=stale_after_s, host=host, count_error=self._count_error,
                                    created_at=clock())

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
        assert self.passes is not None
        live, settle = self.passes.due(self.clock(), len(self._requests))
        if live:  # first: requests that ended since the last live split are still in the meter
            with self._lock:
                self.passes.live(self._requests)
        if settle:
            self._emit(self._advance_locked())

    def state(self) -> dict[str, object]:
        """Meter health for ``/readyz``."""
        gpus = self.passes.health(self.clock()) if self.passes is not None else {}
        sampler_ok = self.sampler is None or not self._started or self.sampler.alive
        # "init": the configured source could not start and every figure is an estimate.
        ok = sampler_ok and Fault.INIT not in self.errors and all(v["fault"] is None for v in gpus.values())
        return {
            "method": self.method,
            "ok": ok,
            "sampler_alive": sampler_ok,
            "counter_interval_s": None if self.sampler is None else round(self.sampler.counter_period_s, 3),
            # How much earlier power readings are placed (the source's own delay unless the registry set one).
            "power_lag_ms": None if self.sampler is None else round(self.sampler.power_lag_s * 1000, 1),
            "gpus": gpus,
            "unmeasurable_gpus": {str(g): why for g, why in self.unmeasured.items()},
            "open_requests": len(self._requests) - len(self._ended),
            "unsettled_requests": len(self._ended),
            "errors": dict(self.errors),
        }

    def gpu_totals(self) -> dict[int, GpuTotals]:
        with self._lock:
            return self.passes.totals() if self.passes is not None else {}

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
        start = self.clock() if t is None else t
        req = Request(request_id, tuple(gpus), start, prefill_weight, active_params_b, prompt_tokens)
        # No GPUs or no sampler: a plain estimate (no meter for these GPUs, counted once, at start-up).
        if req.gpus and self.passes is not None:
            req.fault = self.passes.cannot_meter(req.gpus, self._started)
            if req.fault not in (None, Fault.UNMEASURABLE):  # unmeasurable: a known property of the GPU, not an error
                self._count_error(req.fault)
        with self._lock:
            self._requests[request_id] = req
            if self.passes is not None:
                self.passes.began(req)
        return RequestWindow(self, req)

    def method_for(self, gpus: Sequence[int]) -> Method:
        """The method a request on ``gpus`` starting now gets, unless the meter faults during it."""
        if not gpus or self.passes is None or self.passes.cannot_meter(gpus, self._started) is not None:
            return Method.ESTIMATE
        # A GPU already faulted (stale) gives its requests estimates when they end.
        return Method.ESTIMATE if self.passes.faulted(gpus) else self.method

    def report_foreign(self, gpus: Sequence[int], sequences: int, t0: float, t1: float) -> None:
        """Record ``sequences`` running on ``gpus`` over ``[t0, t1)`` that did not come through the gateway."""
        if sequences > 0 and self.passes is not None:
            with self._lock:
                self.passes.report_foreign(gpus, sequences, t0, t1)

    def _estimated(self, req: Request) -> bool:
        return req.fault is not None or not req.gpus or self.passes is None

    def close(self, req: Request, status: Status, t: float) -> Measurement:
        """Close ``req``'s window at ``t``: its provisional measurement (settled at once for an estimate).
        Never raises: a meter bug must not fail the request, so it is settled now, as an estimate."""
        try:
            return self._end(req, status, t)
        except Exception:
            log.exception("meter failed to close window %s", req.request_id)
            self._count_error(Fault.INTERNAL)
            with self._lock:
                req.fault, req.status = Fault.INTERNAL, status
                req.end = req.end if req.end is not None else self.clock()
                settled = self._settle(req)
            self._emit([settled])
            return settled

    def _end(self, req: Request, status: Status, t: float) -> Measurement:
        settled: Measurement | None = None
        with self._lock:
            if req.end is not None:  # ended twice: keep the first
                return self._provisional(req)
            req.end = max(t, req.start)
            req.status = status
            if self.passes is not None:
                self.passes.ended(req)
            req.reconcile_tokens()
            if not self._estimated(req):  # no fresh reading: do not hand out a figure the meter cannot back
                assert self.passes is not None
                req.fault = self.passes.stale_fault(req, self.clock())
            if self._estimated(req):
                settled = self._settle(req)
                result = settled
            else:
                self._ended.add(req.request_id)
                result = self._provisional(req)
        if settled is not None:
            self._emit([settled])
        return result

    def first_token(self, req: Request, t: float) -> None:
        """``req``'s first token came at ``t``: its prefill ended."""
        if self.passes is not None:
            self.passes.first_token(req, t)

    # -- figures -----------------------------------------------------------------

    def advance(self) -> list[Measurement]:
        """Attribute every slice that can be attributed now; return (and emit) what settled."""
        settled = self._advance_locked()
        self._emit(settled)
        return settled

    def _advance_locked(self) -> list[Measurement]:
        if self.passes is None:
            return []
        with self._lock:
            self.passes.settle(self._requests, self.clock())
            ready = [self._requests[rid] for rid in list(self._ended)]
            return [self._settle(req) for req in ready if self.passes.can_settle(req)]

    def _measurement(self, req: Request, joules: dict[int, float], settled: bool, host_j: float,
                     gpu_seconds: dict[int, float] | None = None) -> Measurement:
        return measurement(req, self.method, joules, settled, host_j, self.clock(), gpu_seconds)

    def _provisional(self, req: Request) -> Measurement:
        """The live slices of the window, plus the rest of it split by heads (see :mod:`meter.live`)."""
        assert req.end is not None
        if self._estimated(req):
            return self._measurement(req, {}, settled=False, host_j=0.0)
        assert self.passes is not None  # else the request is estimated
        joules, seconds = self.passes.provisional(req)
        return self._measurement(req, joules, settled=False, host_j=self.passes.host_share(joules),
                                 gpu_seconds=seconds)

    def _settle(self, req: Request) -> Measurement:
        """The final measurement of an ended request, which leaves the meter; never raises."""
        result = final_measurement(req, self.method, self.clock(), self._count_error)
        self._requests.pop(req.request_id, None)
        self._ended.discard(req.request_id)
        if self.passes is not None:
            self.passes.settled(req)
        return result

    # -- callbacks ---------------------------------------------------------------

    def connect(self, on_settled: Callable[[Measurement], None], on_error: Callable[[str], None]) -> None:
        """Send settled measurements and faults to these from now on. The faults counted before (while
        the meter was built, before its owner could listen) are passed to ``on_error`` at once."""
        with self._lock:
            self.on_settled, self.on_error = on_settled, on_error
            earlier = list(self.errors.elements())
        for kind in earlier:
            on_error(kind)

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

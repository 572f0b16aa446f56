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

import bisect
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from wattgate.meter.attribution import MIN_SPAN_S, split_arrays
from wattgate.meter.estimate import estimate
from wattgate.meter.host import HostPower
from wattgate.meter.live import LiveSplit
from wattgate.meter.sampler import Sampler
from wattgate.meter.sources import PowerSource
from wattgate.meter.work import spans_since

log = logging.getLogger(__name__)

ESTIMATE = "estimate"
COMPACT_AFTER = 256  # a request holds up to twice this many attributed arrivals (see Meter._compact)
MAX_TOKENS = 10**9  # more than any request holds: a larger count from an upstream is nonsense
TTFT_WEIGHT = 0.2  # weight of the newest stream in a GPU's moving-average time to first token


def token_count(value: object) -> int | None:
    """``value`` if it is a token count (an int from 0 to :data:`MAX_TOKENS`), else None.

    Counts come from upstreams, which may be wrong; one stored wrong count would
    break every later attribution pass on its GPU.
    """
    return value if type(value) is int and 0 <= value <= MAX_TOKENS else None


@dataclass(frozen=True, slots=True)
class Measurement:
    """Energy of one request. ``joules_by_gpu`` in joules; times on the monotonic clock (s)."""

    request_id: str
    joules_by_gpu: dict[int, float]
    method: str  # nvml | simulated | trace | estimate
    settled: bool
    start: float
    end: float
    prompt_tokens: int
    completion_tokens: int
    status: str = "ok"
    fault: str | None = None  # why an estimate replaced a measurement
    host_joules: float = 0.0  # host (CPU, DRAM, NIC) share, when host energy is metered

    @property
    def gpu_joules(self) -> float:
        return sum(self.joules_by_gpu.values())

    @property
    def joules(self) -> float:
        """IT energy: GPU plus the host share."""
        return self.gpu_joules + self.host_joules

    @property
    def window_s(self) -> float:
        return max(self.end - self.start, 0.0)


@dataclass(frozen=True, slots=True)
class GpuTotals:
    """Cumulative per-GPU energy in joules since the meter started.

    ``measured == attributed + idle + unattributed + pending_idle`` where
    ``pending_idle`` waits to be amortized over the next requests.
    """

    measured: float
    attributed: float
    idle: float
    unattributed: float
    pending_idle: float
    power_w: float | None


@dataclass(slots=True)
class _Request:
    request_id: str
    gpus: tuple[int, ...]
    start: float
    prefill_weight: float
    active_params_b: float
    prompt_tokens: int
    times: list[float] = field(default_factory=list)
    counts: list[float] = field(default_factory=list)
    completion_tokens: int | None = None
    end: float | None = None
    status: str = "ok"
    fault: str | None = None
    shares: dict[int, float] = field(default_factory=dict)
    host_j: float = 0.0
    counted: float = 0.0  # tokens of arrivals already attributed and dropped from ``times``/``counts``
    unseen_tokens: int = 0  # a plain response's tokens, placed in time when the window ends

    @property
    def known_until(self) -> float:
        """Time up to which this request's work rate is known: its end, else its last token."""
        if self.end is not None:
            return self.end
        return self.times[-1] if self.times else self.start

    @property
    def tokens_seen(self) -> int:
        return int(self.counted + sum(self.counts))


@dataclass(slots=True)
class _Gpu:
    frontier: float | None = None
    carry: float = 0.0
    measured: float = 0.0
    attributed: float = 0.0
    idle: float = 0.0
    unattributed: float = 0.0
    host_per_gpu_joule: float = 0.0  # host J per GPU J in the last slice, for provisional figures
    faulted: str | None = None
    requests: set[str] = field(default_factory=set)
    foreign: list[tuple[float, float, int]] = field(default_factory=list)
    live: LiveSplit = field(default_factory=LiveSplit)  # the split behind provisional figures
    ttft_s: float | None = None  # recent time to first token of streamed requests (moving average)
    running: int = 0  # requests begun and not ended: 0 means the GPU is idle as far as the meter knows


class RequestWindow:
    """One request's window; the proxy calls :meth:`tokens` and :meth:`end`."""

    __slots__ = ("_meter", "_req")

    def __init__(self, meter: Meter, req: _Request) -> None:
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

    def end(self, status: str = "ok", t: float | None = None) -> Measurement:
        """Close the window and return the provisional measurement; never raises."""
        meter, req = self._meter, self._req
        try:
            return meter._end(req, status, meter.clock() if t is None else t)
        except Exception:  # a meter bug must not fail the request: settle it now, as an estimate
            log.exception("meter failed to close window %s", req.request_id)
            meter._count_error("internal")
            with meter._lock:
                req.fault, req.status = "internal", status
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
        self.method = source.method if source is not None and self.gpus else ESTIMATE
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
        self._requests: dict[str, _Request] = {}
        self._ended: set[str] = set()
        self._gpu = {g: _Gpu() for g in self.gpus}
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
            return {
                g: GpuTotals(
                    st.measured,
                    st.attributed,
                    st.idle,
                    st.unattributed,
                    st.carry,
                    self.sampler.power_w(g) if self.sampler else None,
                )
                for g, st in self._gpu.items()
            }

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
        req = _Request(
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
            if req.fault not in (None, "unmeasurable"):  # unmeasurable: a known property of the GPU, not an error
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

    def _cannot_meter(self, gpus: Sequence[int]) -> str | None:
        """Why a request on ``gpus`` starting now cannot be metered (its fault kind), or None."""
        assert self.sampler is not None
        if any(g in self.unmeasured for g in gpus):
            return "unmeasurable"
        if any(g not in self._gpu for g in gpus):
            return "unmetered_gpu"
        if self._started and not self.sampler.alive:
            return "sampler_dead"
        return None

    def method_for(self, gpus: Sequence[int]) -> str:
        """The method a request on ``gpus`` starting now gets, unless the meter faults during it."""
        if not gpus or self.sampler is None or self._cannot_meter(gpus) is not None:
            return ESTIMATE
        # A GPU already faulted (stale) gives its requests estimates when they end.
        return ESTIMATE if any(self._gpu[g].faulted for g in gpus) else self.method

    def report_foreign(self, gpus: Sequence[int], sequences: int, t0: float, t1: float) -> None:
        """Record ``sequences`` running on ``gpus`` over ``[t0, t1)`` that did not come through the gateway."""
        if sequences <= 0:
            return
        with self._lock:
            for g in gpus:
                if g in self._gpu:
                    self._gpu[g].foreign.append((t0, t1, sequences))

    def _estimated(self, req: _Request) -> bool:
        return req.fault is not None or not req.gpus or self.sampler is None

    def _end(self, req: _Request, status: str, t: float) -> Measurement:
        settled: Measurement | None = None
        with self._lock:
            if req.end is not None:  # ended twice: keep the first
                return self._provisional(req)
            req.end = max(t, req.start)
            req.status = status
            for g in req.gpus:
                if g in self._gpu:
                    self._busy(g, -1, req.end)
            self._reconcile_tokens(req)
            if req.unseen_tokens:
                self._place_unseen(req)
            if not self._estimated(req):
                stale = [g for g in req.gpus if self._stale(g, self.clock())]
                if stale:  # no fresh reading: do not hand out a figure the meter cannot back
                    req.fault = self._gpu[stale[0]].faulted or "stale"
            if self._estimated(req):
                settled = self._settle(req)
                result = settled
            else:
                self._ended.add(req.request_id)
                result = self._provisional(req)
        if settled is not None:
            self._emit([settled])
        return result

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
                    self._count_error("internal")
                    self._drop_gpu_slice(g, st)
            return [self._settle(self._requests[rid]) for rid in list(self._ended) if self._can_settle(rid)]

    def _drop_gpu_slice(self, g: int, st: _Gpu) -> None:
        """Give up on a GPU's pending slice: its requests get estimates, and attribution goes on after it.

        Whatever made the pass fail is in those requests' windows or in that slice; keeping them
        would fail every later pass too. The slice is skipped, as a gap in the readings is.
        """
        assert self.sampler is not None
        self._fault_requests(st, "internal")
        st.requests.clear()
        st.frontier = self.sampler.last_sample_time(g) or st.frontier

    def _fault_requests(self, st: _Gpu, kind: str) -> None:
        """Give the GPU's requests ``kind`` as their fault, unless they have one: they get estimates."""
        for rid in st.requests:
            req = self._requests.get(rid)  # get: this also runs after a pass failed, invariants unsure
            if req is not None:
                req.fault = req.fault or kind

    def _advance_gpu(self, g: int, st: _Gpu, now: float) -> None:
        assert self.sampler is not None
        samples = self.sampler.samples_since(g, st.frontier)
        if self._stale(g, now):
            if st.faulted is None:
                st.faulted = "stale"
                self._count_error("stale")
                log.warning("meter: GPU %d has no fresh reading; its requests fall back to estimates", g)
            self._fault_requests(st, "stale")
            return
        if not samples:
            return
        last_t = samples[-1][0]
        if st.faulted is not None:
            # Readings are back: skip the gap rather than attribute it.
            st.faulted = None
            st.frontier = last_t
            return
        if st.frontier is None:
            st.frontier = samples[0][0]
        reqs = [self._requests[rid] for rid in st.requests]
        known = [r.known_until for r in reqs if r.end is None]  # an ended request's work is known to its end
        target = max(min(last_t, *known), last_t - self.settle_lag_s) if known else last_t
        if target <= st.frontier:
            return
        active = [r for r in reqs if r.start < target and (r.end is None or r.end > st.frontier)]
        split = split_arrays(
            samples,
            *spans_since(active, st.frontier),
            len(active),
            st.frontier,
            target,
            foreign=st.foreign,
            carry=st.carry,
            amortize=self.amortize,
        )
        measured = split.measured
        st.measured += measured
        st.idle += split.idle
        st.unattributed += split.unattributed
        st.carry = split.carry
        joules = list(split.shares.values())  # keyed 0..len(active)-1, in order
        for req, j in zip(active, joules):
            req.shares[g] = req.shares.get(g, 0.0) + j
        attributed = math.fsum(joules)
        st.attributed += attributed
        if self.host is not None and measured > 0:
            host_j = self.host.energy_j(st.frontier, target, len(self.gpus))
            st.host_per_gpu_joule = host_j / measured
            for req, j in zip(active, joules):
                req.host_j += j * st.host_per_gpu_joule
        st.frontier = target
        st.foreign = [f for f in st.foreign if f[1] > target]
        for req in active:
            if len(req.times) > 2 * COMPACT_AFTER:  # cheap test first: most requests are short
                self._compact(req)

    def _compact(self, req: _Request) -> None:
        """Drop arrivals every GPU of ``req`` has attributed, but the last (a span starts there).

        A long generation would otherwise hold every token's time until it ends: a 32k-token
        answer about a megabyte.
        """
        # Both passes must be past an arrival: the settled one (frontier) and the live one (until).
        frontiers = [
            st.frontier if st.live.until is None else min(st.frontier, st.live.until)
            for g in req.gpus
            if (st := self._gpu.get(g)) is not None and st.frontier is not None
        ]
        if not frontiers or len(frontiers) < len(req.gpus):
            return
        done = bisect.bisect_right(req.times, min(frontiers)) - 1
        if done > 0:
            # tokens() appends to both lists without the lock: cut both by the same count from the front.
            req.counted += sum(req.counts[:done])
            del req.times[:done], req.counts[:done]

    def _first_token(self, req: _Request, t: float) -> None:
        """Keep each GPU's recent time to first token (TTFT), to shape plain responses like streams."""
        ttft = t - req.start
        if ttft < 0:
            return
        for g in req.gpus:
            st = self._gpu.get(g)
            if st is not None:
                st.ttft_s = ttft if st.ttft_s is None else st.ttft_s + TTFT_WEIGHT * (ttft - st.ttft_s)

    @staticmethod
    def _reconcile_tokens(req: _Request) -> None:
        """Make the arrivals add up to the upstream's completion count, when it reported one.

        A stream's chunks can hold several tokens each (a server that batches its output); the
        arrivals keep their timing and are scaled to the count. A stream whose tokens were not
        seen at all is shaped as a plain response.
        """
        total = req.completion_tokens
        if total is None or req.unseen_tokens:
            return
        pending = total - req.counted
        seen = sum(req.counts)
        if seen <= 0:
            req.unseen_tokens = max(int(pending), 0)
        elif pending > 0 and abs(pending - seen) > 0.5:
            scale = pending / seen
            req.counts[:] = [c * scale for c in req.counts]

    def _place_unseen(self, req: _Request) -> None:
        """Arrivals for a plain response's tokens: the first at the GPUs' recent TTFT, the rest at the end."""
        assert req.end is not None
        n, req.unseen_tokens = req.unseen_tokens, 0
        ttfts = [st.ttft_s for g in req.gpus if (st := self._gpu.get(g)) is not None and st.ttft_s is not None]
        first = req.start + sum(ttfts) / len(ttfts) if ttfts else req.end
        last = req.times[-1] if req.times else req.start
        if n > 1 and last < first < req.end - MIN_SPAN_S:
            req.times.append(first)
            req.counts.append(1)
            n -= 1
        req.times.append(req.end)
        req.counts.append(n)

    def _live_locked(self) -> None:
        """Split each GPU's energy since its last live slice among the requests active in it (see :mod:`meter.live`)."""
        if self.sampler is None:
            return
        with self._lock:
            for g, st in self._gpu.items():
                if st.faulted is not None:
                    continue
                try:
                    self._live_gpu(g, st)
                except Exception:  # provisional figures only: the settled pass is unaffected
                    log.exception("meter: live split failed on GPU %d", g)
                    self._count_error("internal")

    def _live_gpu(self, g: int, st: _Gpu) -> None:
        assert self.sampler is not None
        live = st.live
        curve = self.sampler.energy_curve(g, live.until)
        if not curve:
            return
        a, b = curve[0][0] if live.until is None else live.until, curve[-1][0]
        if b <= a:
            return
        active, after = [], 0
        for rid in st.requests:
            r = self._requests[rid]
            if r.start < b and (r.end is None or r.end > a):
                active.append(r)
            after += r.end is None or r.end > b
        key_idx, start, end, rate = spans_since(active, a)
        # A request that ended since the last slice took its inline share of the time since then by
        # heads, when it ended: it takes the same here (rate unknown), so that no moment is given
        # out twice.
        closed = [k for k, r in enumerate(active) if r.end is not None]
        rate[np.isin(key_idx, closed)] = math.nan
        split = split_arrays(curve, key_idx, start, end, rate, len(active), a, b, foreign=st.foreign)
        shares = split.shares  # keyed 0..len(active)-1, in order
        # Who shares the time after the slice: requests open at its end (or closed since, their
        # tails taken by heads) and foreign sequences.
        after += sum(n for _, e, n in st.foreign if e > b)
        live.add(b, ((r.request_id, shares[k]) for k, r in enumerate(active)), after)

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

    def _completion_tokens(self, req: _Request) -> int:
        return req.completion_tokens if req.completion_tokens is not None else req.tokens_seen

    def _measurement(self, req: _Request, joules: dict[int, float], settled: bool, host_j: float) -> Measurement:
        method = self.method
        if self._estimated(req):
            method = ESTIMATE
            end = req.end if req.end is not None else self.clock()
            est = estimate(
                req.prompt_tokens,
                self._completion_tokens(req),
                req.active_params_b,
                req.prefill_weight,
                latency_s=end - req.start,
            )
            joules = {g: est.gpu_j / len(req.gpus) for g in req.gpus} if req.gpus else {-1: est.gpu_j}
            settled, host_j = True, est.host_j
        return Measurement(
            req.request_id,
            joules,
            method,
            settled,
            req.start,
            req.end if req.end is not None else self.clock(),
            req.prompt_tokens,
            self._completion_tokens(req),
            req.status,
            req.fault,
            host_j,
        )

    def _provisional(self, req: _Request) -> Measurement:
        """The live slices of the window, plus the rest of it split by heads (see :mod:`meter.live`)."""
        assert req.end is not None
        if self._estimated(req):
            return self._measurement(req, {}, settled=False, host_j=0.0)
        assert self.sampler is not None  # else the request is estimated
        joules: dict[int, float] = {}
        host = 0.0
        for g in req.gpus:
            st = self._gpu[g]
            done = st.live.share(req.request_id)
            since = req.start if st.live.until is None else max(st.live.until, req.start)
            if req.end > since:
                done += self.sampler.energy_between(g, since, req.end) / max(st.live.heads, 1)
            host += done * st.host_per_gpu_joule
            joules[g] = done
        return self._measurement(req, joules, settled=False, host_j=host)

    def _settle(self, req: _Request) -> Measurement:
        """The final measurement of an ended request, which leaves the meter; never raises."""
        try:
            result = self._measurement(req, dict(req.shares) or {g: 0.0 for g in req.gpus}, True, req.host_j)
        except Exception:  # a window whose figures cannot be computed still gets a record
            log.exception("meter failed to settle %s; settling it as an estimate", req.request_id)
            self._count_error("internal")
            req.fault = "internal"
            try:
                result = self._measurement(req, {}, settled=True, host_j=0.0)
            except Exception:  # the estimate failed too: the window, without a figure (logged above)
                end = req.end if req.end is not None else self.clock()
                result = Measurement(req.request_id, {}, ESTIMATE, True, req.start, end, req.prompt_tokens,
                                     req.completion_tokens or 0, req.status, "internal")
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

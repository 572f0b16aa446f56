"""Every metered GPU of a meter: which requests run on each, their passes, and whether they can be trusted.

The :class:`~meter.meter.Meter` holds the lock and the requests; :class:`MeteredGpus`
does what concerns the GPUs under that lock: it counts requests in and out
(telling the sampler where a GPU turns busy or idle), runs the settled and live
passes (:class:`~meter.gpu.GpuAccount`), notices a GPU with no fresh reading, and
says whether a request's figure can be settled or measured at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial

from wattgate.meter.gpu import COMPACT_AFTER, GpuAccount, GpuTotals, compact
from wattgate.meter.host import HostPower
from wattgate.meter.kinds import Fault
from wattgate.meter.sampler import Sampler
from wattgate.meter.window import Request

log = logging.getLogger(__name__)


class MeteredGpus:
    """The metered GPUs of one meter, read by ``sampler``."""

    def __init__(
        self,
        sampler: Sampler,
        unmeasured: Mapping[int, str],
        *,
        settle_lag_s: float,
        settle_every_s: float,
        amortize: bool,
        stale_after_s: float,
        host: HostPower | None,
        count_error: Callable[[Fault], None],
        created_at: float,
    ) -> None:
        self.sampler = sampler
        self.unmeasured = unmeasured  # GPUs the source sees but cannot meter per request (MIG)
        self.gpu = {g: GpuAccount() for g in sampler.gpus}
        self.settle_lag_s = settle_lag_s
        self.settle_every_s = settle_every_s
        self.last_settle = self.last_live = -float("inf")
        self.amortize = amortize
        self.stale_after_s = stale_after_s
        self.host = host
        self.count_error = count_error
        self.created_at = created_at

    # -- requests on the GPUs ----------------------------------------------------

    def began(self, req: Request) -> None:
        if ttfts := self.ttfts(req):  # until its first token, or to its end if plain (see meter.work)
            req.prefill_until = req.start + sum(ttfts) / len(ttfts)
        for g in req.gpus:
            if (st := self.gpu.get(g)) is not None:
                st.requests.add(req.request_id)
                st.live.began()
                self._busy(g, st, +1, req.start)

    def ended(self, req: Request) -> None:
        assert req.end is not None
        for g in req.gpus:
            if (st := self.gpu.get(g)) is not None:
                self._busy(g, st, -1, req.end)

    def settled(self, req: Request) -> None:
        """``req`` leaves the GPUs' passes."""
        for g in req.gpus:
            if (st := self.gpu.get(g)) is not None:
                st.requests.discard(req.request_id)
                st.live.forget(req.request_id)

    def _busy(self, g: int, st: GpuAccount, change: int, t: float) -> None:
        """Count a request in or out, and tell the sampler."""
        st.running += change
        self.sampler.load(g, t, st.running)

    def first_token(self, req: Request, t: float) -> None:
        """Learn each GPU's time to first token (TTFT) by prompt length: how long a request seen without
        tokens prefills (see :mod:`meter.first_token`)."""
        if t >= req.start:
            for g in req.gpus:
                if (st := self.gpu.get(g)) is not None:
                    st.ttft.observe(req.prompt_tokens, t - req.start)

    def ttfts(self, req: Request) -> list[float]:
        """Each of ``req``'s GPUs' predicted time to first token for its prompt, where one has seen a stream."""
        predicted = (st.ttft.predict(req.prompt_tokens) for g in req.gpus if (st := self.gpu.get(g)) is not None)
        return [t for t in predicted if t is not None]

    def report_foreign(self, gpus: Sequence[int], sequences: int, t0: float, t1: float) -> None:
        for g in gpus:
            if (st := self.gpu.get(g)) is not None:
                st.foreign.append((t0, t1, sequences))

    # -- passes ------------------------------------------------------------------

    def due(self, now: float, open_requests: int) -> tuple[bool, bool]:
        """Whether the live split, and the settled pass, are due after a poll at ``now``.

        Attribution costs per participant and call: it is batched rather than run every poll. Each
        pass walks every open request, so with many open both passes run less often (up to 4x
        their period from 1000 open): the cost per request stays flat, figures settle at most a
        second later, and provisional ones split up to 0.2 s more of a window by heads.
        """
        spread = min(max(1.0, open_requests / 250), 4.0)
        live = now - self.last_live >= self.sampler.interval_s * (spread - 0.5)
        if live:
            self.last_live = now
        return live, now - self.last_settle >= self.settle_every_s * spread

    def settle(self, requests: Mapping[str, Request], now: float) -> None:
        """The settled pass on every GPU; a GPU whose pass fails gives up its slice, not the others."""
        self.last_settle = now
        for g, st in self.gpu.items():
            try:
                self._settle_gpu(g, st, requests, now)
            except Exception:  # a bug or a bad window must not stop attribution for good
                log.exception("meter: attribution failed on GPU %d; its requests fall back to estimates", g)
                self.count_error(Fault.INTERNAL)
                st.drop_slice(requests, self.sampler.last_sample_time(g))

    def _settle_gpu(self, g: int, st: GpuAccount, requests: Mapping[str, Request], now: float) -> None:
        if self.stale(g, now):
            if st.faulted is None:
                st.faulted = Fault.STALE
                self.count_error(Fault.STALE)
                log.warning("meter: GPU %d has no fresh reading; its requests fall back to estimates", g)
            st.fault_requests(requests, Fault.STALE)
            return
        samples = self.sampler.samples_since(g, st.frontier)
        if not samples:
            return
        if st.faulted is not None:  # readings are back: skip the gap rather than attribute it
            st.faulted = None
            st.frontier = samples[-1][0]
            return
        for req in st.settle_pass(g, samples, requests, self.settle_lag_s, self.amortize, self.host, len(self.gpu)):
            if len(req.times) > 2 * COMPACT_AFTER:  # cheap test first: most requests are short
                compact(req, (self.gpu.get(g) for g in req.gpus))

    def live(self, requests: Mapping[str, Request]) -> None:
        """Split each GPU's energy since its last live slice among the requests active in it (see :mod:`meter.live`)."""
        for g, st in self.gpu.items():
            if st.faulted is not None:
                continue
            try:
                if curve := self.sampler.energy_curve(g, st.live.until):
                    st.live_pass(curve, requests, self.sampler.last_sample_time(g), partial(self.sampler.energy_between, g))
            except Exception:  # provisional figures only: the settled pass is unaffected
                log.exception("meter: live split failed on GPU %d", g)
                self.count_error(Fault.INTERNAL)

    def provisional(self, req: Request) -> tuple[dict[int, float], dict[int, float]]:
        """``req``'s provisional joules per GPU (see :meth:`GpuAccount.provisional`), and the GPU time that
        goes with them: on each GPU, the window times the request's share of the GPU's energy over it
        (the settled pass splits the time itself). One curve per GPU serves both."""
        assert req.end is not None
        window = req.end - req.start
        joules, seconds = {}, {}
        for g in req.gpus:
            st = self.gpu[g]
            energy = self.sampler.energy_over(g, st.live.since(req.start), req.end)
            joules[g] = j = st.provisional(req, energy)
            total = energy(req.start, req.end) if window > 0 else 0.0
            seconds[g] = window * min(j / total, 1.0) if total > 0 else 0.0
        return joules, seconds

    def host_share(self, joules: Mapping[int, float]) -> float:
        """Host joules for provisional GPU ``joules``, at each GPU's latest host-per-GPU ratio."""
        return sum(j * self.gpu[g].host_per_gpu_joule for g, j in joules.items())

    # -- trust -------------------------------------------------------------------

    def cannot_meter(self, gpus: Sequence[int], started: bool) -> Fault | None:
        """Why a request on ``gpus`` starting now cannot be metered (its fault kind), or None."""
        if any(g in self.unmeasured for g in gpus):
            return Fault.UNMEASURABLE
        if any(g not in self.gpu for g in gpus):
            return Fault.UNMETERED_GPU
        if started and not self.sampler.alive:
            return Fault.SAMPLER_DEAD
        return None

    def stale(self, g: int, now: float) -> bool:
        """True when GPU ``g`` has had no successful reading or no counter step for ``stale_after_s``."""
        last_ok, last_step = self.sampler.last_ok(g), self.sampler.last_sample_time(g)
        if last_ok is None or last_step is None:
            return now - self.created_at > self.stale_after_s  # allow start-up time
        return now - min(last_ok, last_step) > self.stale_after_s + self.sampler.counter_period_s

    def stale_fault(self, req: Request, now: float) -> Fault | None:
        """Why ``req`` cannot have a measured figure now (a GPU with no fresh reading), or None."""
        stale = [g for g in req.gpus if self.stale(g, now)]
        return (self.gpu[stale[0]].faulted or Fault.STALE) if stale else None

    def can_settle(self, req: Request) -> bool:
        """Every GPU of the ended ``req`` has attributed past its end (or faulted)."""
        assert req.end is not None
        return all(st.faulted is not None or (st.frontier is not None and st.frontier >= req.end)
                   for st in (self.gpu[g] for g in req.gpus))

    def faulted(self, gpus: Sequence[int]) -> bool:
        return any(self.gpu[g].faulted for g in gpus)

    def health(self, now: float) -> dict[str, dict[str, object]]:
        """Per GPU: its fault, the age of its last reading and how its two sensors agree."""
        out: dict[str, dict[str, object]] = {}
        for g, st in self.gpu.items():
            last, agreement = self.sampler.last_ok(g), self.sampler.power_vs_counter(g)
            step = self.sampler.counter_step_s(g)
            out[str(g)] = {
                "fault": st.faulted,
                "last_reading_age_s": None if last is None else round(now - last, 3),
                "power_vs_counter": None if agreement is None else round(agreement, 3),
                "counter_step_ms": None if step is None else round(step * 1e3, 2),
            }
        return out

    def totals(self) -> dict[int, GpuTotals]:
        return {g: st.totals(self.sampler.power_w(g)) for g, st in self.gpu.items()}

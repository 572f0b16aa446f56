"""One request as the meter sees it: its window, its tokens, and the measurement it ends with."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wattgate.meter.estimate import ESTIMATE_BATCH, estimate
from wattgate.meter.kinds import Fault, Method, Status

if TYPE_CHECKING:  # the meter makes windows; a window only calls back into it
    from wattgate.meter.meter import Meter

log = logging.getLogger(__name__)

MAX_TOKENS = 10**9  # more than any request holds: a larger count from an upstream is nonsense


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
    method: Method
    settled: bool
    start: float
    end: float
    prompt_tokens: int
    completion_tokens: int
    status: Status = Status.OK
    fault: Fault | None = None  # why an estimate replaced a measurement
    host_joules: float = 0.0  # host (CPU, DRAM, NIC) share, when host energy is metered
    # The request's share of each GPU's time (s), split as its energy is: what its embodied carbon is pro-rated by.
    gpu_seconds: dict[int, float] = field(default_factory=dict)

    @property
    def gpu_joules(self) -> float:
        return sum(self.joules_by_gpu.values())

    @property
    def joules(self) -> float:
        """IT energy: GPU plus host share."""
        return self.gpu_joules + self.host_joules

    @property
    def window_s(self) -> float:
        return max(self.end - self.start, 0.0)


@dataclass(slots=True)
class Request:
    """A request's window: when it began and ended, and its work (see :mod:`meter.work`)."""

    request_id: str
    gpus: tuple[int, ...]
    start: float
    prefill_weight: float
    active_params_b: float
    prompt_tokens: int
    times: list[float] = field(default_factory=list)  # arrival time of each token record
    counts: list[float] = field(default_factory=list)  # tokens in each record
    completion_tokens: int | None = None
    end: float | None = None
    status: Status = Status.OK
    fault: Fault | None = None
    shares: dict[int, float] = field(default_factory=dict)  # settled joules per GPU so far
    gpu_seconds: dict[int, float] = field(default_factory=dict)  # settled share of each GPU's time so far (s)
    host_j: float = 0.0
    counted: float = 0.0  # tokens of arrivals already attributed and dropped from ``times``/``counts``
    unseen_tokens: int = 0  # tokens of a response whose arrivals the gateway did not see (a plain one)
    # A request seen without tokens (a plain one, or a stream before its first) is taken to prefill its
    # prompt up to here, its start plus the GPU's recent time to first token when it began; None: unknown.
    prefill_until: float | None = None

    @property
    def known_until(self) -> float:
        """Time up to which this request's work rate is known: its end, else its last token."""
        if self.end is not None:
            return self.end
        return self.times[-1] if self.times else self.start

    @property
    def tokens_seen(self) -> int:
        return int(self.counted + sum(self.counts)) + self.unseen_tokens

    @property
    def completion(self) -> int:
        """The upstream's completion count if it reported one, else the tokens seen."""
        return self.completion_tokens if self.completion_tokens is not None else self.tokens_seen

    def reconcile_tokens(self) -> None:
        """Make the arrivals add up to the upstream's completion count, when it reported one.

        A stream's chunks can hold several tokens each (a server that batches its output); the
        arrivals keep their timing and are scaled to the count. A stream whose tokens were not
        seen at all is shaped as a plain response.
        """
        total = self.completion_tokens
        if total is None or self.unseen_tokens:
            return
        pending = total - self.counted
        seen = sum(self.counts)
        if seen <= 0:
            self.unseen_tokens = max(int(pending), 0)
        elif pending > 0 and abs(pending - seen) > 0.5:
            scale = pending / seen
            self.counts[:] = [c * scale for c in self.counts]


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
            self._meter.first_token(req, t)
        req.times.append(t)
        req.counts.append(n)

    def completed(self, n: int) -> None:
        """A plain (non-streamed) response with ``n`` tokens, whose arrival times the gateway cannot see.

        Its window is its prompt's prefill over the GPU's time to first token for its prompt, then a
        decoding request's share of the GPU up to its end (see :mod:`meter.work`), for the provisional
        and the settled figure alike. Pass a count from an upstream through :func:`token_count` first.
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
        return self._meter.close(self._req, status, self._meter.clock() if t is None else t)


def measurement(req: Request, method: Method, joules: dict[int, float], settled: bool, host_j: float,
                now: float, gpu_seconds: dict[int, float] | None = None) -> Measurement:
    """``req``'s measurement; an estimate instead when it has a fault, no GPUs or ``method`` is one (its
    GPU time then as EcoLogits assumes it: the window shared by a batch of ``ESTIMATE_BATCH``)."""
    end = req.end if req.end is not None else now
    if method is Method.ESTIMATE or req.fault is not None or not req.gpus:
        method = Method.ESTIMATE
        est = estimate(req.prompt_tokens, req.completion, req.active_params_b, req.prefill_weight,
                       latency_s=end - req.start)
        joules = {g: est.gpu_j / len(req.gpus) for g in req.gpus} if req.gpus else {-1: est.gpu_j}
        settled, host_j = True, est.host_j
        gpu_seconds = {g: (end - req.start) / ESTIMATE_BATCH for g in joules}
    # Plain floats leave the meter: the splits' NumPy floats pass arithmetic, but orjson writes no float
    # subclass, and a figure that cannot be written would fail the request it describes.
    return Measurement(req.request_id, {g: float(j) for g, j in joules.items()}, method, settled, req.start, end,
                       req.prompt_tokens, req.completion, req.status, req.fault, float(host_j),
                       {g: float(s) for g, s in (gpu_seconds or {}).items()})


def final_measurement(req: Request, method: Method, now: float, count_error: Callable[[Fault], None]) -> Measurement:
    """The settled measurement of an ended ``req``; never raises: a window whose figures cannot be
    computed still gets a record (an estimate, or at worst the window without a figure)."""
    try:
        return measurement(req, method, dict(req.shares) or {g: 0.0 for g in req.gpus}, True, req.host_j, now,
                           dict(req.gpu_seconds))
    except Exception:
        log.exception("meter failed to settle %s; settling it as an estimate", req.request_id)
        count_error(Fault.INTERNAL)
        req.fault = Fault.INTERNAL
    try:
        return measurement(req, method, {}, True, 0.0, now)
    except Exception:  # noqa: BLE001 - the estimate failed too (logged above); the record must still be made
        end = req.end if req.end is not None else now
        return Measurement(req.request_id, {}, Method.ESTIMATE, True, req.start, end, req.prompt_tokens,
                           req.completion_tokens or 0, req.status, Fault.INTERNAL)

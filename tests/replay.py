"""A scripted GPU serving a workload of waves, replayed into the meter on a scripted clock.

The harness behind ``python -m bench.inline --mode trace`` and tests/test_inline.py (bench may
import it; tests never import bench). The workload is issue 12's: waves of 1, 8, 1, 16, 2, 1,
4, 12, 1 concurrent chat requests, alternately streamed and plain, 24 to 72 tokens, on a
simulated H100 decoding at 5 ms per token. The scripted GPU's counter steps every 100 ms and
its power every 10 ms; no HTTP and no timing noise, the same figures every run.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wattgate.meter import Measurement, Meter
from wattgate.meter.sources.simulated import GpuProfile
from wattgate.meter.sources.trace import TraceSource

WAVES = (1, 8, 1, 16, 2, 1, 4, 12, 1)
PROFILE = GpuProfile(itl_1_s=0.005)  # 5 ms per token alone (issue 12's workload)
PROMPT_TOKENS = 12
SPARSE_COUNTER_S = 1.0  # what `counter_interval_ms: auto` chose on the H200 host (a read cost 4 ms of CPU)
PHASES = (0.0, 0.0137, 0.0251, 0.0377)  # poll times past the counter's 100 ms steps (s): a poll can see a step at once or late
ARRIVAL_GAP_S = 0.0005  # a wave's requests reach the GPU one after another, as through one gateway
# The scripted GPU idles this long before the first wave: a gateway's sampler runs from start-up, and
# has learnt when the counter steps (about 2.5 s, see meter.counter_steps) before requests come.
LEAD_S = 4.0


@dataclass(frozen=True, slots=True)
class Planned:
    """One request of the workload."""

    stream: bool
    max_tokens: int


def workload(waves: tuple[int, ...] = WAVES, scale: int = 1) -> list[list[Planned]]:
    """The requests of each wave: alternately streamed and plain, 24 to 72 tokens (times ``scale``)."""
    out, k = [], 0
    for size in waves:
        wave = []
        for i in range(size):
            wave.append(Planned(stream=k % 2 == 0, max_tokens=(24 + 12 * (i % 5)) * scale))
            k += 1
        out.append(wave)
    return out


def summary(pairs: list[tuple[bool, float, float]]) -> dict[str, dict[str, float]]:
    """p50/p95/worst of |inline / settled - 1| per kind, from ``(stream, inline J, settled J)``."""
    out = {}
    for kind, stream in (("stream", True), ("plain", False)):
        errs = sorted(abs(i / s - 1) for st, i, s in pairs if st is stream and s > 0)
        if errs:
            out[kind] = {
                "n": len(errs),
                "p50": statistics.median(errs),
                "p95": errs[min(len(errs) - 1, math.ceil(0.95 * len(errs)) - 1)],
                "worst": errs[-1],
            }
    return out


@dataclass(slots=True)
class Scripted:
    """One request on the scripted GPU: when it began, its tokens' times, when it ended."""

    rid: str
    stream: bool
    max_tokens: int
    start: float
    first_at: float  # when its prefill ends and decoding starts
    progress: float = 0.0  # fraction of the next token done
    tokens: list[float] = field(default_factory=list)
    end: float | None = None
    own_j: float = 0.0  # what it drew on the scripted GPU: its share of power, split evenly in the batch


@dataclass(frozen=True, slots=True)
class Replayed:
    """What the meter said of one scripted request."""

    rid: str
    stream: bool
    start: float
    end: float
    inline: Measurement
    settled: Measurement
    window_j: float  # the GPU's energy over the window as the meter saw it when the request ended
    own_j: float  # what it drew on the scripted GPU (see ``Scripted``)
    # The sensors' agreement (counter over power) when it ended: read sparsely, what the meter scales
    # the power since the counter's last step by (None: no counter interval yet).
    agreement: float | None = None


def simulate(
    waves: list[list[Planned]] | None = None,
    profile: GpuProfile = PROFILE,
    dt: float = 0.0005,
    gap_s: float = 0.05,
    arrival_gap_s: float = ARRIVAL_GAP_S,
) -> tuple[list[Scripted], list[tuple[float, float, float]]]:
    """A GPU serving ``waves`` (default: the workload) in fixed steps, each wave once the last one is
    done, its requests ``arrival_gap_s`` apart: each request's token times, and the GPU's trace: an
    H100's counter (it steps every 100 ms) and its instantaneous power (every 10 ms)."""
    seqs: list[Scripted] = []
    energy, t = 5_000.0, LEAD_S
    # Idle at first, the counter stepping every 100 ms as it does afterwards.
    lead = round(LEAD_S / 0.01)
    trace = [(round(0.01 * k, 9), energy + profile.idle_w * 0.1 * (k // 10), profile.idle_w) for k in range(lead)]
    energy += profile.idle_w * LEAD_S
    next_step = next_power = LEAD_S
    counter = energy
    waves_left = list(workload() if waves is None else waves)
    running: list[Scripted] = []
    wave_done_at: float | None = t
    idle_until = math.inf  # once the last wave is done: 4 s idle, while everything settles
    while t < idle_until:
        if not waves_left and not running and idle_until == math.inf:
            idle_until = t + 4.0
        if not running and wave_done_at is not None and t >= wave_done_at + gap_s and waves_left:
            for i, p in enumerate(waves_left.pop(0)):
                start = t + arrival_gap_s * i
                seq = Scripted(f"r{len(seqs)}", p.stream, p.max_tokens, start, start + PROMPT_TOKENS / 20_000 + 0.002)
                running.append(seq)
                seqs.append(seq)
            wave_done_at = None
        batch = sum(1 for s in running if s.start <= t)
        power = profile.power_w(batch)
        for seq in running:
            if seq.start <= t:
                seq.own_j += power * dt / batch
            if t >= seq.first_at:
                seq.progress += dt / profile.inter_token_s(batch) if seq.tokens else 1.0
                if seq.progress >= 1.0:
                    seq.progress -= 1.0 if seq.tokens else seq.progress
                    seq.tokens.append(t + dt)
                    if len(seq.tokens) == seq.max_tokens:
                        seq.end = t + dt + 0.0005  # the usage chunk and [DONE] follow the last token
        if running and all(s.end is not None for s in running):
            wave_done_at = max(s.end for s in running if s.end is not None)
        running = [s for s in running if s.end is None]
        energy += power * dt
        t = round(t + dt, 9)
        if t >= next_power - 1e-9:  # power updates every 10 ms, the counter every 100 ms
            if t >= next_step - 1e-9:
                counter = energy
                next_step = round(next_step + 0.1, 9)
            trace.append((t, counter, power))
            next_power = round(next_power + 0.01, 9)
    return seqs, trace


class Clock:
    """A scripted clock: it says the time it was last set to."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _events(seqs: list[Scripted]) -> Iterator[tuple[float, int, str, Scripted]]:
    """``(time, order, what, seq)`` in time order: begin, token, end."""
    heap: list[tuple[float, int, str, Scripted]] = []
    for i, s in enumerate(seqs):
        assert s.end is not None
        heap.append((s.start, 3 * i, "begin", s))
        if s.stream:
            heap += [(t, 3 * i + 1, "token", s) for t in s.tokens]
        heap.append((s.end, 3 * i + 2, "end", s))
    heapq.heapify(heap)
    while heap:
        yield heapq.heappop(heap)


def replay(
    seqs: list[Scripted], trace: list[tuple[float, float, float]], phase_s: float = 0.0, **meter_kw: Any
) -> list[Replayed]:
    """Replay scripted requests into a meter reading ``trace`` on a scripted clock, polling every
    ``interval_s`` (``phase_s`` after its multiples) as the sampler thread would; streams report
    each token, plain ones their count at the end, as the gateway does."""
    clock = Clock()
    settled: dict[str, Measurement] = {}
    meter = Meter(TraceSource({0: trace}, clock), [0], clock=clock, on_settled=lambda m: settled.__setitem__(m.request_id, m),
                  **meter_kw)
    assert meter.sampler is not None
    next_poll = meter.sampler.interval_s + phase_s
    inline: dict[str, tuple[Measurement, float, float | None]] = {}
    windows: dict[str, Any] = {}

    def poll_until(t: float) -> None:
        nonlocal next_poll
        while next_poll <= t:
            clock.t = next_poll
            meter.sampler.poll()  # type: ignore[union-attr]
            meter.sampler.after_poll()  # type: ignore[union-attr,misc]
            next_poll = round(next_poll + meter.sampler.next_delay(), 9)  # type: ignore[union-attr]

    for t, _, what, seq in _events(seqs):
        poll_until(t)
        clock.t = t
        if what == "begin":
            windows[seq.rid] = meter.begin(seq.rid, [0], prompt_tokens=PROMPT_TOKENS)
        elif what == "token":
            windows[seq.rid].tokens(1, t)
        else:
            w = windows.pop(seq.rid)
            if not seq.stream:
                w.completed(len(seq.tokens))
            w.usage(PROMPT_TOKENS, len(seq.tokens))
            curve = meter.sampler.energy_curve(0, None, until=t)
            e0, e1 = np.interp([seq.start, t], [p[0] for p in curve], [p[1] for p in curve])
            inline[seq.rid] = (w.end(t=t), float(e1 - e0), meter.sampler.power_vs_counter(0))
    poll_until(trace[-1][0])
    meter.advance()
    return [Replayed(s.rid, s.stream, s.start, s.end or s.start, inline[s.rid][0], settled[s.rid], inline[s.rid][1],
                     s.own_j, inline[s.rid][2]) for s in seqs]


def run_trace(
    waves: list[list[Planned]] | None = None, arrival_gap_s: float = ARRIVAL_GAP_S, **meter_kw: Any
) -> list[Replayed]:
    """The workload replayed into a meter on a scripted clock, once per poll phase in ``PHASES``."""
    seqs, trace = simulate(waves, arrival_gap_s=arrival_gap_s)
    return [r for phase in PHASES for r in replay(seqs, trace, phase_s=phase, **meter_kw)]

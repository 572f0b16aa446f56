"""Split measured GPU energy among the requests that were running on the GPU.

Pure functions, no clocks and no threads, so the attribution contract
(conservation, isolation, symmetry, monotonicity, idle) can be property-tested.

Model: a GPU's cumulative energy counter is sampled at known times; between two
samples the energy is spread evenly over time. Every request is described by
*spans* of constant work rate (work units per second). A token that arrived at
``t_k`` was produced since the previous arrival ``t_{k-1}``, so its work is spread
over ``(t_{k-1}, t_k]``; the prompt's prefill work goes to the span before the
first token. The energy of each slice of time is split among the requests active
in it in proportion to their work rate. Requests whose next token has not been
seen yet (rate unknown) and work that did not come through the gateway
(*foreign* sequences, e.g. seen in vLLM's own metrics) each take one average
head's share, so they neither steal from nor hand energy to the others.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

#: Events closer than this (s) are merged. Far below the energy counter's resolution
#: (~100 ms on H100), and it keeps work rates bounded so their running sum stays exact.
MIN_SPAN_S = 1e-4


@dataclass(frozen=True, slots=True)
class Activity:
    """One request's activity on the meter's monotonic clock (seconds).

    ``arrivals`` are ``(time, tokens)`` pairs in time order; ``prefill_work`` is
    prompt tokens times the model's prefill weight; ``end`` is None while open.
    """

    start: float
    arrivals: Sequence[tuple[float, float]] = ()
    end: float | None = None
    prefill_work: float = 0.0


@dataclass(frozen=True, slots=True)
class Span:
    """Constant work rate over ``[start, end)``; ``rate`` None means not yet known."""

    start: float
    end: float
    rate: float | None


@dataclass(slots=True)
class Split:
    """Result of splitting ``[a, b)`` of one GPU's energy, in joules."""

    shares: dict[Hashable, float]
    idle: float
    unattributed: float
    carry: float  # idle energy held back for ``amortize``, not yet given to a request
    work: float = 0.0  # known work units of all participants in the slice

    @property
    def attributed(self) -> float:
        return sum(self.shares.values())


def spans(activity: Activity) -> list[Span]:
    """Constant-rate spans of one request, from its start to its end (or open)."""
    out: list[Span] = []
    prev = activity.start
    pending = activity.prefill_work
    for t, n in activity.arrivals:
        pending += n
        if t - prev < MIN_SPAN_S:  # same instant as the previous event: merge into the next span
            continue
        out.append(Span(prev, t, pending / (t - prev)))
        pending = 0.0
        prev = t
    if activity.end is None:
        out.append(Span(prev, math.inf, None))
    elif activity.end - prev >= MIN_SPAN_S or not out:
        if activity.end > prev:
            out.append(Span(prev, activity.end, pending / (activity.end - prev)))
    else:  # the end is within MIN_SPAN_S of the last token: stretch the last span to it
        last = out.pop()
        work = (last.rate or 0.0) * (last.end - last.start) + pending
        out.append(Span(last.start, activity.end, work / (activity.end - last.start)))
    return out


def energy_at(samples: Sequence[tuple[float, float]], times: Sequence[float]) -> list[float]:
    """Cumulative energy (J) at each of ``times`` (sorted), linearly interpolated.

    ``samples`` are ``(time, cumulative_joules)`` in time order. Outside the
    sampled range the nearest sample's value is used.
    """
    out: list[float] = []
    j = 0
    last = len(samples) - 1
    for t in times:
        while j < last and samples[j + 1][0] <= t:
            j += 1
        t0, e0 = samples[j]
        if t <= t0 or j == last:
            out.append(e0)
            continue
        t1, e1 = samples[j + 1]
        out.append(e0 + (e1 - e0) * (t - t0) / (t1 - t0))
    return out


def split_energy(
    samples: Sequence[tuple[float, float]],
    participants: Mapping[Hashable, Sequence[Span]],
    a: float,
    b: float,
    *,
    foreign: Sequence[tuple[float, float, int]] = (),
    carry: float = 0.0,
    amortize: bool = False,
) -> Split:
    """Split one GPU's energy over ``[a, b)`` among ``participants``.

    ``foreign`` holds ``(start, end, sequences)`` of work on the GPU that did not
    come through the gateway; its share is returned as ``unattributed``. Energy
    with nobody active is ``idle``, or with ``amortize`` is carried into the next
    slice that has a request (``carry`` in and out). Per call,
    ``attributed + idle + unattributed + carry_out == measured + carry_in``.
    """
    if b <= a:
        return Split({}, 0.0, 0.0, carry)
    # Per breakpoint: changes of (sum of known rates, positive-rate heads, known heads,
    # unknown heads, foreign heads).
    deltas: dict[float, list[float]] = {a: [0.0, 0, 0, 0, 0], b: [0.0, 0, 0, 0, 0]}

    def add(t: float, i: int, v: float) -> None:
        d = deltas.get(t)
        if d is None:
            d = deltas[t] = [0.0, 0, 0, 0, 0]
        d[i] += v

    clipped: list[tuple[Hashable, float, float, float | None]] = []
    work = 0.0
    for key, key_spans in participants.items():
        for sp in key_spans:
            s, e = max(sp.start, a), min(sp.end, b)
            if e <= s:
                continue
            clipped.append((key, s, e, sp.rate))
            if sp.rate is not None:
                work += sp.rate * (e - s)
            if sp.rate is None:
                add(s, 3, 1)
                add(e, 3, -1)
            else:
                add(s, 0, sp.rate)
                add(e, 0, -sp.rate)
                add(s, 2, 1)
                add(e, 2, -1)
                if sp.rate > 0:
                    add(s, 1, 1)
                    add(e, 1, -1)
    for s, e, n in foreign:
        s, e = max(s, a), min(e, b)
        if e > s and n > 0:
            add(s, 4, n)
            add(e, 4, -n)
    for t, _ in samples:
        if a < t < b:
            deltas.setdefault(t, [0.0, 0, 0, 0, 0])

    points = sorted(deltas)
    energy = energy_at(samples, points)
    # Cumulative per-unit-work share (known, positive rate), per-head share for
    # known heads when nobody has work, and per-head share for unknown heads.
    cum_f = [0.0] * len(points)
    cum_hk = [0.0] * len(points)
    cum_hu = [0.0] * len(points)
    rate = 0.0
    n_pos = n_known = n_unknown = n_foreign = 0
    idle = unattributed = 0.0
    for i in range(len(points) - 1):
        d = deltas[points[i]]
        rate += d[0]
        n_pos += int(d[1])
        n_known += int(d[2])
        n_unknown += int(d[3])
        n_foreign += int(d[4])
        if n_pos == 0:
            rate = 0.0  # drop float residue so "nobody has work" is exact
        de = energy[i + 1] - energy[i]
        f = hk = hu = 0.0
        if n_known + n_unknown == 0:
            if n_foreign:
                unattributed += de
            elif amortize:
                carry += de
            else:
                idle += de
        else:
            if amortize:
                de += carry
                carry = 0.0
            heads = n_known + n_unknown + n_foreign
            hu = de / heads
            if n_pos and rate > 0:
                f = de * n_known / (heads * rate)
            else:
                hk = hu
            unattributed += n_foreign * hu
        cum_f[i + 1] = cum_f[i] + f
        cum_hk[i + 1] = cum_hk[i] + hk
        cum_hu[i + 1] = cum_hu[i] + hu

    index = {t: i for i, t in enumerate(points)}
    shares: dict[Hashable, float] = {key: 0.0 for key in participants}
    for key, s, e, r in clipped:
        i0, i1 = index[s], index[e]
        if r is None:
            shares[key] += cum_hu[i1] - cum_hu[i0]
        else:
            shares[key] += r * (cum_f[i1] - cum_f[i0]) + cum_hk[i1] - cum_hk[i0]
    return Split(shares, idle, unattributed, carry, work)


def work_between(activity: Activity, a: float, b: float) -> float:
    """Known work units of ``activity`` inside ``[a, b)``."""
    total = 0.0
    for sp in spans(activity):
        s, e = max(sp.start, a), min(sp.end, b)
        if e > s and sp.rate:
            total += sp.rate * (e - s)
    return total


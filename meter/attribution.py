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
(*foreign* sequences, e.g. seen in vLLM's own metrics) are taken to decode as the
requests decoding beside them do on average (spans after a first token: *decode*
spans), or where none is, each take one average head's share, so they neither
steal from nor hand energy to the others. Not a head's share where some decode:
beside a long prompt's prefill a head's share is a share of that prefill, which
a sequence decoding then does not cost (``bench/RESULTS.md``, "Requests of
unknown rate beside a prefill").
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

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
    """Constant work rate over ``[start, end)``; ``rate`` None means not yet known; ``decode``: the work of
    tokens after a request's first (not its prefill, not the time after its last token)."""

    start: float
    end: float
    rate: float | None
    decode: bool = False


@dataclass(slots=True)
class Split:
    """Result of splitting ``[a, b)`` of one GPU's energy, in joules."""

    shares: dict[Hashable, float]
    idle: float
    unattributed: float
    carry: float  # idle energy held back for ``amortize``, not yet given to a request
    measured: float = 0.0  # the GPU's energy over the slice, from the samples
    # Each request's share of the GPU's time (s), split as the energy is: the "time reserved" of its embodied
    # carbon. Idle time is nobody's; foreign sequences take their heads' share.
    seconds: dict[Hashable, float] = field(default_factory=dict)

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
        out.append(Span(prev, t, pending / (t - prev), decode=bool(out)))
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
        out.append(Span(last.start, activity.end, work / (activity.end - last.start), last.decode))
    return out


def energy_at(samples: Sequence[tuple[float, float]], times: Sequence[float]) -> list[float]:
    """Cumulative energy (J) at each of ``times``, linearly interpolated.

    ``samples`` are ``(time, cumulative_joules)`` in time order. Outside the
    sampled range the nearest sample's value is used (as in :func:`split_arrays`).
    """
    st = np.array(samples, dtype=float).reshape(-1, 2)
    return np.interp(np.asarray(times, dtype=float), st[:, 0], st[:, 1]).tolist()


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
    keys = list(participants)
    flat = [
        (k, sp.start, sp.end, math.nan if sp.rate is None else sp.rate, sp.decode)
        for k, key in enumerate(keys)
        for sp in participants[key]
    ]
    arr = np.array(flat, dtype=float).reshape(-1, 5)
    split = split_arrays(
        samples, arr[:, 0].astype(np.intp), arr[:, 1], arr[:, 2], arr[:, 3], len(keys), a, b,
        decode=arr[:, 4] > 0.5, foreign=foreign, carry=carry, amortize=amortize,
    )
    return Split(
        dict(zip(keys, split.shares.values())), split.idle, split.unattributed, split.carry, split.measured,
        dict(zip(keys, split.seconds.values())),
    )


def split_arrays(
    samples: Sequence[tuple[float, float]],
    key_idx: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    rate: np.ndarray,
    n_keys: int,
    a: float,
    b: float,
    *,
    decode: np.ndarray | None = None,
    decode_rate: float | None = None,
    foreign: Sequence[tuple[float, float, int]] = (),
    carry: float = 0.0,
    amortize: bool = False,
    time_shares: bool = True,
) -> Split:
    """:func:`split_energy` on flat span arrays (``rate`` NaN: unknown; ``decode``: which spans are
    :attr:`Span.decode`, None: none); shares keyed 0..n_keys-1 (``time_shares`` False: no ``seconds``,
    for splits that need only the energy). ``decode_rate``: the work rate of a sequence of unknown rate
    where some work is known but none decodes (a GPU's learnt decode rate; None: a head's share there).

    One vectorised sweep: O((spans + samples) log(spans + samples)).
    """
    if b <= a:
        return Split({k: 0.0 for k in range(n_keys)}, 0.0, 0.0, carry, seconds={k: 0.0 for k in range(n_keys)})
    s, e = np.clip(start, a, b), np.clip(end, a, b)
    keep = e > s
    key_idx, s, e, rate = key_idx[keep], s[keep], e[keep], rate[keep]
    known = ~np.isnan(rate)
    rate_k = np.where(known, rate, 0.0)
    decoding = known & (np.zeros(len(rate), bool) if decode is None else decode[keep])

    far = np.array([(max(fs, a), min(fe, b), n) for fs, fe, n in foreign if n > 0], dtype=float).reshape(-1, 3)
    far = far[far[:, 1] > far[:, 0]]
    st = np.array(samples, dtype=float).reshape(-1, 2)
    inner = st[(st[:, 0] > a) & (st[:, 0] < b), 0]
    # Each boundary's segment index comes from unique's inverse: cheaper than searching the points again.
    points, where = np.unique(np.concatenate((s, e, far[:, 0], far[:, 1], [a, b], inner)), return_inverse=True)
    n = len(points)
    i0, i1, f0, f1 = np.split(where[: 2 * (len(s) + len(far))], np.cumsum([len(s), len(s), len(far)]))

    def level(lo: np.ndarray, hi: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Per segment, the sum of ``weight`` over the intervals covering it."""
        return np.cumsum(np.bincount(lo, weight, minlength=n) - np.bincount(hi, weight, minlength=n))[:-1]

    rate_sum = level(i0, i1, rate_k)
    n_pos = level(i0, i1, (rate_k > 0).astype(float))
    n_known = level(i0, i1, known.astype(float))
    n_unknown = level(i0, i1, (~known).astype(float))
    n_foreign = level(f0, f1, far[:, 2])
    n_decoding = level(i0, i1, decoding.astype(float))
    decode_sum = level(i0, i1, np.where(decoding, rate_k, 0.0))
    rate_sum[n_pos < 0.5] = 0.0  # drop float residue so "nobody has work" is exact

    energy = np.interp(points, st[:, 0], st[:, 1])
    de = np.diff(energy)
    active = n_known + n_unknown > 0.5
    idle_seg = ~active & (n_foreign < 0.5)
    unattributed = float(de[~active & ~idle_seg].sum())
    idle = 0.0
    if amortize:
        # Idle energy waits and joins the next slice that has a request.
        pooled = carry + np.cumsum(np.where(idle_seg, de, 0.0))
        act = np.flatnonzero(active)
        if len(act):
            de = de.copy()
            de[act] += np.diff(pooled[act], prepend=0.0)
            carry = float(pooled[-1] - pooled[act[-1]])
        else:
            carry = float(pooled[-1])
    else:
        idle = float(de[idle_seg].sum())

    heads = np.where(active, n_known + n_unknown + n_foreign, 1.0)
    by_work = active & (rate_sum > 0)
    # Where some decode, each request of unknown rate and each foreign sequence works at their mean rate.
    beside_decoding = (n_decoding > 0.5) & (decode_sum > 0)
    guessed = active & (n_unknown + n_foreign > 0.5) & (beside_decoding | (by_work & (decode_rate is not None)))
    mean_decode = np.where(beside_decoding, decode_sum / np.where(beside_decoding, n_decoding, 1.0), decode_rate or 0.0)
    mean_decode = np.where(guessed, mean_decode, 0.0)
    work_sum = np.where(by_work, rate_sum, 1.0) + (n_unknown + n_foreign) * mean_decode
    work_weight = np.where(guessed, 1.0 / work_sum, n_known / (heads * work_sum))
    unknown_part = np.where(guessed, mean_decode / work_sum, 1.0 / heads)  # of the segment's amount, each

    def per_key(amount: np.ndarray) -> np.ndarray:
        """Each key's share of ``amount`` (per segment): by work where known, else as the module says."""
        head_share = np.where(active, amount * unknown_part, 0.0)
        per_work = np.where(by_work, amount * work_weight, 0.0)
        known_heads = np.where(active & ~by_work, head_share, 0.0)
        cum_f, cum_hk, cum_hu = (np.concatenate(([0.0], np.cumsum(x))) for x in (per_work, known_heads, head_share))
        share = np.where(
            known,
            rate_k * (cum_f[i1] - cum_f[i0]) + cum_hk[i1] - cum_hk[i0],
            cum_hu[i1] - cum_hu[i0],
        )
        return np.bincount(key_idx, share, minlength=n_keys)

    unattributed += float((n_foreign * np.where(active, de * unknown_part, 0.0)).sum())
    joules = per_key(de)
    seconds: dict[Hashable, float] = dict(enumerate(per_key(np.diff(points)).tolist())) if time_shares else {}
    measured = float(energy[-1] - energy[0])
    return Split(dict(enumerate(joules.tolist())), idle, unattributed, carry, measured, seconds)


def activity_spans(
    starts: np.ndarray,
    prefill: np.ndarray,
    ends: np.ndarray,
    counts_per: np.ndarray,
    times: np.ndarray,
    counts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`spans` of many requests at once, as flat ``(key_idx, start, end, rate, decode)`` arrays.

    Request ``k`` starts at ``starts[k]`` with ``prefill[k]`` work, has
    ``counts_per[k]`` arrivals (consecutive in ``times``/``counts``) and ends at
    ``ends[k]`` (NaN: still open, its tail rate unknown). An arrival closer than
    ``MIN_SPAN_S`` to the one before is merged into the next span, as in :func:`spans`.
    """
    n_keys, n = len(starts), len(times)
    idx = np.arange(n)
    owner = np.repeat(np.arange(n_keys), counts_per)
    first = np.concatenate(([0], np.cumsum(counts_per)[:-1])).astype(np.intp)
    has = counts_per > 0
    work = counts.astype(float)
    work[first[has]] += prefill[has]
    cum = np.concatenate(([0.0], np.cumsum(work)))  # cum[i]: work of arrivals before i
    prev = np.empty(n)
    prev[1:] = times[:-1]
    prev[first[has]] = starts[has]
    kept = times - prev >= MIN_SPAN_S
    # Whether an arrival starts a span depends on the last one that did: settle the few requests
    # with arrivals closer than MIN_SPAN_S (bursts read together) one by one.
    for g in np.unique(owner[~kept]):
        boundary = starts[g]
        for i in range(first[g], first[g] + counts_per[g]):
            kept[i] = times[i] - boundary >= MIN_SPAN_S
            if kept[i]:
                boundary = times[i]
    # For each arrival, the last kept arrival at or before it, within its own request (-1: none).
    last_kept = np.maximum.accumulate(np.where(kept, idx, -1)) if n else idx
    group_first = first[owner]
    before = np.concatenate(([-1], last_kept[:-1])) if n else idx
    before = np.where(before >= group_first, before, -1)
    k = np.flatnonzero(kept)
    base_idx = np.where(before[k] >= 0, before[k] + 1, group_first[k])
    span_start = np.where(before[k] >= 0, times[np.maximum(before[k], 0)], starts[owner[k]])
    rate = (cum[k + 1] - cum[base_idx]) / (times[k] - span_start)
    decode = before[k] >= 0  # a span after the request's first
    # The tail after each request's last kept arrival: the work left over, then nothing (ended) or unknown (open).
    last_idx = first + counts_per - 1
    tail_kept = np.where(has, last_kept[np.maximum(last_idx, 0)] if n else -1, -1)
    tail_kept = np.where(tail_kept >= first, tail_kept, -1)
    tail_start = np.where(tail_kept >= 0, times[np.maximum(tail_kept, 0)] if n else starts, starts)
    tail_from = np.where(tail_kept >= 0, tail_kept + 1, first)
    pending = np.where(has, cum[np.minimum(last_idx + 1, n)] - cum[np.minimum(tail_from, n)], prefill)
    open_ = np.isnan(ends)
    tail_end = np.where(open_, math.inf, ends)
    # Work left after the last kept arrival of a request that ended within MIN_SPAN_S of it
    # goes to that arrival's span, as :func:`spans` does.
    fold = ~open_ & (tail_kept >= 0) & (tail_end - tail_start < MIN_SPAN_S) & (pending > 0)
    if fold.any():
        pos = np.searchsorted(k, tail_kept[fold])
        rate[pos] += pending[fold] / (times[k[pos]] - span_start[pos])
        pending = np.where(fold, 0.0, pending)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail_rate = np.where(open_, math.nan, pending / np.maximum(tail_end - tail_start, MIN_SPAN_S))
    return (
        np.concatenate((owner[k], np.arange(n_keys))),
        np.concatenate((span_start, tail_start)),
        np.concatenate((times[k], tail_end)),
        np.concatenate((rate, tail_rate)),
        np.concatenate((decode, np.zeros(n_keys, bool))),
    )

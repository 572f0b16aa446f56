"""The work model of requests in the meter: what each did when, as flat work-rate spans.

A request's work is its decode tokens, each spread over the time since the
previous one, plus its prompt tokens times the model's prefill weight, spread
over the time to its first token (see :mod:`meter.attribution`).

A request whose tokens the gateway does not see (a plain response, whose tokens
come only at its end; a stream before its first token) is modelled the same way
by the live split behind provisional figures and by the settled one: its
prompt's and first token's work up to ``prefill_until`` (its start plus the GPU's
time to first token for its prompt when it began, :mod:`meter.first_token`), then rate unknown
(it works at the rate of the requests decoding beside it, :mod:`meter.attribution`) up to its end.
Each of its decode steps costs the GPU about what anyone else's does, and how its tokens fell in
time is not known, so the same guess serves both passes and they agree (before, the settled pass placed its tokens evenly after a first
one and the live one gave it heads, and the first plain request of a burst came
out far apart: ``bench/RESULTS.md``, "One guess for requests seen without tokens").
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from wattgate.meter.attribution import activity_spans

#: The work of a request's first token, made at the end of its prefill. A stream's first span holds its
#: prompt and its first token; a request seen without tokens holds the same up to ``prefill_until``. With
#: the prompt alone there, plain calls came out 1-3 % under streams of the same work against a truth
#: the gateway cannot see (``bench/RESULTS.md``, "Streams and plain calls: the first token").
FIRST_TOKEN = 1.0

Spans = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # key_idx, start, end, rate, decode


class Work(Protocol):
    """What the work model reads of a request window (times on the meter's clock, s)."""

    start: float
    end: float | None
    prompt_tokens: int
    prefill_weight: float
    times: list[float]  # arrival time of each token record
    counts: list[float]  # tokens in each record
    unseen_tokens: int  # tokens that came without arrival times (a plain response)
    prefill_until: float | None  # see the module's docstring


def span_from(req: Work, t: float) -> tuple[int, float, float]:
    """Index of ``req``'s first token record after ``t``, the start of the span holding ``t``, and its prefill work."""
    i = bisect.bisect_right(req.times, t)
    if i == 0:
        return 0, req.start, req.prompt_tokens * req.prefill_weight
    return i, req.times[i - 1], 0.0


def spans_since(reqs: Sequence[Work], t: float) -> Spans:
    """Flat work-rate spans of ``reqs`` from ``t`` on (see :func:`~meter.attribution.activity_spans`),
    those of requests without seen tokens as the module's docstring says."""
    starts, prefill, ends, per, times, counts = [], [], [], [], [], []
    unseen = []  # requests seen without tokens: open ones, and plain responses
    for k, req in enumerate(reqs):
        if not req.times and (req.end is None or req.unseen_tokens):
            unseen.append(k)
        i, start, work = span_from(req, t)
        starts.append(start)
        prefill.append(work)
        n = min(len(req.times), len(req.counts))  # tokens() may be between its two appends
        times.extend(req.times[i:n])
        counts.extend(req.counts[i:n])
        per.append(max(n - i, 0))
        ends.append(math.nan if req.end is None else req.end)
    f = np.asarray
    # fromiter with a count: a third faster than asarray on the long lists (one entry per token).
    spans = activity_spans(f(starts, float), f(prefill, float), f(ends, float), f(per, np.intp),
                           np.fromiter(times, float, len(times)), np.fromiter(counts, float, len(counts)))
    return _prefill_then_heads(spans, reqs, unseen, prefill) if unseen else spans


def _prefill_then_heads(spans: Spans, reqs: Sequence[Work], unseen: list[int], prefill: list[float]) -> Spans:
    """``spans`` with each request in ``unseen`` (indices into ``reqs``, which have no token records, so
    one span each: the last of each request's) made its prompt's work up to its ``prefill_until``, then
    rate unknown up to its end."""
    key_idx, start, end, rate, decode = spans
    first_tail = len(key_idx) - len(reqs)  # activity_spans puts each request's last span at the end, in order
    extra: list[tuple[int, float, float, float]] = []
    for k in unseen:
        tail, req = first_tail + k, reqs[k]
        until = req.prefill_until
        if until is not None and until > req.start:
            work = prefill[k] + FIRST_TOKEN  # the first token ends the prefill, as a stream's first span does
            extra.append((k, req.start, min(until, end[tail]), work / (until - req.start)))
            start[tail] = min(max(start[tail], until), end[tail])
        rate[tail] = math.nan
    if not extra:
        return key_idx, start, end, rate, decode
    k_extra, s_extra, e_extra, r_extra = (np.array(col) for col in zip(*extra))
    return (np.concatenate((key_idx, k_extra.astype(key_idx.dtype))), np.concatenate((start, s_extra)),
            np.concatenate((end, e_extra)), np.concatenate((rate, r_extra)),
            np.concatenate((decode, np.zeros(len(extra), bool))))

"""The work model of requests in the meter: what each did when, as flat work-rate spans.

A request's work is its decode tokens, each spread over the time since the
previous one, plus its prompt tokens times the model's prefill weight, spread
over the time to its first token (see :mod:`meter.attribution`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from wattgate.meter.attribution import activity_spans

Spans = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class Work(Protocol):
    """What the work model reads of a request window (times on the meter's clock, s)."""

    start: float
    end: float | None
    prompt_tokens: int
    prefill_weight: float
    times: list[float]  # arrival time of each token record
    counts: list[float]  # tokens in each record


def span_from(req: Work, t: float) -> tuple[int, float, float]:
    """Index of ``req``'s first token record after ``t``, the start of the span holding ``t``, and its prefill work."""
    i = bisect.bisect_right(req.times, t)
    if i == 0:
        return 0, req.start, req.prompt_tokens * req.prefill_weight
    return i, req.times[i - 1], 0.0


def spans_since(reqs: Sequence[Work], t: float) -> Spans:
    """Flat work-rate spans of ``reqs`` from ``t`` on (see :func:`~meter.attribution.activity_spans`)."""
    starts, prefill, ends, per, times, counts = [], [], [], [], [], []
    for req in reqs:
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
    return activity_spans(f(starts, float), f(prefill, float), f(ends, float), f(per, np.intp),
                          np.fromiter(times, float, len(times)), np.fromiter(counts, float, len(counts)))

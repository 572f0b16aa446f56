"""The attribution contract (docs/architecture.md, "Settled attribution"), one property per test, on random traces and schedules."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattgate.meter.attribution import Activity, Span, energy_at, spans, split_energy
from wattgate.meter.energy_trace import interp

T_END = 10.0


@st.composite
def traces(draw: st.DrawFn) -> list[tuple[float, float]]:
    """Cumulative counter samples over [0, T_END] with random step times and powers."""
    n = draw(st.integers(2, 40))
    times = sorted({0.0, T_END, *draw(st.lists(st.floats(0.01, T_END - 0.01), min_size=n, max_size=n))})
    energy, out = 1e6 * draw(st.floats(0, 1)), []  # counters start anywhere
    for i, t in enumerate(times):
        if i:
            energy += draw(st.floats(60, 700)) * (t - times[i - 1])
        out.append((t, energy))
    return out


@st.composite
def activities(draw: st.DrawFn, start: float | None = None, end: float | None = None) -> Activity:
    s = draw(st.floats(0, T_END - 0.5)) if start is None else start
    e = draw(st.floats(s + 0.05, T_END)) if end is None else end
    k = draw(st.integers(0, 30))
    times = sorted(draw(st.lists(st.floats(s, e), min_size=k, max_size=k)))
    return Activity(s, [(t, draw(st.integers(1, 4))) for t in times], e, draw(st.integers(0, 200)) * 0.2)


def measured(trace: list[tuple[float, float]]) -> float:
    return trace[-1][1] - trace[0][1]


@settings(max_examples=150, deadline=None)
@given(traces(), st.lists(activities(), min_size=0, max_size=12), st.integers(0, 3), st.booleans())
def test_conservation(trace, acts, foreign_n, amortize):
    parts = {i: spans(a) for i, a in enumerate(acts)}
    foreign = [(2.0, 6.0, foreign_n)] if foreign_n else []
    split = split_energy(trace, parts, 0.0, T_END, foreign=foreign, amortize=amortize)
    total = split.attributed + split.idle + split.unattributed + split.carry
    assert math.isclose(total, measured(trace), rel_tol=1e-3)  # contract: within 0.1 %
    assert math.isclose(total, measured(trace), rel_tol=1e-9)  # in fact exact up to rounding
    assert all(v >= -1e-9 for v in split.shares.values())


def busy_time(acts: list[Activity], foreign: list[tuple[float, float, int]]) -> float:
    """Seconds of [0, T_END] in which at least one request or foreign sequence was active."""
    edges = sorted({0.0, T_END, *(a.start for a in acts), *(a.end for a in acts if a.end is not None),
                    *(t for f in foreign for t in f[:2])})
    busy = 0.0
    for lo, hi in itertools.pairwise(edges):
        mid = (lo + hi) / 2
        if any(a.start <= mid < (a.end or T_END) for a in acts) or any(f[0] <= mid < f[1] for f in foreign):
            busy += hi - lo
    return busy


@settings(max_examples=150, deadline=None)
@given(traces(), st.lists(activities(), min_size=0, max_size=12), st.integers(0, 3))
def test_gpu_time_is_split_like_the_energy_and_conserved(trace, acts, foreign_n):
    """Each request's share of the GPU's time (the basis of its embodied carbon) comes from the same weights as
    its energy: the busy time is split exactly, foreign sequences keep theirs, a lone request gets its window."""
    parts = {i: spans(a) for i, a in enumerate(acts)}
    foreign = [(2.0, 6.0, foreign_n)] if foreign_n else []
    split = split_energy(trace, parts, 0.0, T_END, foreign=foreign)
    assert all(v >= -1e-9 for v in split.seconds.values())
    assert sum(split.seconds.values()) <= busy_time(acts, foreign) + 1e-6
    if not foreign:
        assert math.isclose(sum(split.seconds.values()), busy_time(acts, []), rel_tol=1e-9, abs_tol=1e-9)
    if len(acts) == 1 and not foreign:
        assert math.isclose(split.seconds[0], acts[0].end - acts[0].start, rel_tol=1e-9)


def test_gpu_time_of_two_equal_requests_is_halved_where_they_overlap():
    trace = [(0.0, 0.0), (4.0, 1600.0)]
    a = Activity(0.0, [(t / 10, 1) for t in range(1, 31)], 3.0)  # 10 tokens/s over [0, 3)
    b = Activity(1.0, [(1 + t / 10, 1) for t in range(1, 31)], 4.0)  # the same over [1, 4)
    split = split_energy(trace, {"a": spans(a), "b": spans(b)}, 0.0, 4.0)
    assert split.seconds["a"] == pytest.approx(1.0 + 2.0 / 2) and split.seconds["b"] == pytest.approx(2.0 / 2 + 1.0)


@settings(max_examples=100, deadline=None)
@given(traces(), activities())
def test_isolation(trace, act):
    split = split_energy(trace, {"lone": spans(act)}, 0.0, T_END)
    e0, e1 = energy_at(trace, [act.start, act.end])
    assert math.isclose(split.shares["lone"], e1 - e0, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(split.idle, measured(trace) - (e1 - e0), rel_tol=1e-9, abs_tol=1e-6)


@settings(max_examples=100, deadline=None)
@given(traces(), activities(), st.integers(2, 8), st.lists(activities(), max_size=5))
def test_symmetry(trace, act, copies, others):
    parts = {("same", i): spans(act) for i in range(copies)}
    parts.update({("other", i): spans(a) for i, a in enumerate(others)})
    split = split_energy(trace, parts, 0.0, T_END)
    same = [split.shares[("same", i)] for i in range(copies)]
    assert max(same) - min(same) <= 0.01 * max(max(same), 1e-9)


@settings(max_examples=100, deadline=None)
@given(traces(), activities(), st.lists(activities(), min_size=1, max_size=6), st.integers(1, 5))
def test_monotonicity(trace, act, others, extra):
    """More work in the same window never gets less energy."""
    more = Activity(act.start, [(t, n + extra) for t, n in act.arrivals], act.end, act.prefill_work + extra)
    parts = {i: spans(a) for i, a in enumerate(others)}
    base = split_energy(trace, {**parts, "x": spans(act)}, 0.0, T_END).shares["x"]
    bigger = split_energy(trace, {**parts, "x": spans(more)}, 0.0, T_END).shares["x"]
    # Relative 1e-8: sums of many same-time arrivals round differently (hypothesis found 1.1e-9 on 6.76 J).
    assert bigger >= base - 1e-8 * max(base, 1.0)


def test_work_weighted_split():
    """Two requests in the same window, one decoding three times as many tokens, get 1/4 and 3/4."""
    trace = [(0.0, 0.0), (1.0, 400.0)]
    a = Activity(0.0, [(0.5, 1), (1.0, 1)], 1.0)
    b = Activity(0.0, [(0.5, 3), (1.0, 3)], 1.0)
    split = split_energy(trace, {"a": spans(a), "b": spans(b)}, 0.0, 1.0)
    assert math.isclose(split.shares["a"], 100.0) and math.isclose(split.shares["b"], 300.0)


def test_prefill_weight_counts_prompt_tokens():
    trace = [(0.0, 0.0), (1.0, 100.0)]
    long_prompt = Activity(0.0, [(1.0, 1)], 1.0, prefill_work=9.0)
    short_prompt = Activity(0.0, [(1.0, 1)], 1.0, prefill_work=0.0)
    split = split_energy(trace, {"long": spans(long_prompt), "short": spans(short_prompt)}, 0.0, 1.0)
    # Work 9 + 1 against 0 + 1 over the same window.
    assert math.isclose(split.shares["long"], 1000 / 11) and math.isclose(split.shares["short"], 100 / 11)


def test_idle_exclude_reports_idle():
    trace = [(0.0, 0.0), (10.0, 1000.0)]
    split = split_energy(trace, {"r": spans(Activity(5.0, [(6.0, 1)], 6.0))}, 0.0, 10.0)
    assert math.isclose(split.shares["r"], 100.0) and math.isclose(split.idle, 900.0) and split.carry == 0


def test_idle_amortize_goes_to_next_requests():
    trace = [(0.0, 0.0), (10.0, 1000.0)]
    parts = {"a": spans(Activity(5.0, [(6.0, 1)], 6.0)), "b": spans(Activity(5.0, [(6.0, 1)], 6.0))}
    split = split_energy(trace, parts, 0.0, 10.0, amortize=True)
    # 500 J of idle before them is shared by the next requests; the 400 J after them waits.
    assert math.isclose(split.shares["a"], 300.0) and math.isclose(split.shares["b"], 300.0)
    assert split.idle == 0 and math.isclose(split.carry, 400.0)


def test_foreign_work_is_unattributed():
    """Sequences that bypassed the gateway take their head's share; alone, all of it."""
    trace = [(0.0, 0.0), (2.0, 800.0)]
    parts = {"r": spans(Activity(0.0, [(0.5, 1), (1.0, 1)], 1.0))}
    split = split_energy(trace, parts, 0.0, 2.0, foreign=[(0.0, 2.0, 3)])
    assert math.isclose(split.shares["r"], 100.0)
    assert math.isclose(split.unattributed, 700.0) and split.idle == 0


def test_unknown_rate_takes_average_head_share():
    """A request whose next token has not arrived neither steals from nor gives to the others."""
    trace = [(0.0, 0.0), (1.0, 300.0)]
    known = {i: spans(Activity(0.0, [(1.0, 5)], 1.0)) for i in range(2)}
    split = split_energy(trace, {**known, "open": spans(Activity(0.0))}, 0.0, 1.0)
    assert all(math.isclose(v, 100.0) for v in split.shares.values())


def test_unknown_rate_beside_a_prefill_decodes_as_the_decoding_requests_do():
    """Beside a long prompt's prefill, a request of unknown rate (a plain call) is taken to decode as the
    requests decoding then do on average, not to take a head's share, most of which is the prefill's."""
    trace = [(0.0, 0.0), (1.0, 1000.0)]
    prefilling = spans(Activity(0.0, [(1.0, 1)], 1.0, prefill_work=97.0))  # its first span: not decode
    decoding = spans(Activity(-1.0, [(0.0, 1), (0.5, 1), (1.0, 1)], 1.0))  # 2 tokens/s here, decode spans
    parts = {"prefill": prefilling, "decode": decoding, "plain": [Span(0.0, 1.0, None)]}
    split = split_energy(trace, parts, 0.0, 1.0)
    # Work per second: 98 + 2 + 2 (the plain call at the decoding one's rate).
    assert split.shares["plain"] == pytest.approx(1000 * 2 / 102)
    assert split.shares["decode"] == pytest.approx(1000 * 2 / 102)
    assert split.shares["prefill"] == pytest.approx(1000 * 98 / 102)
    # Where nothing decodes, it takes an average head's share as before.
    alone = split_energy(trace, {"prefill": prefilling, "plain": [Span(0.0, 1.0, None)]}, 0.0, 1.0)
    assert alone.shares["plain"] == pytest.approx(500.0)


@settings(max_examples=300, deadline=None)
@given(traces(), st.lists(activities(), min_size=1, max_size=8), st.lists(st.booleans(), min_size=8, max_size=8))
def test_vectorised_spans_match_spans(trace, acts, open_flags):
    """The meter's flat, vectorised spans split energy exactly as the per-request spans do."""
    import numpy as np

    from wattgate.meter.attribution import activity_spans, split_arrays

    acts = [Activity(a.start, a.arrivals, None if o else a.end, a.prefill_work) for a, o in zip(acts, open_flags)]
    by_spans = split_energy(trace, {i: spans(a) for i, a in enumerate(acts)}, 0.0, T_END)
    flat = activity_spans(
        np.array([a.start for a in acts]),
        np.array([a.prefill_work for a in acts]),
        np.array([np.nan if a.end is None else a.end for a in acts]),
        np.array([len(a.arrivals) for a in acts], dtype=np.intp),
        np.array([t for a in acts for t, _ in a.arrivals], dtype=float),
        np.array([n for a in acts for _, n in a.arrivals], dtype=float),
    )
    key_idx, start, end, rate, decode = flat
    by_arrays = split_arrays(trace, key_idx, start, end, rate, len(acts), 0.0, T_END, decode=decode)
    total = measured(trace)
    for i in range(len(acts)):
        # Arrivals closer than MIN_SPAN_S are merged by one and clamped by the other: equal to 1e-3 of the total.
        assert by_arrays.shares[i] == pytest.approx(by_spans.shares[i], abs=1e-3 * total)
    assert by_arrays.idle == pytest.approx(by_spans.idle, abs=1e-3 * total)


def test_a_request_seen_without_tokens_prefills_then_takes_an_average_head():
    """meter.work: a plain response, or a stream before its first token, is its prompt's and first
    token's work up to ``prefill_until`` (as a stream's first span is), then rate unknown (an average head); one with no tokens at all (embeddings)
    keeps its prompt's work over its whole window."""
    from wattgate.meter.window import Request
    from wattgate.meter.work import spans_since

    plain = Request("p", (0,), 1.0, 0.2, 8.0, 100, end=3.0, unseen_tokens=50, prefill_until=1.1)
    opened = Request("o", (0,), 1.5, 0.2, 8.0, 100, prefill_until=1.6)
    early = Request("e", (0,), 1.5, 0.2, 8.0, 100)  # no time to first token known yet: a head from its start
    embedding = Request("m", (0,), 1.0, 0.2, 8.0, 100, end=2.0)
    key_idx, start, end, rate, _ = spans_since([plain, opened, early, embedding], 0.0)
    got = sorted((int(k), float(s), float(e), None if math.isnan(r) else round(float(r), 6))
                 for k, s, e, r in zip(key_idx, start, end, rate) if e > s)
    assert got == [
        (0, 1.0, 1.1, 210.0),  # 100 prompt tokens x 0.2 and the first token over 0.1 s
        (0, 1.1, 3.0, None),
        (1, 1.5, 1.6, 210.0),
        (1, 1.6, math.inf, None),
        (2, 1.5, math.inf, None),
        (3, 1.0, 2.0, 20.0),
    ]


@given(traces(), st.lists(st.floats(-1.0, T_END + 1.0), min_size=1, max_size=20))
def test_a_curve_read_between_its_points_is_numpys_linear_interpolation(trace, times):
    # The sampler reads provisional figures off a curve with this binary search (meter.energy_trace.interp);
    # the settled pass reads the same curves with np.interp. Both clamp at the ends.
    ts, es = zip(*trace, strict=True)
    for t in times:
        assert interp(trace, t) == pytest.approx(float(np.interp(t, ts, es)), rel=1e-12, abs=1e-9)

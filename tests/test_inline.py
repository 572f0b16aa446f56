"""Inline (provisional) figures: bounded by what was measured, close to the settled ones, the same
for streamed and plain requests (issue 12). The meter runs on scripted GPUs and a scripted clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.replay import SPARSE_COUNTER_S, Planned, Replayed, Scripted, replay, run_trace, simulate, summary, workload

POLL_S = 0.05
# Requests come once the sampler has learnt when the counter steps (meter.counter_steps: about 2.5 s
# from start-up), as in a gateway that has been up for a few seconds. While it learns, a step is
# stamped up to half a poll off, which moves up to 1 % of a 1 s window's energy across its ends.
WARM_S = 4.0
# Once learnt, a counter step is stamped within a few ms of where it happened (before, at the
# midpoint of the polls around it, and the same few ms for every step, as the polls kept one phase):
# the meter's energy of a stretch can be that much off the GPU's.
STAMP_SLACK_S = 0.005


@st.composite
def schedules(draw: st.DrawFn) -> list[Scripted]:
    """Up to 12 requests over 4 s once the sampler is warm, streamed or plain, each with its own token pace."""
    out = []
    for i in range(draw(st.integers(1, 12))):
        start = WARM_S + draw(st.floats(0, 3.5))
        end = start + draw(st.floats(0.02, 2.0))
        stream = draw(st.booleans())
        gap = draw(st.floats(0.003, 0.2))
        first = start + draw(st.floats(0.001, 0.1))
        tokens = [t for k in range(2000) if (t := first + k * gap) < end]
        out.append(Scripted(f"r{i}", stream, len(tokens), start, first, tokens=tokens, end=end))
    return out


@st.composite
def traces(draw: st.DrawFn, constant: bool = False, with_sensor: bool = True) -> list[tuple[float, float, float | None]]:
    """A GPU's counter and power over 11 s: power steps at random times, the counter every 100 ms
    (or every 50 or 250 ms). Without ``with_sensor``, the GPU reports no power."""
    power = draw(st.floats(60, 700))
    steps = sorted(draw(st.lists(st.floats(WARM_S - 1, 11.0), max_size=0 if constant else 30)))
    levels = [draw(st.floats(60, 700)) for _ in steps]
    counter_step = draw(st.sampled_from([0.1, 0.05, 0.25]))
    out, energy, t = [], 1000.0, 0.0
    while t <= 11.0:
        for at, level in zip(steps, levels):
            if at <= t:
                power = level
        counter = energy if round(t / counter_step, 6) % 1 == 0 else out[-1][1]
        out.append((round(t, 6), counter, power if with_sensor else None))
        energy += power * 0.01
        t += 0.01
    return out


def _clusters(results: list[Replayed]) -> list[list[Replayed]]:
    """Requests grouped by overlapping windows."""
    groups: list[list[Replayed]] = []
    for r in sorted(results, key=lambda r: r.start):
        if groups and r.start < max(x.end for x in groups[-1]):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


@settings(max_examples=30, deadline=None)
@given(schedules(), traces(with_sensor=False))
def test_an_inline_figure_never_exceeds_the_energy_of_its_window(seqs, trace):
    for r in replay(seqs, trace, interval_s=POLL_S):
        # window_j: the energy the meter saw over the window when it ended. With the counter alone,
        # the live slices were split from those very readings, so the bound is exact.
        assert 0 <= r.inline.joules <= r.window_j * (1 + 1e-9) + 1e-9, r
        assert not r.inline.settled and r.settled.settled


@settings(max_examples=30, deadline=None, print_blob=True)
@given(schedules(), traces(), st.sampled_from([None, SPARSE_COUNTER_S]))
def test_an_inline_figure_stays_within_what_the_gpu_can_draw(seqs, trace, counter_every_s):
    # With a power sensor, the live slices are split from the power read since the counter's last
    # step, which its next step rescales (by 4 % at most over 150 random traces, read every poll),
    # so the bound is the power the GPU drew over the window and the sensors' disagreement. Read
    # sparsely, the meter also scales that power by how the sensors agreed over the last counter
    # intervals, which after a change of load need not hold for this window: a random trace made it
    # 1.10 for a 23 ms request at 115 W (CI, 2026-11-28); a trace whose polls miss 30 ms spikes for
    # seconds, then goes flat, makes it 4.2 (bench/RESULTS.md, "Provisional vs settled").
    for r in replay(seqs, trace, interval_s=POLL_S, counter_every_s=counter_every_s):
        drawn = max(p for t, _, p in trace if r.start - 0.05 <= t <= r.end + 0.05) * (r.end - r.start)
        scaled = max(r.agreement or 1.0, 1.0) if counter_every_s is not None else 1.0
        assert 0 <= r.inline.joules <= drawn * 1.1 * scaled, r


def _spikes_then_flat(flat_from: float) -> list[tuple[float, float, float | None]]:
    """A GPU at 60 W that draws 700 W for 30 ms in the middle of every 50 ms, between the polls (which
    see only the 60 W), until ``flat_from``; 115 W from then on. The counter steps every 100 ms."""
    out: list[tuple[float, float, float | None]] = []
    energy = 1000.0
    for k in range(1101):
        t = k / 100
        power = 115.0 if t >= flat_from else 700.0 if 1 <= k % 5 <= 3 else 60.0
        out.append((t, energy if k % 10 == 0 else out[-1][1], power))
        energy += power * 0.01
    return out


@pytest.mark.xfail(strict=True, reason="needs work: read sparsely, power is scaled by the sensors' agreement of "
                   "the last counter intervals, which a change of load leaves stale (4.2x here)")
def test_an_inline_figure_after_the_sensors_disagreed_is_not_scaled_by_it():
    """The power polls missed the spikes for seconds, so the counter read 4 times what power did; then the
    load went flat, and power and counter agree again. A request in the flat stretch drew 115 W."""
    seqs = [Scripted("r0", stream=False, max_tokens=0, start=7.238, first_at=7.3, end=7.262)]
    r = replay(seqs, _spikes_then_flat(7.0), interval_s=POLL_S, counter_every_s=SPARSE_COUNTER_S)[0]
    assert math.isclose(r.settled.joules, 115.0 * (r.end - r.start), rel_tol=0.01)  # the settled figure is right
    assert r.inline.joules <= r.settled.joules * 1.15, (r.inline.joules, r.settled.joules, r.agreement)


@settings(max_examples=30, deadline=None)
@given(schedules(), traces(constant=True))
def test_inline_figures_of_concurrent_requests_add_up_to_at_most_the_gpu_energy(seqs, trace):
    power = trace[0][2]  # constant: the energy of any stretch of time is known exactly
    for group in _clusters(replay(seqs, trace, interval_s=POLL_S)):
        span = max(r.end for r in group) - min(r.start for r in group)
        assert sum(r.inline.joules for r in group) <= power * (span + 2 * STAMP_SLACK_S) * (1 + 1e-9) + 1e-6


def test_inline_is_within_5_percent_of_settled_while_concurrency_changes():
    """Concurrency 1 -> 16 -> 1 -> 8 -> 1 -> 12 -> 1, half streamed, on the H100-like counter read sparsely."""
    results = replay(*simulate(workload((1, 16, 1, 8, 1, 12, 1))), counter_every_s=SPARSE_COUNTER_S)
    pairs = [(r.stream, r.inline.joules, r.settled.joules) for r in results]
    for kind, s in summary(pairs).items():
        assert s["p95"] <= 0.05 and s["worst"] <= 0.15, (kind, s)


def test_a_lone_request_gets_the_whole_energy_of_its_window_inline_too():
    seqs, trace = simulate(workload((1, 1, 1)))
    sensorless = [(t, c, None) for t, c, _ in trace]  # no power read between counter steps: nothing rescaled
    for r in replay(seqs, sensorless, interval_s=POLL_S):
        assert math.isclose(r.inline.joules, r.window_j, rel_tol=1e-6)


def test_streamed_and_plain_requests_doing_the_same_work_get_the_same_figures():
    wave = [Planned(stream=i % 2 == 0, max_tokens=48) for i in range(8)]
    results = replay(*simulate([wave], arrival_gap_s=0.0), counter_every_s=SPARSE_COUNTER_S)
    for figure, tolerance in ((lambda r: r.settled.joules, 0.01), (lambda r: r.inline.joules, 0.05)):
        streams = [figure(r) for r in results if r.stream]
        plain = [figure(r) for r in results if not r.stream]
        mean = sum(streams + plain) / len(results)
        assert max(abs(x / mean - 1) for x in streams + plain) <= tolerance


def test_the_issue_workload_meets_its_targets_on_the_scripted_gpu():
    """``python -m bench.inline --mode trace``, first line: p95 <= 5 %, worst <= 15 %."""
    results = replay(*simulate(), counter_every_s=SPARSE_COUNTER_S)
    for kind, s in summary([(r.stream, r.inline.joules, r.settled.joules) for r in results]).items():
        assert s["p95"] <= 0.05 and s["worst"] <= 0.15, (kind, s)


def test_bursts_reaching_the_gpu_over_milliseconds_stay_within_5_percent():
    """Through a gateway a wave's requests begin a few ms apart, and the first plain request of a burst
    was the worst case (+10 to +18 %): `python -m bench.inline --mode trace --arrival-gap-ms 5`, counter
    read every poll."""
    results = run_trace(arrival_gap_s=0.005)
    for kind, s in summary([(r.stream, r.inline.joules, r.settled.joules) for r in results]).items():
        assert s["p95"] <= 0.05 and s["worst"] <= 0.15, (kind, s)


def test_a_long_stream_whose_old_token_times_are_dropped_keeps_its_inline_figure():
    """Past 2 x COMPACT_AFTER arrivals the meter drops those both passes are done with."""
    tokens = [WARM_S + 0.05 + 0.05 * k for k in range(1200)]  # 60 s at 20 tokens/s
    seq = Scripted("long", True, len(tokens), WARM_S, WARM_S + 0.05, tokens=tokens, end=WARM_S + 60.1)
    trace = [(round(0.01 * k, 6), 1000.0 + 3.0 * (k // 10 * 10), 300.0) for k in range(6800)]
    (r,) = replay([seq], trace, interval_s=POLL_S)
    assert math.isclose(r.inline.joules, r.window_j, rel_tol=1e-6)
    assert math.isclose(r.settled.joules, r.window_j, rel_tol=0.01)


def test_one_counter_interval_with_a_step_in_power_does_not_scale_inline_figures():
    """Found by the property above: power steps 60 -> 165 W at 0.955 s, between two polls; the
    counter, read once a second, then disagrees with the trapezoids of power by 10 % over that one
    interval. Scaling the next window by it put a lone request 10 % over what the GPU can draw."""
    trace, energy = [], 1000.0
    for k in range(801):
        t = round(0.01 * k, 6)
        power = 165.0 if t >= 0.955 else 60.0
        trace.append((t, energy if k % 5 == 0 else trace[-1][1], power))
        energy += power * 0.01
    seq = Scripted("r0", False, 4, 1.0, 1.0625, tokens=[1.0625 + 0.125 * i for i in range(4)], end=1.5)
    (r,) = replay([seq], trace, interval_s=POLL_S, counter_every_s=SPARSE_COUNTER_S)
    assert r.inline.joules <= 165.0 * 0.5 * 1.01


def test_power_steps_where_the_gpu_turns_busy_and_idle_not_evenly_between_polls():
    """A lone 0.5 s request on a GPU drawing 400 W while it runs and 80 W otherwise; the counter steps
    every 100 ms and is read every poll. Spread evenly over the steps and polls around its start and
    end, its energy came out 2.6-6.6 % short; placed by power, with the step at its start and end,
    within 2 %, wherever the polls fall."""
    start, end = WARM_S + 0.013, WARM_S + 0.513
    trace, energy = [], 1000.0
    for k in range(8001):
        t = round(0.001 * k, 6)
        power = 400.0 if start <= t < end else 80.0
        trace.append((t, energy if k % 100 == 0 else trace[-1][1], power))
        energy += power * 0.001
    tokens = [start + 0.002 + 0.01 * k for k in range(50)]
    seq = Scripted("r", True, len(tokens), start, tokens[0], tokens=tokens, end=end)
    for phase in (0.0, 0.011, 0.027, 0.041):
        (r,) = replay([seq], trace, phase_s=phase, interval_s=POLL_S)
        assert r.settled.joules == pytest.approx(400.0 * (end - start), rel=0.02), phase

"""Where a GPU's energy counter steps, learnt from reads on swept polls (meter.counter_steps)."""

from __future__ import annotations

import itertools
import math

import pytest

from wattgate.meter.counter_steps import SWEEP_POLLS, CounterSteps, poll_delays
from wattgate.meter.sampler import Sampler
from wattgate.meter.sources.trace import TraceSource


def _read_for(steps: CounterSteps, period: float, phase: float, seconds: float, first_poll: float) -> list[float]:
    """Read a counter stepping at ``phase + k * period`` on the sampler's poll schedule for ``seconds``;
    the error (s) of each step stamped from the time ``steps`` has a phase."""
    errors, t, before = [], first_poll, None
    delays = poll_delays(0.05)
    while t < seconds:
        if before is not None:
            value, last = (math.floor((x - phase) / period + 1e-9) for x in (t, before))
            steps.read(before, t, value != last)
            if value != last and (stamp := steps.step_in(before, t)) is not None:
                errors.append(stamp - (phase + value * period))
        before, t = t, t + next(delays)
    return errors


@pytest.mark.parametrize("period", [0.1, 0.1003, 0.25])
@pytest.mark.parametrize("first_poll", [0.0, 0.0137, 0.0251, 0.0377])
def test_steps_are_stamped_within_a_few_ms_once_learnt(period, first_poll):
    steps = CounterSteps()
    errors = _read_for(steps, period, 0.003, 12.0, first_poll)
    assert errors, "never learnt"
    late = errors[-int(6.0 / period):]  # the last 6 s
    assert max(abs(e) for e in late) <= 0.005, max(late, key=abs)
    assert steps.period_s == pytest.approx(period, abs=2e-4) == steps.step_period_s()


def test_a_counter_that_changes_at_every_read_gives_no_phase_and_no_sweep():
    steps = CounterSteps()
    _read_for(steps, 0.05, 0.0, 4.0, 0.01)
    assert steps.fast and steps.step_in(3.95, 4.0) is None  # noticed within 20 reads: stamped at midpoints
    trace = [(round(0.01 * k, 6), 1000.0 + k, 100.0) for k in range(400)]  # a new value every 10 ms
    clock = itertools.count(0.0, 0.05).__next__
    now = [0.0]
    sampler = Sampler(TraceSource({0: trace}, lambda: now[0]), [0], clock=lambda: now[0])
    for _ in range(40):
        now[0] = clock()
        sampler.poll()
    assert sampler.next_delay() == sampler.interval_s
    assert sampler.counter_step_s(0) is None


def test_readyz_shows_the_learnt_counter_step():
    from tests.replay import Clock  # the replay harness's scripted clock
    from wattgate.meter import Meter

    trace = [(round(0.01 * k, 6), 1000.0 + 30.0 * (k // 10), 300.0) for k in range(600)]  # steps every 100 ms
    clock = Clock()
    meter = Meter(TraceSource({0: trace}, clock), [0], clock=clock)
    assert meter.sampler is not None
    t = 0.05
    while t < 5.0:
        clock.t = t
        meter.sampler.poll()
        t += meter.sampler.next_delay()
    assert meter.state()["gpus"]["0"]["counter_step_ms"] == pytest.approx(100.0, abs=0.2)


def test_a_stepping_counter_read_every_poll_sweeps_the_polls_around_their_interval():
    delays = list(itertools.islice(poll_delays(0.05), SWEEP_POLLS))
    assert sum(delays) == pytest.approx(0.05 * SWEEP_POLLS)
    assert all(0.046 <= d <= 0.054 for d in delays)
    drift = list(itertools.accumulate(d - 0.05 for d in delays))
    assert max(drift) - min(drift) == pytest.approx(0.05, rel=0.05)  # the phase covers a whole poll


def test_forget_starts_over():
    steps = CounterSteps()
    _read_for(steps, 0.1, 0.0, 4.0, 0.0)
    assert steps.step_in(4.05, 4.1) is not None
    steps.forget()
    assert steps.step_in(4.05, 4.1) is None and steps.period_s is None

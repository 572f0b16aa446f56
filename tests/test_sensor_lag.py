"""The fit behind bench/sensor_lag.py, on sensors scripted with known delays (the GPU run itself is not a test)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.sensor_fits import busy_before, counter_steps, fit_counter, fit_power, is_busy

PHASES = np.array([(1.0 + 2 * k, 2.0 + 2 * k) for k in range(6)])  # 1 s busy, 1 s idle


def true_power(t):
    return 90.0 + 600.0 * is_busy(PHASES, t)


def true_energy(t):
    return 5_000.0 + 90.0 * t + 600.0 * busy_before(PHASES, t)


def polls(seed=0):
    """Reads every 10 ms with a little jitter, like the bench's sampling thread."""
    rng = np.random.default_rng(seed)
    return np.arange(0.5, 13.0, 0.01) + rng.uniform(-0.002, 0.002, 1250)


def test_busy_time_and_state_follow_the_phases():
    assert busy_before(PHASES, np.array([0.0, 1.5, 2.5, 3.25, 20.0])) == pytest.approx([0.0, 0.5, 1.0, 1.25, 6.0])
    assert is_busy(PHASES, np.array([0.99, 1.0, 1.99, 2.0, 3.5])).tolist() == [False, True, True, False, True]


@pytest.mark.parametrize("delay_s", [0.0, 0.08, 0.15])
def test_power_delay_is_recovered(delay_s):
    t = polls()
    watts = true_power(t - delay_s) + np.random.default_rng(1).normal(0, 15, len(t))
    fit = fit_power(t, watts, PHASES)
    assert fit.delay_s == pytest.approx(delay_s, abs=0.011)
    assert fit.idle == pytest.approx(90.0, abs=10) and fit.extra == pytest.approx(600.0, rel=0.03)


@pytest.mark.parametrize("delay_s", [0.0, 0.03, 0.1])
def test_counter_delay_is_recovered(delay_s):
    """A counter that updates every 100 ms with the energy of ``delay_s`` earlier, polled every 10 ms."""
    t = polls()
    updates = np.arange(0.0, 13.1, 0.1) + 0.037  # its own phase, unknown to the fit
    last = updates[np.searchsorted(updates, t, side="right") - 1]
    joules = true_energy(last - delay_s)
    at, _ = counter_steps(t, joules)
    assert np.median(np.diff(at)) == pytest.approx(0.1, abs=0.011)
    fit = fit_counter(t, joules, PHASES)
    assert fit.delay_s == pytest.approx(delay_s, abs=0.011)
    assert fit.idle == pytest.approx(90.0, abs=10) and fit.extra == pytest.approx(600.0, rel=0.03)


def test_an_averaging_power_sensor_reads_as_late_as_half_its_window():
    """A sensor that reports mean power over its last 100 ms sees a load change 50 ms late, on average."""
    t = polls()
    watts = (true_energy(t) - true_energy(t - 0.1)) / 0.1
    assert fit_power(t, watts, PHASES).delay_s == pytest.approx(0.05, abs=0.011)

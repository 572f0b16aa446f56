"""Fits of how late a GPU's sensors report a load change, from readings taken around a square wave.

Used by ``python -m bench.sensor_lag`` on a GPU and checked on synthetic readings by
tests/test_sensor_lag.py (bench may import it; tests never import bench).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DELAYS_S = np.round(np.arange(-0.2, 0.4001, 0.005), 3)


@dataclass(frozen=True)
class Fit:
    """``reading = idle + extra x busy`` with the load seen ``delay_s`` late."""

    delay_s: float
    idle: float  # watts
    extra: float  # watts above idle while busy
    rms: float  # residual, in the unit of the fitted readings


def busy_before(phases: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Busy seconds before each of ``t``; ``phases`` are sorted, disjoint ``(start, end)`` rows."""
    edges = phases.ravel()
    cum = np.concatenate(([0.0], np.cumsum(np.diff(edges) * (np.arange(len(edges) - 1) % 2 == 0))))
    return np.interp(t, edges, cum)


def is_busy(phases: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.searchsorted(phases.ravel(), t, side="right") % 2 == 1


def _best(readings: np.ndarray, design: list[tuple[float, np.ndarray, np.ndarray]]) -> Fit:
    """The delay whose design (columns: idle, extra) leaves the least squared residual."""
    best = None
    for delay, idle_col, extra_col in design:
        a = np.column_stack((idle_col, extra_col))
        coef, *_ = np.linalg.lstsq(a, readings, rcond=None)
        rss = float(np.sum((a @ coef - readings) ** 2))
        if best is None or rss < best[0]:
            best = (rss, Fit(float(delay), float(coef[0]), float(coef[1]), (rss / len(readings)) ** 0.5))
    assert best is not None
    return best[1]


def fit_power(times: np.ndarray, watts: np.ndarray, phases: np.ndarray) -> Fit:
    """Delay of instantaneous power readings ``watts`` taken at ``times``."""
    ones = np.ones(len(times))
    return _best(watts, [(d, ones, is_busy(phases, times - d).astype(float)) for d in DELAYS_S])


def counter_steps(times: np.ndarray, joules: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step times (halfway between the poll that saw a change and the one before) and counter values there."""
    changed = np.flatnonzero(np.diff(joules) != 0) + 1
    return (times[changed - 1] + times[changed]) / 2, joules[changed]


def fit_counter(times: np.ndarray, joules: np.ndarray, phases: np.ndarray) -> Fit:
    """Delay of the energy counter, polled at ``times`` with values ``joules``; fitted on mean power per step."""
    at, value = counter_steps(times, joules)
    dur = np.diff(at)
    ones = np.ones(len(dur))
    # Per step: mean power = idle + extra x (busy share of the step, shifted by the delay).
    design = [(d, ones, np.diff(busy_before(phases, at - d)) / dur) for d in DELAYS_S]
    return _best(np.diff(value) / dur, design)

"""Three windows of known work on a scripted GPU whose sensors report a load change late.

Windows a from 0 to 3 s, b from 1 to 4 s, c from 2 to 5 s, one token each per 50 ms; the GPU
draws 690 W while any of them runs and 90 W otherwise. a and c are mirror images, so c/a should
be 1 (and b/a 8/11). Also one lone window on the same GPU (``lone_window``). Used by tests/test_meter.py and ``python -m bench.placement`` (bench may
import it; tests never import bench).
"""

from __future__ import annotations

import numpy as np

from wattgate.meter import Measurement, Meter, RequestWindow
from wattgate.meter.sources.trace import TraceSource

TICK_S = 0.05  # the sampler's poll and the token pace
IDLE_W, BUSY_W = 90.0, 690.0
WINDOWS = {"a": (0, 60), "b": (20, 80), "c": (40, 100)}  # in ticks


def scripted_gpu(start: float, end: float, phase: float, power_late: float, counter_late: float,
                 until: float) -> list[tuple[float, float, float]]:
    """Trace points every 5 ms of a GPU busy over ``[start, end)``; its counter updates at ``phase`` + k x 100 ms."""
    t = np.round(np.arange(0.0, until, 0.005), 4)

    def energy(x: np.ndarray) -> np.ndarray:
        return 5_000.0 + IDLE_W * x + (BUSY_W - IDLE_W) * np.clip(np.minimum(x, end) - start, 0.0, None)

    updated = np.floor((t - phase) / 0.1) * 0.1 + phase
    late = t - power_late
    power = np.where((late >= start) & (late < end), BUSY_W, IDLE_W)
    return list(zip(t.tolist(), energy(updated - counter_late).tolist(), power.tolist(), strict=True))


def mirror_windows(counter_every_s: float | None, phase: float, offset: float, power_late: float = 0.0,
                   counter_late: float = 0.0, power_lag: float = 0.0, t0: float = 10.0) -> dict[str, Measurement]:
    """Settled measurements of a, b and c; the windows start ``offset`` s after a poll, at ``t0``.

    ``power_late`` and ``counter_late``: how late the scripted sensors report; ``power_lag``: what the meter is told.
    """
    base = t0 + offset
    at = {r: (base + s * TICK_S, base + e * TICK_S) for r, (s, e) in WINDOWS.items()}
    trace = scripted_gpu(at["a"][0], at["c"][1], phase, power_late, counter_late, until=t0 + 12)
    clock = [0.0]
    settled: dict[str, Measurement] = {}
    meter = Meter(TraceSource({0: trace}, lambda: clock[0]), [0], interval_s=TICK_S, clock=lambda: clock[0],
                  settle_lag_s=0.5, counter_every_s=counter_every_s, power_lag_s=power_lag,
                  on_settled=lambda m: settled.__setitem__(m.request_id, m))
    windows: dict[str, RequestWindow] = {}
    sampler = meter.sampler
    assert sampler is not None  # a trace source always has one
    k = 0
    while clock[0] < t0 + 9:
        clock[0] = round(clock[0] + TICK_S, 6)
        # The workload's own 50 ms steps, between two polls: tokens of the step, then ends, then starts.
        while base + k * TICK_S <= clock[0]:
            t = base + k * TICK_S
            for r, (s, e) in WINDOWS.items():
                if s < k <= e:
                    windows[r].tokens(1, t)
                if k == e:
                    windows[r].end(t=t)
                if k == s:
                    windows[r] = meter.begin(r, [0], t=t)
            k += 1
        sampler.poll()
        meter.advance()
    return settled


def lone_window(duration: float, offset: float, power_late: float, phase: float = 0.047,
                t0: float = 10.0) -> Measurement:
    """The settled measurement of one window of ``duration`` s alone on the scripted GPU, starting ``offset``
    s after ``t0``; the meter is told the power sensor's delay and polls at its own pace (its polls sweep
    against the counter's steps to learn their phase, as the sampler's thread does)."""
    start, end = t0 + offset, t0 + offset + duration
    trace = scripted_gpu(start, end, phase, power_late, 0.0, until=t0 + 4)
    clock = [0.0]
    settled: dict[str, Measurement] = {}
    meter = Meter(TraceSource({0: trace}, lambda: clock[0]), [0], interval_s=TICK_S, clock=lambda: clock[0],
                  settle_lag_s=0.5, power_lag_s=power_late, on_settled=lambda m: settled.__setitem__(m.request_id, m))
    sampler = meter.sampler
    assert sampler is not None  # a trace source always has one
    window: RequestWindow | None = None
    ended = False
    next_poll = TICK_S
    while "r" not in settled and clock[0] < t0 + 3:
        clock[0] = round(clock[0] + 0.001, 6)
        if window is None and clock[0] >= start:
            window = meter.begin("r", [0], t=start)
        if window is not None and clock[0] >= end and not ended:
            window.end(t=end)
            ended = True
        if clock[0] >= next_poll:
            sampler.poll()
            meter.advance()
            next_poll += sampler.next_delay()
    return settled["r"]

"""How late NVML's two power sensors report a change of GPU load, against the host's clock.

    python -m bench.sensor_lag [--gpu 0] [--cycles 8] [--period 1.0] [--csv trace.csv]

Needs an NVIDIA GPU and PyTorch; not a test, and CI never runs it. Results go to
bench/RESULTS.md by hand.

Why: with the counter read sparsely (``meter.counter_interval_ms: auto`` on
hosts where a counter read is costly), instantaneous power places the counter's
energy in time. On an H200 the last of three overlapping windows got about 5 %
less than its mirror image that way, against about 1 % with the counter read
every poll (RESULTS.md). If instantaneous power reports a load change later
than the counter does, energy crosses window edges by that much.

How: a square-wave load (bf16 matmuls for ``period`` s, idle for ``period`` s)
whose busy phases are timed on the host clock (start before the first launch,
end after ``torch.cuda.synchronize``), while a thread reads the counter and
instantaneous power every 10 ms, each read stamped at the middle of its call.
For each sensor, the delay that best explains its readings as ``idle + extra x
busy(t - delay)`` is fitted by least squares over a grid of delays:

- instantaneous power: each reading against busy-or-not at ``t - delay``;
- energy counter: each step's energy against the busy time in its interval
  (steps stamped halfway between the poll that saw them and the one before),
  shifted by ``delay``.
"""

from __future__ import annotations

import argparse
import csv
import threading
import time
from dataclasses import dataclass

import numpy as np

POLL_S = 0.01
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


# -- on the GPU ---------------------------------------------------------------


def _sample(gpu: int, stop: threading.Event, rows: list[tuple[float, float | None, float, float | None]]) -> None:
    from wattgate.meter.sources.nvml import NvmlSource

    source = NvmlSource([gpu])
    try:
        next_at = time.monotonic()
        while not stop.is_set():
            t0 = time.monotonic()
            power = source.read(gpu, energy=False).power_w
            t1 = time.monotonic()
            energy = source.read(gpu, energy=True).energy_j
            t2 = time.monotonic()
            rows.append(((t0 + t1) / 2, power, (t1 + t2) / 2, energy))
            next_at += POLL_S
            stop.wait(max(next_at - time.monotonic(), 0.0))
    finally:
        source.close()


def _square_wave(gpu: int, cycles: int, period: float) -> np.ndarray:
    import torch

    a = torch.randn(8192, 8192, device=f"cuda:{gpu}", dtype=torch.bfloat16)
    (a @ a).sum().item()  # warm up: kernels chosen, clocks up
    time.sleep(period)
    phases = []
    for _ in range(cycles):
        start = time.monotonic()
        while time.monotonic() - start < period:
            for _ in range(4):
                a @ a
            torch.cuda.synchronize()
        phases.append((start, time.monotonic()))
        time.sleep(period)
    return np.array(phases)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", type=int, default=0, help="NVML index")
    parser.add_argument("--cycles", type=int, default=8)
    parser.add_argument("--period", type=float, default=1.0, help="seconds busy, then as many idle")
    parser.add_argument("--csv", help="also write the raw readings here")
    args = parser.parse_args()
    rows: list[tuple[float, float | None, float, float | None]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(args.gpu, stop, rows), daemon=True)
    sampler.start()
    time.sleep(0.5)
    phases = _square_wave(args.gpu, args.cycles, args.period)
    stop.set()
    sampler.join()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["t_power_s", "power_w", "t_counter_s", "energy_j"])
            out.writerows(rows)
        print(f"raw readings: {args.csv}")
    arr = np.array([r for r in rows if r[1] is not None and r[3] is not None], dtype=float)
    if len(arr) < 100:  # the sampling thread failed (its traceback is above), or no counter on this GPU
        raise SystemExit(f"only {len(arr)} readings with both power and the energy counter: nothing to fit")
    inside = (arr[:, 0] > phases[0, 0] - args.period / 2) & (arr[:, 0] < phases[-1, 1] + args.period / 2)
    arr = arr[inside]
    power = fit_power(arr[:, 0], arr[:, 1], phases)
    counter = fit_counter(arr[:, 2], arr[:, 3], phases)
    at, _ = counter_steps(arr[:, 2], arr[:, 3])
    period_ms = float(np.median(np.diff(at))) * 1e3
    print(f"{len(phases)} busy phases of {args.period:g} s; {len(arr)} polls every {POLL_S * 1e3:.0f} ms; "
          f"counter steps every {period_ms:.1f} ms (median)")
    for name, fit in (("instantaneous power", power), ("energy counter", counter)):
        print(f"{name:>20}: reports a load change {fit.delay_s * 1e3:+.0f} ms after it happens "
              f"(idle {fit.idle:.0f} W, busy +{fit.extra:.0f} W, rms residual {fit.rms:.0f} W)")
    lead = (power.delay_s - counter.delay_s) * 1e3
    print(f"instantaneous power reports {abs(lead):.0f} ms {'later' if lead >= 0 else 'earlier'} than the counter: "
          f"with sparse counter reads, about {abs(lead) / 1e3 * power.extra:.0f} J per load edge lands "
          f"{'after' if lead >= 0 else 'before'} it")
    print(f"registry setting for this GPU model: meter.power_lag_ms: {round(lead)}")


if __name__ == "__main__":
    main()

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

import numpy as np

from tests.sensor_fits import counter_steps, fit_counter, fit_power

POLL_S = 0.01
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

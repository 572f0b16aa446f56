"""Meter benchmark: sampler CPU share, attribution cost per request, CPU per poll, buffer memory.

    python -m bench.meter            # NVML when a GPU is visible, else a source with NVML-like call cost
    python -m bench.meter --only attribution --repeat 5
    python -m bench.meter --only poll   # the meter's own CPU per poll, the load changing between polls

Not a test: figures go to bench/RESULTS.md by hand, with the machine they came from.
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc
from typing import Any

from wattgate.meter import Measurement, Meter, Method, RequestWindow
from wattgate.meter.sampler import Sampler
from wattgate.meter.sources import PowerSource, Reading
from wattgate.meter.sources.nvml import visible_gpu_count
from wattgate.meter.sources.trace import TraceSource

NVML_COUNTER_CPU_S = 4e-3  # one nvmlDeviceGetTotalEnergyConsumption, measured on an H200 host (RESULTS.md)
NVML_POWER_CPU_S = 4e-6  # one NVML_FI_DEV_POWER_INSTANT read, same host


class CostlySource:
    """Stands in for NVML without a GPU: burns the CPU a real read pair costs."""

    method = Method.SIMULATED
    continuous_counter = False  # as NVML's, so that the sampler spaces its counter reads as with NVML
    power_lag_s = 0.06  # NVML's default

    def __init__(self) -> None:
        self.energy = 0.0
        self.unmeasurable: dict[int, str] = {}

    def read(self, gpu: int, energy: bool = True) -> Reading:
        end = time.perf_counter() + NVML_POWER_CPU_S + (NVML_COUNTER_CPU_S if energy else 0.0)
        while time.perf_counter() < end:
            pass
        self.energy += 1.0
        return Reading(self.energy if energy else None, 100.0)

    def close(self) -> None:
        pass


class NvmlFanout:
    """Reads physical GPU 0 once per logical GPU: the NVML call cost of an n-GPU host."""

    method = Method.NVML

    def __init__(self) -> None:
        from wattgate.meter.sources.nvml import NvmlSource

        self.inner = NvmlSource([0])
        self.unmeasurable: dict[int, str] = {}
        self.continuous_counter = self.inner.continuous_counter
        self.power_lag_s = self.inner.power_lag_s

    def read(self, gpu: int, energy: bool = True) -> Reading:
        return self.inner.read(0, energy)

    def close(self) -> None:
        self.inner.close()


def sampler_cpu(n_gpus: int, seconds: float, real: bool, **counter: Any) -> tuple[float, float]:
    """Share of one core the sampler uses, and the counter interval it ran with."""
    source: PowerSource = NvmlFanout() if real else CostlySource()
    sampler = Sampler(source, list(range(n_gpus)), interval_s=0.05, **counter)
    cpu0, t0 = time.process_time(), time.monotonic()
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    share = (time.process_time() - cpu0) / (time.monotonic() - t0)
    source.close()
    return share, sampler.counter_period_s


def attribution_cost(concurrent: int, seconds: float = 6.0) -> tuple[dict[str, float], int]:
    """Time spent in the meter per request, with ``concurrent`` streams on one GPU.

    Returns seconds per request in each part, and the number of requests:
    ``tokens`` (``RequestWindow.tokens``, one call per token), ``windows``
    (``begin`` and ``end``, which computes the provisional figure) and
    ``attribution`` (sampling, attribution passes, settling).
    """
    clock_t = [0.0]
    clock = lambda: clock_t[0]
    trace = [(k * 0.1, 1000.0 + k * 40.0, 400.0) for k in range(int((seconds + 5) * 10))]
    settled: list[Measurement] = []
    meter = Meter(TraceSource({0: trace}, clock), [0], interval_s=0.05, clock=clock, on_settled=settled.append)
    sampler = meter.sampler
    assert sampler is not None  # a trace source always has one
    rng = random.Random(1)
    # Streams of ~2 s at ~30 tokens/s, started so that ``concurrent`` are open at any time.
    dur = 2.0
    pending = sorted(rng.uniform(0, seconds) for _ in range(int(concurrent * seconds / dur)))
    # Each tick's calls are timed together (perf_counter costs ~0.1 us, thread_time a system call),
    # so the figures hold the meter, not the timer's own cost. Repeat and take the median on a noisy machine.
    clock_wall = time.perf_counter
    spent = {"tokens": 0.0, "windows": 0.0, "attribution": 0.0}
    open_: list[tuple[RequestWindow, float, float]] = []
    step = 0.01
    while clock_t[0] < seconds + dur + 2:
        clock_t[0] = round(clock_t[0] + step, 6)
        now = clock_t[0]
        starting = 0
        while pending and pending[0] <= now:
            pending.pop(0)
            starting += 1
        ending = [w for w, end, _ in open_ if now >= end]
        due = [w for w, end, last in open_ if now < end and now - last >= 0.033]
        open_ = [(w, end, now if now - last >= 0.033 else last) for w, end, last in open_ if now < end]
        if due:
            t = clock_wall()
            for w in due:
                w.tokens(1, now)
            spent["tokens"] += clock_wall() - t
        if ending or starting:
            t = clock_wall()
            for w in ending:
                w.end(t=now)
            started = [meter.begin(f"r{len(settled)}-{now}-{k}", [0], prompt_tokens=100) for k in range(starting)]
            spent["windows"] += clock_wall() - t
            open_ += [(w, now + dur, now) for w in started]
        if round(now / step) % 5 == 0:  # every 50 ms, like the sampler thread
            t = clock_wall()
            sampler.poll()
            meter._after_poll()
            spent["attribution"] += clock_wall() - t
    n = max(len(settled), 1)
    return {k: v / n for k, v in spent.items()}, len(settled)


def poll_cost(changes: int, polls: int = 20_000) -> float:
    """Seconds of the sampler's own work per poll (a scripted source: no driver's cost in it), with the
    load on its GPU changing ``changes`` times between two polls, as a busy GPU's requests start and end."""
    clock_t = [0.0]
    clock = lambda: clock_t[0]
    trace = [(k * 0.1, 1000.0 + k * 40.0, 300.0 + 100.0 * (k % 4)) for k in range(polls // 2 + 10)]
    sampler = Sampler(TraceSource({0: trace}, clock), [0], interval_s=0.05)
    spent = 0.0
    for k in range(polls):
        now = k * 0.05
        for c in range(changes):
            sampler.load(0, now + 0.05 * c / changes, 1 + (k + c) % 8)
        clock_t[0] = now + 0.05
        t = time.perf_counter()
        sampler.poll()
        spent += time.perf_counter() - t
    return spent / polls


def buffer_bytes(horizon_s: float = 900.0, interval_s: float = 0.05) -> int:
    tracemalloc.start()
    sampler = Sampler(CostlySource(), [0], interval_s=interval_s, horizon_s=horizon_s)
    before = tracemalloc.get_traced_memory()[0]
    samples = sampler._gpu[0].trace.samples
    for k in range(samples.maxlen or 0):
        samples.append((k * interval_s, float(k)))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="per sampler figure (auto mode reads the counter every few seconds: keep it long)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per attribution figure")
    parser.add_argument("--only", choices=("sampler", "attribution", "poll", "buffer"), help="one part of the benchmark")
    args = parser.parse_args()
    if args.only in (None, "sampler"):
        real = visible_gpu_count() > 0
        print(f"power source: {'NVML (GPU 0 read once per logical GPU)' if real else 'CPU-burning stand-in'}")
        modes = {"counter every poll": {}, "counter every 1 s": {"counter_every_s": 1.0},
                 "counter auto (budget 0.4 % of a core, the default)": {"counter_cpu_budget": 0.004}}
        for mode, counter in modes.items():
            for n in (1, 8):
                share, period = sampler_cpu(n, args.seconds, real, **counter)
                print(f"sampler at 20 Hz, {n} GPU(s), {mode}: {100 * share:.3f} % of one core "
                      f"(counter every {period:g} s)")
    if args.only in (None, "attribution"):
        for c in (10, 100, 1000):
            runs = sorted((attribution_cost(c) for _ in range(args.repeat)), key=lambda r: sum(r[0].values()))
            totals = [sum(parts.values()) for parts, _ in runs]
            parts, n = runs[len(runs) // 2]  # the median run; the spread shows how noisy the machine was
            detail = ", ".join(f"{k} {v * 1e6:.1f}" for k, v in parts.items())
            print(f"meter, {c:>4} concurrent ({n} requests): {totals[len(runs) // 2] * 1e6:.1f} us per request "
                  f"(runs {totals[0] * 1e6:.1f}-{totals[-1] * 1e6:.1f}); median run: {detail}")
    if args.only in (None, "poll"):
        for changes in (0, 10):
            costs = sorted(poll_cost(changes) for _ in range(args.repeat))
            print(f"meter CPU per poll, {changes} load changes between polls: {costs[len(costs) // 2] * 1e6:.1f} us "
                  f"(runs {costs[0] * 1e6:.1f}-{costs[-1] * 1e6:.1f})")
    if args.only in (None, "buffer"):
        print(f"sample buffer, one GPU, 900 s at 50 ms: {buffer_bytes() / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

"""Meter benchmark: sampler CPU share, attribution cost per request, buffer memory.

    python -m bench.meter            # NVML when a GPU is visible, else a source with NVML-like call cost

Not a test: figures go to bench/RESULTS.md by hand, with the machine they came from.
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc

from meter import Meter
from meter.sampler import Sampler
from meter.sources import Reading
from meter.sources.nvml import visible_gpu_count
from meter.sources.trace import TraceSource

NVML_COUNTER_CPU_S = 4e-3  # one nvmlDeviceGetTotalEnergyConsumption, measured on an H200 host (RESULTS.md)
NVML_POWER_CPU_S = 4e-6  # one NVML_FI_DEV_POWER_INSTANT read, same host


class CostlySource:
    """Stands in for NVML without a GPU: burns the CPU a real read pair costs."""

    method = "bench"

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

    method = "nvml"

    def __init__(self) -> None:
        from meter.sources.nvml import NvmlSource

        self.inner = NvmlSource([0])
        self.unmeasurable: dict[int, str] = {}

    def read(self, gpu: int, energy: bool = True) -> Reading:
        return self.inner.read(0, energy)

    def close(self) -> None:
        self.inner.close()


def sampler_cpu(n_gpus: int, seconds: float, real: bool, **counter: float) -> tuple[float, float]:
    """Share of one core the sampler uses, and the counter interval it ran with."""
    source = NvmlFanout() if real else CostlySource()
    sampler = Sampler(source, list(range(n_gpus)), interval_s=0.05, **counter)
    cpu0, t0 = time.process_time(), time.monotonic()
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    share = (time.process_time() - cpu0) / (time.monotonic() - t0)
    source.close()
    return share, sampler.counter_period_s


def attribution_cost(concurrent: int, seconds: float = 6.0) -> tuple[float, float, int]:
    """Wall time spent in the meter per request, with ``concurrent`` streams on one GPU.

    Returns the time in token records (``RequestWindow.tokens``, one call per
    token), the time in the rest (windows opened and closed, sampling,
    attribution, settling) and the number of requests.
    """
    clock_t = [0.0]
    clock = lambda: clock_t[0]
    trace = [(k * 0.1, 1000.0 + k * 40.0, 400.0) for k in range(int((seconds + 5) * 10))]
    settled = []
    meter = Meter(TraceSource({0: trace}, clock), [0], interval_s=0.05, clock=clock, on_settled=settled.append)
    rng = random.Random(1)
    # Streams of ~2 s at ~30 tokens/s, started so that ``concurrent`` are open at any time.
    dur = 2.0
    starts = sorted(rng.uniform(0, seconds) for _ in range(int(concurrent * seconds / dur)))
    pending = list(starts)
    open_: list[tuple[object, float, float]] = []
    spent = 0.0
    spent_tokens = 0.0
    step = 0.01
    while clock_t[0] < seconds + dur + 2:
        clock_t[0] = round(clock_t[0] + step, 6)
        now = clock_t[0]
        while pending and pending[0] <= now:
            pending.pop(0)
            t = time.perf_counter()
            w = meter.begin(f"r{len(settled)}-{now}-{len(open_)}", [0], prompt_tokens=100)
            spent += time.perf_counter() - t
            open_.append((w, now + dur, now))
        still = []
        for w, end, last in open_:
            if now >= end:
                t = time.perf_counter()
                w.end(t=now)
                spent += time.perf_counter() - t
            else:
                if now - last >= 0.033:
                    t = time.perf_counter()
                    w.tokens(1, now)
                    spent_tokens += time.perf_counter() - t
                    last = now
                still.append((w, end, last))
        open_ = still
        if round(now / step) % 5 == 0:  # every 50 ms, like the sampler thread
            t = time.perf_counter()
            meter.sampler.poll()
            meter._after_poll()
            spent += time.perf_counter() - t
    n = max(len(settled), 1)
    return spent_tokens / n, spent / n, len(settled)


def buffer_bytes(horizon_s: float = 900.0, interval_s: float = 0.05) -> int:
    tracemalloc.start()
    sampler = Sampler(CostlySource(), [0], interval_s=interval_s, horizon_s=horizon_s)
    before = tracemalloc.get_traced_memory()[0]
    st = sampler._gpu[0]
    for k in range(st.samples.maxlen or 0):
        st.samples.append((k * interval_s, float(k)))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    real = visible_gpu_count() > 0
    print(f"power source: {'NVML (GPU 0 read once per logical GPU)' if real else 'CPU-burning stand-in'}")
    modes = {"counter every poll": {}, "counter every 1 s": {"counter_every_s": 1.0},
             "counter auto (budget 0.4 % of a core, the default)": {"counter_cpu_budget": 0.004}}
    for mode, counter in modes.items():
        for n in (1, 8):
            share, period = sampler_cpu(n, args.seconds, real, **counter)
            print(f"sampler at 20 Hz, {n} GPU(s), {mode}: {100 * share:.3f} % of one core (counter every {period:g} s)")
    for c in (10, 100, 1000):
        tokens, rest, n = attribution_cost(c)
        print(f"meter, {c:>4} concurrent: {(tokens + rest) * 1e6:.1f} us per request ({n} requests): "
              f"token records {tokens * 1e6:.1f} us, windows + sampling + attribution {rest * 1e6:.1f} us")
    print(f"sample buffer, one GPU, 900 s at 50 ms: {buffer_bytes() / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

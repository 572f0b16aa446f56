"""The benchmarks' own stand-ins still fit the meter's interfaces: a bench that breaks is found here, not
on a GPU host where each minute is counted (bench.meter's no-GPU sampler figures failed for a day after
``PowerSource`` grew ``power_lag_s``)."""

from __future__ import annotations

from bench.meter import attribution_cost, sampler_cpu
from bench.workers import _split


def test_the_sampler_bench_runs_on_its_nvml_stand_in() -> None:
    share, counter_period_s = sampler_cpu(1, 0.3, real=False)
    assert 0 < share < 1
    assert counter_period_s > 0


def test_the_attribution_bench_settles_its_requests() -> None:
    spent, settled = attribution_cost(10, seconds=1.0)
    assert settled > 0
    assert set(spent) == {"tokens", "windows", "attribution"}


def test_the_load_is_split_into_whole_shares_that_add_up() -> None:
    assert _split(512, 3) == [170, 171, 171]
    assert _split(2, 4) == [0, 1, 0, 1]
    assert all(sum(_split(total, parts)) == total for total in range(50) for parts in range(1, 9))

"""The benchmarks still run: a bench that breaks is found here, not on a GPU host where each minute is
counted (bench.meter's no-GPU sampler figures failed for a day after ``PowerSource`` grew
``power_lag_s``). Each runs as a user runs it, a short run of its CLI: tests never import bench."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_sampler_and_attribution_benches_run_without_a_gpu() -> None:
    out = _bench("bench.meter", "--seconds", "0.3", "--repeat", "1", "--only", "sampler")
    assert "sampler" in out.lower(), out
    out = _bench("bench.meter", "--seconds", "1", "--repeat", "1", "--only", "attribution")
    assert "attribution" in out.lower(), out


def test_the_placement_and_inline_trace_benches_run() -> None:
    assert "c/a" in _bench("bench.placement")
    assert "p95" in _bench("bench.inline", "--mode", "trace")


@pytest.mark.parametrize("bench", sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__"))
def test_every_bench_imports_and_says_how_to_run_it(bench: str) -> None:
    """A module moved or renamed in the gateway breaks a bench at import (bench.workers did once, unseen
    until run by hand): each answers --help."""
    assert "usage" in _bench(f"bench.{bench}", "--help")

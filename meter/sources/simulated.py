"""A simulated H100 serving Llama-3.1-8B: power and decode speed as functions of batch size.

Every figure produced from this source is labelled ``simulated``. The constants
are fitted so that energy per output token matches what the ML.ENERGY
leaderboard measured for Llama-3.1-8B-Instruct on one H100 with vLLM
(about 0.46 J/token at batch 8 and 0.07 J/token at batch 512):

- power(b) = idle + (limit - idle) * (1 - exp(-b / b_half)), with idle 80 W
  (an H100 SXM idles at 70-100 W) and the 700 W board limit;
- inter-token latency(b) = itl_1 + itl_slope * b, so that one sequence decodes at
  about 85 tokens/s alone and about 20 tokens/s at batch 512.

At b = 8: 300 W over 8 / 12.3 ms = 651 tokens/s, 0.46 J/token.
At b = 512: 700 W over 512 / 51.0 ms = 10 040 tokens/s, 0.070 J/token.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from wattgate.meter.kinds import Fault, Method
from wattgate.meter.sources import MeterFault, Reading


@dataclass(frozen=True, slots=True)
class GpuProfile:
    """Power and speed of one simulated GPU serving one model."""

    idle_w: float = 80.0
    limit_w: float = 700.0
    batch_half: float = 18.2  # sequences at which power has risen 1 - 1/e of the way
    itl_1_s: float = 0.0117  # inter-token latency of a lone sequence
    itl_slope_s: float = 0.0000768  # added inter-token latency per running sequence

    def power_w(self, batch: int) -> float:
        """Board power in watts with ``batch`` sequences running."""
        return self.idle_w + (self.limit_w - self.idle_w) * (1.0 - math.exp(-batch / self.batch_half))

    def inter_token_s(self, batch: int) -> float:
        """Seconds between two tokens of one sequence with ``batch`` sequences running."""
        return self.itl_1_s + self.itl_slope_s * max(batch, 1)


H100_LLAMA_8B = GpuProfile()


class SimulatedGpu:
    """One simulated GPU whose power follows the number of sequences it runs.

    The simulated upstream calls :meth:`begin_sequence` and :meth:`end_sequence`;
    energy is integrated exactly between those events.
    """

    def __init__(self, profile: GpuProfile = H100_LLAMA_8B, clock: Callable[[], float] | None = None) -> None:
        self.profile = profile
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._batch = 0
        self._energy_j = 0.0
        self._since = self._clock()

    @property
    def batch(self) -> int:
        return self._batch

    def _advance(self, now: float) -> None:
        self._energy_j += self.profile.power_w(self._batch) * (now - self._since)
        self._since = now

    def begin_sequence(self) -> None:
        with self._lock:
            self._advance(self._clock())
            self._batch += 1

    def end_sequence(self) -> None:
        with self._lock:
            self._advance(self._clock())
            self._batch = max(self._batch - 1, 0)

    def reading(self) -> Reading:
        with self._lock:
            self._advance(self._clock())
            return Reading(self._energy_j, self.profile.power_w(self._batch))


class SimulatedSource:
    """Power source over a set of :class:`SimulatedGpu` by index."""

    method = Method.SIMULATED
    continuous_counter = True  # energy is integrated exactly up to each read
    power_lag_s = 0.0  # its power is the power of the moment

    def __init__(self, gpus: dict[int, SimulatedGpu]) -> None:
        self.gpus = gpus
        self.unmeasurable: dict[int, str] = {}

    def read(self, gpu: int, energy: bool = True) -> Reading:
        try:
            reading = self.gpus[gpu].reading()
            return reading if energy else Reading(None, reading.power_w)
        except KeyError:
            raise MeterFault(Fault.LOST_GPU, f"no simulated GPU {gpu}") from None

    def close(self) -> None:
        pass

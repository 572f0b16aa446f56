"""Background sampling of each GPU's cumulative energy into bounded buffers."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meter.sources import MeterFault, PowerSource

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _GpuState:
    samples: deque[tuple[float, float]]  # (monotonic s, cumulative J), made continuous
    last_raw: float | None = None  # last counter value as read
    offset: float = 0.0  # added to raw values after counter resets
    last_poll: float | None = None
    power_w: float | None = None
    last_ok: float | None = None  # time of the last successful read


class Sampler:
    """Polls a :class:`PowerSource` every ``interval_s`` on a monotonic clock.

    Counter readings are stored only when the value changes, stamped halfway
    between the poll that saw the change and the one before it (the counter
    stepped somewhere in between; on H100 it steps about every 100 ms). A
    counter that goes backwards is treated as a reset and made continuous.
    GPUs without a counter get their power integrated (trapezoids).

    ``poll()`` takes one round of readings; ``start()`` runs it in a daemon
    thread (NVML calls release the GIL) and calls ``after_poll`` after each.
    """

    def __init__(
        self,
        source: PowerSource,
        gpus: Sequence[int],
        interval_s: float = 0.05,
        horizon_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        after_poll: Callable[[], None] | None = None,
    ) -> None:
        self.source = source
        self.gpus = tuple(gpus)
        self.interval_s = interval_s
        self.clock = clock
        self.after_poll = after_poll
        maxlen = int(horizon_s / interval_s) + 16
        self._gpu = {g: _GpuState(deque(maxlen=maxlen)) for g in self.gpus}
        self.errors: Counter[str] = Counter()
        self.on_error: Callable[[str], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_round: float | None = None

    def _fault(self, kind: str) -> None:
        self.errors[kind] += 1
        if self.on_error is not None:
            self.on_error(kind)

    def poll(self) -> None:
        """Read every GPU once."""
        for gpu in self.gpus:
            st = self._gpu[gpu]
            now = self.clock()
            try:
                reading = self.source.read(gpu)
            except MeterFault as exc:
                self._fault(exc.kind)
                continue
            except Exception:  # a source bug must not kill the sampler
                log.exception("power source failed on GPU %d", gpu)
                self._fault("read")
                continue
            prev_poll, st.last_poll, st.last_ok = st.last_poll, now, now
            prev_power, st.power_w = st.power_w, reading.power_w
            if reading.energy_j is not None:
                raw = reading.energy_j
                if st.last_raw is None:
                    st.samples.append((now, raw))
                elif raw != st.last_raw:
                    if raw < st.last_raw:
                        self._fault("counter_reset")
                        # Unknown energy between the last value and the reset: assume power held.
                        gap = (reading.power_w or 0.0) * (now - (prev_poll or now))
                        st.offset += st.last_raw - raw + gap
                    stamp = now if prev_poll is None else (prev_poll + now) / 2
                    st.samples.append((stamp, raw + st.offset))
                st.last_raw = raw
            elif reading.power_w is not None:
                if not st.samples:
                    st.samples.append((now, 0.0))
                else:
                    t0, e0 = st.samples[-1]
                    avg = (reading.power_w + (prev_power if prev_power is not None else reading.power_w)) / 2
                    st.samples.append((now, e0 + avg * (now - t0)))
            else:
                self._fault("read")
        self.last_round = self.clock()

    def samples_since(self, gpu: int, t: float | None) -> list[tuple[float, float]]:
        """Buffered samples from the last one at or before ``t`` on (all when ``t`` is None)."""
        buf = self._gpu[gpu].samples
        if t is None:
            return list(buf)
        out: list[tuple[float, float]] = []
        for sample in reversed(buf):  # new samples are few; walk back from the end
            out.append(sample)
            if sample[0] <= t:
                break
        out.reverse()
        return out

    def power_w(self, gpu: int) -> float | None:
        """Latest instantaneous power of one GPU in watts, if known."""
        return self._gpu[gpu].power_w

    def last_ok(self, gpu: int) -> float | None:
        """Time of the last successful reading of one GPU."""
        return self._gpu[gpu].last_ok

    def buffer_bytes(self) -> int:
        """Rough memory held by the sample buffers."""
        # A deque slot holds a 2-tuple (56 B) of two floats (24 B each) plus an 8 B pointer.
        return sum(len(st.samples) for st in self._gpu.values()) * (56 + 48 + 8)

    def _run(self) -> None:
        next_at = self.clock()
        while not self._stop.is_set():
            try:
                self.poll()
                if self.after_poll is not None:
                    self.after_poll()
            except Exception:
                log.exception("meter sampler round failed")
                self._fault("internal")
            next_at += self.interval_s
            delay = next_at - self.clock()
            if delay < 0:  # fell behind: skip missed rounds rather than bursting
                next_at = self.clock()
                delay = 0
            self._stop.wait(delay)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="wattgate-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

"""A stand-in for the ``pynvml`` module (nvidia-ml-py), for testing ``NvmlSource`` without a GPU.

It answers the handful of NVML calls the source makes, in NVML's units
(millijoules, milliwatts) and with NVML's error class, for GPUs described by
``FakeGpu``; tests put it in ``sys.modules["pynvml"]``. What a real driver
answers is checked by ``tests/test_gpu.py`` on a GPU host.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_FI_DEV_POWER_INSTANT = 186


class NVMLError(Exception):
    pass


@dataclass
class FakeGpu:
    """A GPU drawing ``power_mw`` steadily since it was made: its counter is that power integrated."""

    power_mw: int = 300_000  # what both power readings answer
    since: float = field(default_factory=time.monotonic)
    has_counter: bool = True
    has_instant_power: bool = True
    mig: bool = False
    open_error: str | None = None  # an NVMLError message nvmlDeviceGetHandleByIndex raises for this GPU
    fail: str | None = None  # an NVMLError message every read raises, once set (a GPU lost, say)
    # Readings that follow a workload instead of a steady power: an object with ``counter_mj(now)`` and
    # ``instant_power_mw(now)`` (tests/truth_rig.py's LockstepGpu).
    follows: Any = None


@dataclass
class FakeNvml:
    """The module's state: the GPUs, whether ``nvmlInit`` fails, and how often each call was made."""

    gpus: list[FakeGpu]
    init_error: str | None = None
    calls: Counter[str] = field(default_factory=Counter)

    def module(self) -> SimpleNamespace:
        def gpu(handle: int) -> FakeGpu:
            return self.gpus[handle]

        def counted(name: str, fn):  # type: ignore[no-untyped-def]
            def call(*args):  # type: ignore[no-untyped-def]
                self.calls[name] += 1
                return fn(*args)
            return call

        def init() -> None:
            if self.init_error:
                raise NVMLError(self.init_error)

        def energy(h: int) -> int:
            g = gpu(h)
            if g.fail:
                raise NVMLError(g.fail)
            if not g.has_counter:
                raise NVMLError("Not Supported")
            if g.follows is not None:
                return int(g.follows.counter_mj(time.monotonic()))
            return 1_000_000 + int((time.monotonic() - g.since) * g.power_mw)  # mW x s = mJ

        def fields(h: int, ids: list[int]) -> list[SimpleNamespace]:
            assert ids == [NVML_FI_DEV_POWER_INSTANT]
            if gpu(h).fail:
                raise NVMLError(gpu(h).fail)
            ok = gpu(h).has_instant_power
            follows = gpu(h).follows
            power = int(follows.instant_power_mw(time.monotonic())) if follows is not None else gpu(h).power_mw
            return [SimpleNamespace(nvmlReturn=NVML_SUCCESS if ok else NVML_ERROR_NOT_SUPPORTED,
                                    value=SimpleNamespace(uiVal=power if ok else 0))]

        def averaged_power(h: int) -> int:
            if gpu(h).fail:
                raise NVMLError(gpu(h).fail)
            return gpu(h).power_mw

        def handle(i: int) -> int:
            if self.gpus[i].open_error:
                raise NVMLError(self.gpus[i].open_error)
            return i

        def mig_mode(h: int) -> tuple[int, int]:
            return (1, 1) if gpu(h).mig else (0, 0)

        return SimpleNamespace(
            NVMLError=NVMLError, NVML_SUCCESS=NVML_SUCCESS, NVML_FI_DEV_POWER_INSTANT=NVML_FI_DEV_POWER_INSTANT,
            nvmlInit=counted("init", init), nvmlShutdown=counted("shutdown", lambda: None),
            nvmlDeviceGetCount=lambda: len(self.gpus), nvmlDeviceGetHandleByIndex=handle,
            nvmlDeviceGetTotalEnergyConsumption=counted("energy", energy),
            nvmlDeviceGetFieldValues=counted("instant_power", fields),
            nvmlDeviceGetPowerUsage=counted("averaged_power", averaged_power),
            nvmlDeviceGetMigMode=mig_mode,
        )

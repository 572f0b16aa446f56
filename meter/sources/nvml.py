"""Read real NVIDIA GPUs through NVML (nvidia-ml-py).

GPU indices are NVML's, as ``nvidia-smi`` lists them. NVML ignores
``CUDA_VISIBLE_DEVICES``: a vLLM started with ``CUDA_VISIBLE_DEVICES=2,3`` runs on
NVML GPUs 2 and 3, and those are the indices to put in the registry.

The primary reading is the total-energy counter
(``nvmlDeviceGetTotalEnergyConsumption``, millijoules since driver load, Volta
and later). On H100 it advances only about every 100 ms; the sampler therefore
timestamps a reading when the value changes. Instantaneous power
(``NVML_FI_DEV_POWER_INSTANT``) is read beside it to extrapolate past the last
counter step. GPUs without the counter are metered by integrating power. Where
the driver has no instantaneous power field, power is ``nvmlDeviceGetPowerUsage``
(on Ampere and later but GA100, a 1 s average, NVML's reference says), and the
source warns at start-up: energy between counter reads then lands late.

MIG: NVML has no power or energy reading per MIG instance, only for the whole
GPU. By default (``mig="estimate"``) a GPU in MIG mode is listed in
``unmeasurable`` and its requests get estimates: other instances may run work
the gateway never sees, and pinning their energy on its requests would
overstate them. ``mig="whole_gpu"`` meters such a GPU as a whole, for when every
instance of it serves through this gateway.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from wattgate.meter.kinds import Fault, Method
from wattgate.meter.sources import MeterFault, Reading

log = logging.getLogger(__name__)


class NvmlSource:
    """Energy and power of the given NVML GPU indices."""

    method = Method.NVML
    continuous_counter = False
    # How late NVML_FI_DEV_POWER_INSTANT reports a load change against the counter, as bench/sensor_lag.py
    # measured it on H100 and H200 hosts (bench/RESULTS.md, "Accuracy on a real GPU").
    power_lag_s = 0.06

    def __init__(self, gpus: Sequence[int], mig: Literal["estimate", "whole_gpu"] = "estimate") -> None:
        try:
            import pynvml  # provided by nvidia-ml-py
        except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
            raise MeterFault(Fault.INIT, "nvidia-ml-py is not installed") from exc
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            raise MeterFault(Fault.INIT, f"NVML is not available: {exc}") from exc
        missing = [g for g in gpus if not 0 <= g < count]
        if missing:
            raise MeterFault(Fault.INIT, f"GPU indices {missing} not visible to NVML ({count} GPUs)")
        try:
            self._handles = {g: pynvml.nvmlDeviceGetHandleByIndex(g) for g in gpus}
        except pynvml.NVMLError as exc:  # a GPU lost or not ours to read: the gateway starts on estimates
            raise MeterFault(Fault.INIT, f"NVML cannot open the GPUs {list(gpus)}: {exc}") from exc
        self.has_counter = {g: self._probe_counter(h) for g, h in self._handles.items()}
        self.has_instant_power = {g: self._instant_power_w(h) is not None for g, h in self._handles.items()}
        self.unmeasurable: dict[int, str] = {}
        for g, h in self._handles.items():
            if self._in_mig_mode(h):
                if mig == "estimate":
                    self.unmeasurable[g] = "MIG mode: NVML has no power reading per MIG instance"
                    log.warning("GPU %d is in MIG mode: its requests get estimates (meter.mig: whole_gpu meters "
                                "the whole GPU, if every instance of it serves through this gateway)", g)
                else:
                    log.warning("GPU %d is in MIG mode: metered as a whole GPU (meter.mig: whole_gpu)", g)
            if not self.has_counter[g]:
                log.warning("GPU %d has no energy counter; integrating its power", g)
            if not self.has_instant_power[g]:
                log.warning("GPU %d reports no instantaneous power (NVML_FI_DEV_POWER_INSTANT): reading "
                            "nvmlDeviceGetPowerUsage, a 1 s average on Ampere and later GPUs, so energy between "
                            "counter reads is placed late. meter.counter_interval_ms: 0 reads the counter every "
                            "poll, where placement matters least; meter.power_lag_ms takes a delay measured "
                            "with `python -m bench.sensor_lag`", g)

    def _probe_counter(self, handle: object) -> bool:
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return True
        except self._nvml.NVMLError:
            return False

    def _instant_power_w(self, handle: object) -> float | None:
        """``NVML_FI_DEV_POWER_INSTANT`` in watts; None when the driver does not answer it."""
        nv = self._nvml
        try:
            (field,) = nv.nvmlDeviceGetFieldValues(handle, [nv.NVML_FI_DEV_POWER_INSTANT])
        except nv.NVMLError:
            return None
        return field.value.uiVal / 1000.0 if field.nvmlReturn == nv.NVML_SUCCESS else None

    def _in_mig_mode(self, handle: object) -> bool:
        try:
            current, _ = self._nvml.nvmlDeviceGetMigMode(handle)
            return bool(current)
        except self._nvml.NVMLError:
            return False

    def _power_w(self, gpu: int, handle: object) -> float | None:
        """Instantaneous power where the driver has it (a failed read falls back for that poll), else the
        averaged reading; None when neither answers (the sampler then has the counter alone). A GPU
        that is lost raises, as a counter read would."""
        nv = self._nvml
        if self.has_instant_power[gpu] and (watts := self._instant_power_w(handle)) is not None:
            return watts
        try:
            return nv.nvmlDeviceGetPowerUsage(handle) / 1000.0
        except nv.NVMLError as exc:
            if _lost(exc):
                raise MeterFault(Fault.LOST_GPU, f"GPU {gpu}: {exc}") from exc
            return None

    def read(self, gpu: int, energy: bool = True) -> Reading:
        handle = self._handles.get(gpu)
        if handle is None:
            raise MeterFault(Fault.LOST_GPU, f"GPU {gpu} is not metered")
        try:
            energy_j = (
                self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
                if energy and self.has_counter[gpu]
                else None
            )
        except self._nvml.NVMLError as exc:
            raise MeterFault(Fault.LOST_GPU if _lost(exc) else Fault.READ, f"GPU {gpu}: {exc}") from exc
        return Reading(energy_j, self._power_w(gpu, handle))

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass


def _lost(exc: Exception) -> bool:
    """Whether an NVML error says the GPU is gone ("GPU is lost"), not that one read failed."""
    return "lost" in str(exc).lower()


def visible_gpu_count() -> int:
    """Number of GPUs NVML sees; 0 when NVML or its driver is missing."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError:
        return 0
    finally:
        pynvml.nvmlShutdown()


"""The meter and the site's factors as the registry describes them."""

from __future__ import annotations

import logging

from wattgate.meter import Meter, MeterFault
from wattgate.meter.footprint import GridIntensity, SiteFactors, UnknownZone, grid_intensity
from wattgate.meter.host import FixedHostPower, HostPower, RaplHostPower
from wattgate.meter.sources import PowerSource
from wattgate.meter.sources.simulated import SimulatedGpu, SimulatedSource
from wattgate.proxy.settings import ConfigError, Settings

log = logging.getLogger("wattgate")


def site_factors(settings: Settings) -> SiteFactors:
    s = settings.site
    try:
        location = GridIntensity(grid_intensity(s.grid_zone), "codecarbon", "average", s.grid_zone)
    except UnknownZone as exc:
        raise ConfigError(f"site.grid_zone: {exc}") from None
    market = None
    if s.grid_intensity_g_per_kwh is not None:
        market = GridIntensity(s.grid_intensity_g_per_kwh, "override", "contractual", s.grid_zone)
    return SiteFactors(s.grid_zone, location, market, s.pue, s.wue_site_l_per_kwh, s.water_grid_l_per_kwh,
                       s.hardware.embodied())


def build_meter(
    settings: Settings, simulated_gpus: dict[int, SimulatedGpu] | None = None
) -> tuple[Meter, dict[int, SimulatedGpu]]:
    """The meter the registry asks for; NVML missing degrades to estimates, loudly.

    Also returns the simulated GPUs the gateway must drive itself (begin/end of each request).
    ``simulated_gpus``: for ``source: simulated``, GPUs whose load something else drives (the
    demo's and tests' simulated upstream); none then for the gateway to drive.
    """
    m = settings.meter
    gpus = settings.metered_gpus
    simulated: dict[int, SimulatedGpu] = {}
    source: PowerSource | None = None
    init_fault = None
    if m.source == "simulated":
        if simulated_gpus is None:
            simulated = {g: SimulatedGpu() for g in gpus}
        source = SimulatedSource(simulated if simulated_gpus is None else simulated_gpus)
    elif m.source == "nvml" and gpus:
        from wattgate.meter.sources.nvml import NvmlSource

        try:
            source = NvmlSource(gpus, m.mig)
        except MeterFault as exc:
            log.warning("meter: %s; all figures will be estimates", exc)
            init_fault = exc.kind
    meter = Meter(
        source,
        gpus,
        host=_host_power(settings),
        interval_s=m.interval_ms / 1000,
        idle=m.idle,
        settle_lag_s=m.settle_lag_ms / 1000,
        stale_after_s=m.stale_after_ms / 1000,
        counter_every_s=None if m.counter_interval_ms == "auto" else m.counter_interval_ms / 1000 or None,
        counter_cpu_budget=m.counter_cpu_budget if m.counter_interval_ms == "auto" else None,
        power_lag_s=None if m.power_lag_ms == "auto" else m.power_lag_ms / 1000,
    )
    if init_fault:
        meter.errors[init_fault] += 1
    return meter, simulated


def _host_power(settings: Settings) -> HostPower | None:
    host = settings.meter.host
    if host.source == "fixed":
        return FixedHostPower(host.watts_per_gpu)
    if host.source == "rapl":
        try:
            return RaplHostPower()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"meter.host.source: rapl: {exc}") from None
    return None

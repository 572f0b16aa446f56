"""From joules to grams of CO2e and millilitres of water.

Grid carbon intensity comes from the data CodeCarbon ships (read through
``codecarbon.input.DataSource``): per-country figures from its global energy
mix (Our World in Data / Ember, gCO2e/kWh, ``carbon_intensity``) and
per-region figures of cloud providers (``impact``, gCO2e/kWh).

A live figure (a provider's, at the time of a request) can stand in for the zone's
annual average: :class:`GridIntensity` says which one a figure used.

Arithmetic (docs/architecture.md, "Footprint"):
    facility kWh = IT kWh x PUE
    gCO2e        = facility kWh x grid intensity (g/kWh): market-based when the site fixes one, else location-based
    water L      = IT kWh x on-site WUE (L/kWh) + facility kWh x water intensity of electricity (L/kWh)

Location-based gCO2e (the zone's grid, what SCI asks for) is always computed as well.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from ecologits.impacts.llm import GPU_EMBODIED_IMPACT_GWP, HARDWARE_LIFESPAN, SERVER_EMBODIED_IMPACT_GWP, SERVER_GPUS

J_PER_KWH = 3.6e6
J_PER_WH = 3600.0


@dataclass(frozen=True, slots=True)
class GridIntensity:
    """A grid's carbon intensity and where it came from."""

    g_per_kwh: float
    source: str  # "codecarbon" (the zone's annual average), "electricitymaps", "watttime", "override"
    signal: str  # "average" or "marginal" (location-based); "contractual" for a site's own (market-based) figure
    zone: str | None  # None: not known (a ledger row written before the location's zone was kept)
    at: float | None = None  # Unix time the figure is for; None for an annual average or a fixed figure
    fallback: str | None = None  # the live source this static figure stands in for (it failed, or its data is old)
    estimated: bool | None = None  # the provider's own word that the figure is estimated, not measured (None: not said)


@dataclass(frozen=True, slots=True)
class Embodied:
    """Manufacturing emissions of one GPU's place in a server, spread evenly over its lifetime: the SCI
    specification's M, pro-rated by the GPU time a request had. Defaults: EcoLogits' (0.11), as below."""

    gpu_kgco2e: float = GPU_EMBODIED_IMPACT_GWP  # one datacentre GPU (EcoLogits: 273 kgCO2e)
    server_kgco2e: float = SERVER_EMBODIED_IMPACT_GWP  # the server without its GPUs (EcoLogits: 5,700 kgCO2e)
    gpus_per_server: int = SERVER_GPUS  # the server's share each GPU carries (EcoLogits: 8)
    lifetime_s: float = HARDWARE_LIFESPAN  # EcoLogits: 3 years

    @property
    def g_per_gpu_second(self) -> float:
        """gCO2e of embodied emissions per second of one GPU's time."""
        return (self.gpu_kgco2e + self.server_kgco2e / self.gpus_per_server) * 1000.0 / self.lifetime_s


@dataclass(frozen=True, slots=True)
class SiteFactors:
    """Factors of one site. Defaults and their sources: see docs/factors.md, "Factors"."""

    grid_zone: str
    location: GridIntensity  # the zone's annual average (CodeCarbon): what a live provider's figure stands in for
    market: GridIntensity | None  # the site's own figure (a PPA, a supplier's mix): market-based, used when set
    pue: float
    wue_site_l_per_kwh: float
    water_grid_l_per_kwh: float
    embodied: Embodied = Embodied()


@dataclass(frozen=True, slots=True)
class Footprint:
    """Per-request figures: IT energy and what it costs."""

    joules: float
    wh: float
    gco2e: float  # market-based when the site fixes its intensity, else location-based
    gco2e_location: float
    water_ml: float
    grid: GridIntensity  # the intensity ``gco2e`` used
    embodied_gco2e: float = 0.0  # the hardware's manufacturing share (not in ``gco2e``, which is operational)


def footprint(joules: float, site: SiteFactors, location: GridIntensity | None = None,
              gpu_seconds: float = 0.0) -> Footprint:
    """Carbon and water of ``joules`` of IT energy at ``site``; ``location``: the grid's intensity at the
    time (default: the zone's annual average); ``gpu_seconds``: the GPU time the energy came with."""
    location = location or site.location
    it_kwh = joules / J_PER_KWH
    facility_kwh = it_kwh * site.pue
    water_l = it_kwh * site.wue_site_l_per_kwh + facility_kwh * site.water_grid_l_per_kwh
    used = site.market or location
    return Footprint(joules, joules / J_PER_WH, facility_kwh * used.g_per_kwh, facility_kwh * location.g_per_kwh,
                     water_l * 1000.0, used, gpu_seconds * site.embodied.g_per_gpu_second)


class UnknownZone(ValueError):
    """A grid zone CodeCarbon has no figure for; the message names the closest ones."""


@functools.cache
def _zones() -> dict[str, float]:
    from codecarbon.input import DataSource

    source = DataSource()
    zones = {
        iso: float(row["carbon_intensity"])
        for iso, row in source.get_global_energy_mix_data().items()
        if row.get("carbon_intensity") is not None
    }
    for row in source.get_cloud_emissions_data().to_dict("records"):
        zones[f"{row['provider']}:{row['region']}"] = float(row["impact"])
    return zones


def grid_intensity(zone: str) -> float:
    """gCO2e per kWh of ``zone`` (ISO-3 country such as ``FRA``, or ``gcp:europe-west1``)."""
    zones = _zones()
    key = zone if ":" in zone else zone.upper()
    if key in zones:
        return zones[key]
    close = difflib.get_close_matches(key, list(zones), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise UnknownZone(f"unknown grid zone {zone!r} in CodeCarbon's data{hint}")


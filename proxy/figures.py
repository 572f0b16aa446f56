"""Per-request figures as the user sees them: the ``energy`` body object (its one definition,
:class:`Energy`), its headers and its flat ``usage`` keys."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NotRequired, TypedDict, cast

from wattgate.meter import Measurement
from wattgate.meter.footprint import J_PER_WH, GridIntensity, SiteFactors, footprint


def iso_time(t: float | None) -> str | None:
    """Unix time as the figures write it (UTC, whole seconds)."""
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class GridObject(TypedDict):
    """Where a grid intensity came from."""

    source: str  # codecarbon, electricitymaps, watttime, override
    signal: str  # average, marginal, contractual
    zone: str | None
    g_per_kwh: float
    at: str | None  # ISO time the figure is for (None: an annual average or a fixed figure)
    fallback_for: str | None  # the live provider this figure stood in for
    estimated: bool | None  # the provider's isEstimated (None: not said)


class Grids(TypedDict):
    location: GridObject
    market: GridObject | None  # the site's own figure, when the registry fixes one


class TiersWh(TypedDict):
    accelerators: float
    with_host: float
    with_idle: float
    facility: float


class Sci(TypedDict):
    """The request's Software Carbon Intensity (SCI 1.1, R = one request)."""

    e_kwh: float
    i_g_per_kwh: float | None
    m_g: float | None
    sci_g: float
    tiers_wh: TiersWh


class Energy(TypedDict):
    """The body's ``energy`` object, as ``GET /v1/energy/{id}`` also returns it (docs/api.md, "The figures in a response"),
    built by :func:`energy_object` from a measurement and by :func:`energy_from_record` from a
    ledger row. The last three are None in rows written before they were kept."""

    request_id: str
    joules: float
    wh: float
    gco2e: float
    water_ml: float
    method: str
    settled: bool
    gpus: list[int]
    components: dict[str, float]
    window_ms: int
    prompt_tokens: int
    completion_tokens: int
    grid_zone: str | None  # the zone the intensity came from; "override" when the registry fixed it
    grid_intensity_g_per_kwh: float
    pue: float
    status: str
    gco2e_location: float | None  # location-based carbon (SCI); gco2e is market-based when the site fixes one
    embodied_gco2e: float | None  # the hardware's manufacturing share, apart from gco2e (operational)
    gpu_seconds: float | None
    sci: Sci | None
    grid: Grids | None
    stored: NotRequired[bool]  # False: the ledger gave the settled record up (it is not settled then)


#: The keys every energy object has, in the order it writes them.
ENERGY_KEYS = tuple(key for key in Energy.__annotations__ if key != "stored")


def grid_object(grid: GridIntensity) -> GridObject:
    """Where a grid intensity came from, as the ``energy`` object's ``grid`` says it."""
    return {"source": grid.source, "signal": grid.signal, "zone": grid.zone, "g_per_kwh": grid.g_per_kwh,
            "at": iso_time(grid.at), "fallback_for": grid.fallback, "estimated": grid.estimated}


def tiers_wh(gpu_j: float, it_j: float, idle_j: float, pue: float) -> TiersWh:
    """Energy by boundary tier (Wh, to 1e-9): the accelerators, + host (IT), + the idle share, x PUE."""
    with_idle = (it_j + idle_j) / J_PER_WH
    return {"accelerators": round(gpu_j / J_PER_WH, 9), "with_host": round(it_j / J_PER_WH, 9),
            "with_idle": round(with_idle, 9), "facility": round(with_idle * pue, 9)}


def sci_object(m: Measurement, site: SiteFactors, location: GridIntensity, embodied_g: float, idle_j: float) -> Sci:
    """The request's Software Carbon Intensity (SCI 1.1, R = one request) and its energy by boundary tier.

    E is the facility energy of the widest tier (accelerators, host, the idle share, x PUE); I the
    location-based intensity; M the embodied share: SCI = E x I + M."""
    e_kwh = (m.joules + idle_j) / J_PER_WH * site.pue / 1000
    return {
        "e_kwh": round(e_kwh, 12), "i_g_per_kwh": location.g_per_kwh, "m_g": round(embodied_g, 9),
        "sci_g": round(e_kwh * location.g_per_kwh + embodied_g, 9),
        "tiers_wh": tiers_wh(m.gpu_joules, m.joules, idle_j, site.pue),
    }


def energy_from_record(record: Mapping[str, Any]) -> Energy:
    """The energy object of a ledger record (``ledger_file.from_row``): :class:`Energy`'s keys, no others."""
    return cast(Energy, {key: record.get(key) for key in ENERGY_KEYS})


def usage_fields(energy: Energy) -> dict[str, Any]:
    """The figures as flat keys for ``usage``, where chat front ends and routers look (Open WebUI shows
    every key of it; LiteLLM rebuilds it). ``energy_request_id`` is the id ``GET /v1/energy/{id}`` settles:
    a front end that sees only ``usage`` can follow the figure until it is final."""
    return {"energy_j": energy["joules"], "energy_wh": energy["wh"], "gco2e": energy["gco2e"],
            "water_ml": energy["water_ml"], "energy_method": energy["method"], "energy_settled": energy["settled"],
            "energy_request_id": energy["request_id"]}


def energy_object(m: Measurement, site: SiteFactors, request_id: str | None = None,
                  location: GridIntensity | None = None, idle_j: float = 0.0) -> Energy:
    """The body's ``energy`` object (docs/api.md, "The figures in a response"); ``request_id`` as the client
    knows it, when the meter's window had another name; ``location``: the grid's intensity at the
    request's time (default: the zone's annual average); ``idle_j``: the GPUs' idle energy the request
    carries in the SCI's widest tier (0 when idle energy is already amortized into its joules)."""
    location = location or site.location
    gpu_seconds = sum(m.gpu_seconds.values())
    fp = footprint(m.joules, site, location, gpu_seconds)
    gpus = sorted(g for g in m.joules_by_gpu if g >= 0)
    return {
        "request_id": m.request_id if request_id is None else request_id,
        "joules": round(fp.joules, 6),
        "wh": round(fp.wh, 9),
        "gco2e": round(fp.gco2e, 9),
        "water_ml": round(fp.water_ml, 9),
        "method": m.method,
        "settled": m.settled,
        "gpus": gpus,
        "components": {"gpu": round(m.gpu_joules, 6), **({"host": round(m.host_joules, 6)} if m.host_joules else {})},
        "window_ms": round(m.window_s * 1000),
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens,
        # The zone the intensity came from; "override" when the registry fixed it.
        "grid_zone": "override" if site.market else location.zone,
        "grid_intensity_g_per_kwh": fp.grid.g_per_kwh,
        "pue": site.pue,
        "status": m.status,
        # Location-based carbon always (SCI); market-based too when the site fixes its intensity.
        "gco2e_location": round(fp.gco2e_location, 9),
        # The hardware's manufacturing share, by the GPU time the request had: apart from gco2e (operational).
        "embodied_gco2e": round(fp.embodied_gco2e, 9),
        "gpu_seconds": round(gpu_seconds, 6),
        "sci": sci_object(m, site, location, fp.embodied_gco2e, idle_j),
        "grid": {"location": grid_object(location), "market": grid_object(site.market) if site.market else None},
    }


ENERGY_HEADERS = (
    "x-energy-joules", "x-energy-wh", "x-carbon-gco2e", "x-water-ml",
    "x-energy-method", "x-energy-gpus", "x-grid-intensity", "x-grid-zone", "x-grid-intensity-source", "x-energy-settled",
)


def intensity_source(energy: Energy) -> str:
    """``x-grid-intensity-source``: where the intensity behind ``x-carbon-gco2e`` came from, e.g.
    ``electricitymaps; signal=average; at=2026-11-27T19:00:00Z``, ``codecarbon; signal=average;
    fallback-for=watttime``, ``override; signal=contractual``."""
    grids = energy["grid"]
    if grids is None:  # a ledger record written before grid sources were kept
        return "unknown"
    grid = grids["market"] or grids["location"]
    parts = [grid["source"], f"signal={grid['signal']}"]
    if grid["at"]:
        parts.append(f"at={grid['at']}")
    if grid["fallback_for"]:
        parts.append(f"fallback-for={grid['fallback_for']}")
    return "; ".join(parts)


def energy_headers(energy: Energy) -> dict[str, str]:
    """Response headers of a non-stream response."""
    return {
        "x-energy-joules": f"{energy['joules']:.6g}",
        "x-energy-wh": f"{energy['wh']:.6g}",
        "x-carbon-gco2e": f"{energy['gco2e']:.6g}",
        "x-water-ml": f"{energy['water_ml']:.6g}",
        "x-energy-method": energy["method"],
        "x-energy-gpus": ",".join(str(g) for g in energy["gpus"]),
        "x-grid-intensity": f"{energy['grid_intensity_g_per_kwh']:.6g}",
        "x-grid-zone": energy["grid_zone"],
        "x-grid-intensity-source": intensity_source(energy),
        # false: provisional, the request's share of what was measured by the time it ended;
        # GET /v1/energy/{request_id} has the settled figure once the counter has passed its end.
        "x-energy-settled": "true" if energy["settled"] else "false",
    }

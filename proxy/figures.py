"""Per-request figures as the user sees them: the ``energy`` body object and headers."""

from __future__ import annotations

from typing import Any

from wattgate.meter import Measurement
from wattgate.meter.footprint import SiteFactors, footprint


def energy_object(m: Measurement, site: SiteFactors, request_id: str | None = None) -> dict[str, Any]:
    """The body's ``energy`` object (the README, "Use it"); ``request_id`` as the client
    knows it, when the meter's window had another name."""
    fp = footprint(m.joules, site)
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
        "grid_zone": site.grid_zone if site.intensity_source.startswith("codecarbon:") else "override",
        "grid_intensity_g_per_kwh": site.grid_intensity_g_per_kwh,
        "pue": site.pue,
        "status": m.status,
    }


ENERGY_HEADERS = (
    "x-energy-joules", "x-energy-wh", "x-carbon-gco2e", "x-water-ml",
    "x-energy-method", "x-energy-gpus", "x-grid-intensity", "x-grid-zone", "x-energy-settled",
)


def energy_headers(energy: dict[str, Any]) -> dict[str, str]:
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
        # false: provisional, the request's share of what was measured by the time it ended;
        # GET /v1/energy/{request_id} has the settled figure once the counter has passed its end.
        "x-energy-settled": "true" if energy["settled"] else "false",
    }
